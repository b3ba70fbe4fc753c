//! Output files written safely: pyleak runs as root, often with `-o` in a directory others
//! can write (`/tmp`). A report is written to an unnamed file in the output's directory
//! (`O_TMPFILE`; a named `O_EXCL | O_NOFOLLOW` temp file where the filesystem has none),
//! then given its name with `rename(2)`: readers never see half a report, an old report
//! stays whole when the disk fills, and a symlink planted at the output path is replaced,
//! never followed. Files are created with mode 0600 unless `--file-mode` says otherwise.
//!
//! Paths under `/dev/` and `/proc/` (`/dev/stdout`, `/dev/fd/63` from `>(…)`) and existing
//! FIFOs and character devices are streams, written in place.

use std::{
    ffi::CString,
    fs::{File, OpenOptions},
    io::Write,
    os::unix::{
        ffi::OsStrExt,
        fs::{FileTypeExt, MetadataExt, OpenOptionsExt, PermissionsExt},
        io::AsRawFd,
    },
    path::{Path, PathBuf},
    sync::atomic::{AtomicU32, Ordering},
};

use crate::errors::UserError;

/// Parses `--file-mode`: octal permission bits (`600`, `0644`).
pub fn parse_mode(s: &str) -> Result<u32, String> {
    match u32::from_str_radix(s.trim_start_matches("0o"), 8) {
        Ok(m) if m <= 0o777 => Ok(m),
        _ => Err(format!(
            "`{s}` is not a file mode: give octal permission bits, e.g. 600 or 644"
        )),
    }
}

/// An output file opened before tracing (so a bad path fails first) and given its name
/// only once complete ([`OutputFile::commit`]).
#[derive(Debug)]
pub struct OutputFile {
    path: PathBuf,
    file: File,
    how: How,
}

#[derive(Debug)]
enum How {
    /// A stream (device, FIFO): written where it is.
    InPlace,
    /// An `O_TMPFILE` inode in the output's directory, linked in at commit.
    Unnamed,
    /// A named temp file (filesystems without `O_TMPFILE`), removed if never committed.
    Named(Option<PathBuf>),
}

fn output_error(path: &Path, cause: std::io::Error) -> UserError {
    UserError::Output {
        path: path.to_owned(),
        cause,
    }
}

/// Whether `path` names a stream to write in place rather than a file to replace.
fn is_stream(path: &Path) -> bool {
    if path.starts_with("/dev/") || path.starts_with("/proc/") {
        return true;
    }
    std::fs::symlink_metadata(path)
        .map(|m| m.file_type().is_fifo() || m.file_type().is_char_device())
        .unwrap_or(false)
}

/// A name for a temp file next to `path`, unique in this process.
fn temp_name(path: &Path) -> PathBuf {
    static NEXT: AtomicU32 = AtomicU32::new(0);
    let name = path
        .file_name()
        .map(|n| n.to_string_lossy())
        .unwrap_or_default();
    path.with_file_name(format!(
        ".{name}.pyleak-{}-{}.tmp",
        std::process::id(),
        NEXT.fetch_add(1, Ordering::Relaxed)
    ))
}

/// The directory `path` is in (`.` for a bare name).
fn dir_of(path: &Path) -> &Path {
    match path.parent() {
        Some(p) if !p.as_os_str().is_empty() => p,
        _ => Path::new("."),
    }
}

impl OutputFile {
    /// Opens an output for `path` with permission bits `mode`: nothing is at `path` until
    /// [`commit`](Self::commit). Errors (a missing or read-only directory, a directory at
    /// `path`) are one line.
    pub fn create(path: &Path, mode: u32) -> Result<OutputFile, UserError> {
        let fail = |e| output_error(path, e);
        if is_stream(path) {
            let file = OpenOptions::new()
                .write(true)
                .truncate(true)
                .open(path)
                .map_err(fail)?;
            return Ok(OutputFile {
                path: path.to_owned(),
                file,
                how: How::InPlace,
            });
        }
        if std::fs::symlink_metadata(path).is_ok_and(|m| m.is_dir()) {
            return Err(fail(std::io::Error::from(std::io::ErrorKind::IsADirectory)));
        }
        let dir = dir_of(path);
        let unnamed = OpenOptions::new()
            .write(true)
            .custom_flags(libc::O_TMPFILE)
            .mode(mode)
            .open(dir);
        let (file, how) = match unnamed {
            Ok(f) => (f, How::Unnamed),
            // EOPNOTSUPP (no O_TMPFILE on this filesystem), EISDIR (kernel without it).
            Err(e) if matches!(e.raw_os_error(), Some(libc::EOPNOTSUPP | libc::EISDIR)) => {
                let tmp = temp_name(path);
                let f = OpenOptions::new()
                    .write(true)
                    .create_new(true)
                    .custom_flags(libc::O_NOFOLLOW)
                    .mode(mode)
                    .open(&tmp)
                    .map_err(fail)?;
                (f, How::Named(Some(tmp)))
            }
            Err(e) => return Err(fail(e)),
        };
        // The mode asked for, whatever the umask.
        file.set_permissions(std::fs::Permissions::from_mode(mode))
            .map_err(fail)?;
        Ok(OutputFile {
            path: path.to_owned(),
            file,
            how,
        })
    }

    /// Opens `path` for a stream written while recording (`--snapshots`): in place, but
    /// never through a symlink (`O_NOFOLLOW`) nor into a file with other names (a planted
    /// hard link); created with `mode`.
    pub fn stream(path: &Path, mode: u32) -> Result<File, UserError> {
        let fail = |e| output_error(path, e);
        if is_stream(path) {
            return OpenOptions::new().write(true).open(path).map_err(fail);
        }
        let file = OpenOptions::new()
            .write(true)
            .create(true)
            .truncate(false)
            .custom_flags(libc::O_NOFOLLOW)
            .mode(mode)
            .open(path)
            .map_err(fail)?;
        let meta = file.metadata().map_err(fail)?;
        if !meta.is_file() || meta.nlink() != 1 {
            return Err(fail(std::io::Error::other(
                "not a plain file with one name",
            )));
        }
        file.set_len(0).map_err(fail)?;
        file.set_permissions(std::fs::Permissions::from_mode(mode))
            .map_err(fail)?;
        Ok(file)
    }

    /// The path the output gets.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Writes the whole output with `write`, then gives it its name (replacing what was
    /// there, a symlink included, in one step). Nothing is left at a temp name on error.
    pub fn commit(
        mut self,
        write: impl FnOnce(&mut dyn Write) -> std::io::Result<()>,
    ) -> Result<(), UserError> {
        let path = self.path.clone();
        let fail = |e| output_error(&path, e);
        {
            let mut out = std::io::BufWriter::new(&mut self.file);
            write(&mut out).and_then(|()| out.flush()).map_err(fail)?;
        }
        match &mut self.how {
            How::InPlace => Ok(()),
            How::Unnamed => {
                // ENOSPC and friends surface here on filesystems that delay allocation.
                self.file.sync_all().map_err(fail)?;
                let tmp = temp_name(&path);
                link_unnamed(&self.file, &tmp).map_err(fail)?;
                std::fs::rename(&tmp, &path).map_err(|e| {
                    let _ = std::fs::remove_file(&tmp);
                    fail(e)
                })
            }
            How::Named(tmp) => {
                self.file.sync_all().map_err(fail)?;
                let tmp = tmp.take().expect("a named temp file until committed");
                std::fs::rename(&tmp, &path).map_err(|e| {
                    let _ = std::fs::remove_file(&tmp);
                    fail(e)
                })
            }
        }
    }
}

impl Drop for OutputFile {
    fn drop(&mut self) {
        if let How::Named(Some(tmp)) = &self.how {
            let _ = std::fs::remove_file(tmp);
        }
    }
}

/// Gives the `O_TMPFILE` inode open as `file` the name `to` (`linkat` through
/// `/proc/self/fd`, which needs no privilege, unlike `AT_EMPTY_PATH`).
fn link_unnamed(file: &File, to: &Path) -> std::io::Result<()> {
    let from = CString::new(format!("/proc/self/fd/{}", file.as_raw_fd()))?;
    let to = CString::new(to.as_os_str().as_bytes())?;
    // SAFETY: both are NUL-terminated strings that outlive the call.
    let r = unsafe {
        libc::linkat(
            libc::AT_FDCWD,
            from.as_ptr(),
            libc::AT_FDCWD,
            to.as_ptr(),
            libc::AT_SYMLINK_FOLLOW,
        )
    };
    if r == 0 {
        Ok(())
    } else {
        Err(std::io::Error::last_os_error())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// `--file-mode`'s default.
    const DEFAULT_MODE: u32 = 0o600;

    fn write_text(path: &Path, text: &str) -> Result<(), UserError> {
        let out = OutputFile::create(path, DEFAULT_MODE)?;
        out.commit(|w| w.write_all(text.as_bytes()))
    }

    #[test]
    fn nothing_at_the_path_until_committed_then_mode_0600() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("r.json");
        let out = OutputFile::create(&path, DEFAULT_MODE).unwrap();
        assert!(!path.exists(), "no file before the report is complete");
        out.commit(|w| w.write_all(b"{}\n")).unwrap();
        assert_eq!(std::fs::read_to_string(&path).unwrap(), "{}\n");
        let mode = std::fs::metadata(&path).unwrap().permissions().mode() & 0o777;
        assert_eq!(mode, 0o600);
        // Nothing else left in the directory.
        assert_eq!(std::fs::read_dir(dir.path()).unwrap().count(), 1);
    }

    #[test]
    fn a_mode_asked_for_is_given_whatever_the_umask() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("r.folded");
        let out = OutputFile::create(&path, 0o644).unwrap();
        out.commit(|w| w.write_all(b"a 1\n")).unwrap();
        let mode = std::fs::metadata(&path).unwrap().permissions().mode() & 0o777;
        assert_eq!(mode, 0o644);
    }

    #[test]
    fn a_planted_symlink_is_replaced_not_followed() {
        let dir = tempfile::tempdir().unwrap();
        let victim = dir.path().join("victim");
        std::fs::write(&victim, "precious").unwrap();
        let path = dir.path().join("r.json");
        std::os::unix::fs::symlink(&victim, &path).unwrap();
        write_text(&path, "report").unwrap();
        assert_eq!(std::fs::read_to_string(&victim).unwrap(), "precious");
        assert!(!std::fs::symlink_metadata(&path).unwrap().is_symlink());
        assert_eq!(std::fs::read_to_string(&path).unwrap(), "report");
    }

    #[test]
    fn a_failed_write_leaves_the_old_report_whole_and_no_temp() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("r.json");
        std::fs::write(&path, "old").unwrap();
        let out = OutputFile::create(&path, DEFAULT_MODE).unwrap();
        let err = out
            .commit(|w| {
                w.write_all(b"half")?;
                Err(std::io::Error::from_raw_os_error(libc::ENOSPC))
            })
            .unwrap_err();
        assert!(err.to_string().contains("No space left"), "{err}");
        assert_eq!(std::fs::read_to_string(&path).unwrap(), "old");
        assert_eq!(std::fs::read_dir(dir.path()).unwrap().count(), 1);
    }

    #[test]
    fn a_directory_or_missing_directory_is_one_error() {
        let dir = tempfile::tempdir().unwrap();
        let err = OutputFile::create(dir.path(), DEFAULT_MODE).unwrap_err();
        assert!(err.to_string().starts_with("cannot write"), "{err}");
        let err = OutputFile::create(&dir.path().join("no/such/r.json"), DEFAULT_MODE).unwrap_err();
        assert!(err.to_string().contains("No such file"), "{err}");
    }

    #[test]
    fn a_stream_refuses_symlinks_and_hard_links() {
        let dir = tempfile::tempdir().unwrap();
        let victim = dir.path().join("victim");
        std::fs::write(&victim, "precious").unwrap();
        let link = dir.path().join("s.jsonl");
        std::os::unix::fs::symlink(&victim, &link).unwrap();
        assert!(OutputFile::stream(&link, DEFAULT_MODE).is_err());
        let hard = dir.path().join("h.jsonl");
        std::fs::hard_link(&victim, &hard).unwrap();
        assert!(OutputFile::stream(&hard, DEFAULT_MODE).is_err());
        assert_eq!(std::fs::read_to_string(&victim).unwrap(), "precious");
        let fresh = dir.path().join("f.jsonl");
        OutputFile::stream(&fresh, DEFAULT_MODE).unwrap();
        let mode = std::fs::metadata(&fresh).unwrap().permissions().mode() & 0o777;
        assert_eq!(mode, 0o600);
    }

    #[test]
    fn file_modes_parse_as_octal() {
        assert_eq!(parse_mode("600"), Ok(0o600));
        assert_eq!(parse_mode("0644"), Ok(0o644));
        assert!(parse_mode("9").is_err());
        assert!(parse_mode("1777").is_err());
    }
}
