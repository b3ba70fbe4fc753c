//! Blame on the user's own line: memory that library code allocated for the user's code
//! (a Task made inside asyncio's `gather`, a dict copied inside `copy.copy`) is a suspect
//! of the innermost frame in the user's own code, not of the library frame that happened to
//! call the allocator.

/// Whether a Python frame (`qualname (path:line)`) is the standard library's or an
/// installed package's: a path under `…/lib/pythonX.Y/` or `…/lib64/pythonX.Y/` (the
/// standard library of a CPython installed under a prefix; its `site-packages` too), in
/// `site-packages` or `dist-packages` anywhere (virtual environments, Debian), or a frozen
/// module (`<frozen importlib._bootstrap>`).
pub fn is_library_frame(frame: &str) -> bool {
    let Some(path) = frame_path(frame) else {
        return false;
    };
    path.starts_with("<frozen ")
        || path.contains("/site-packages/")
        || path.contains("/dist-packages/")
        || path.contains("/lib/python")
        || path.contains("/lib64/python")
}

/// The file of a Python frame `qualname (path:line)`; `None` for anything else.
fn frame_path(frame: &str) -> Option<&str> {
    let inner = frame.strip_suffix(')')?;
    let open = inner.rfind(" (")?;
    let (path, line) = inner[open + 2..].rsplit_once(':')?;
    line.bytes().all(|b| b.is_ascii_digit()).then_some(path)
}

/// The stack a suspect is blamed on: when the leaf Python frame is library code, the
/// stack cut after the innermost frame of the user's own code (library and native frames
/// below it dropped), with no native frames left; otherwise (the leaf Python frame is the
/// user's, or no frame is, or the memory was made by an import, whose module it belongs
/// to) `frames` as they are. `native` is how many of `frames`, at the leaf end, are
/// native. Returns the frames and their native count.
pub fn blamed(frames: &[String], native: usize) -> (Vec<String>, usize) {
    let python = frames.len().saturating_sub(native);
    let unchanged = || (frames.to_vec(), native);
    let import = frames.iter().any(|f| f.contains("<frozen importlib"));
    if python == 0 || import || !is_library_frame(&frames[python - 1]) {
        return unchanged();
    }
    match frames[..python]
        .iter()
        .rposition(|f| frame_path(f).is_some() && !is_library_frame(f))
    {
        Some(user) => (frames[..=user].to_vec(), 0),
        None => unchanged(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn v(frames: &[&str]) -> Vec<String> {
        frames.iter().map(|f| (*f).to_owned()).collect()
    }

    #[test]
    fn library_frames_are_the_standard_librarys_packages_and_frozen_modules() {
        for lib in [
            "gather (/root/.pyenv/versions/3.12.1/lib/python3.12/asyncio/tasks.py:831)",
            "copy (/usr/lib/python3.11/copy.py:71)",
            "get (/srv/venv/lib/python3.12/site-packages/requests/api.py:73)",
            "f (/usr/lib/python3/dist-packages/yaml/__init__.py:81)",
            "_find_and_load (<frozen importlib._bootstrap>:1360)",
        ] {
            assert!(is_library_frame(lib), "{lib}");
        }
        for user in [
            "serve (/srv/app/server.py:26)",
            "<module> (/home/me/lib/tool.py:3)",
            "malloc (libc.so.6)",
            "[stack lost]",
        ] {
            assert!(!is_library_frame(user), "{user}");
        }
    }

    #[test]
    fn a_library_leaf_is_blamed_on_the_innermost_user_frame() {
        let stack = v(&[
            "main (/srv/app.py:37)",
            "serve (/srv/app.py:26)",
            "gather (/usr/lib/python3.12/asyncio/tasks.py:831)",
            "BaseEventLoop.create_task (/usr/lib/python3.12/asyncio/base_events.py:456)",
            "_PyObject_Malloc (libpython3.12.so) [native]",
        ]);
        assert_eq!(blamed(&stack, 1), (stack[..2].to_vec(), 0));
        // A user leaf keeps its stack, native frames included.
        let user_leaf = v(&[
            "main (/srv/app.py:37)",
            "PyList_Append (python3.12) [native]",
        ]);
        assert_eq!(blamed(&user_leaf, 1), (user_leaf.clone(), 1));
        // An import's memory is the imported module's.
        let import = v(&[
            "<module> (/srv/app.py:1)",
            "_find_and_load (<frozen importlib._bootstrap>:1360)",
            "<module> (/usr/lib/python3.12/json/decoder.py:30)",
        ]);
        assert_eq!(blamed(&import, 0), (import.clone(), 0));
        // No user frame at all: nothing to blame instead.
        let all_lib = v(&["_find_and_load (<frozen importlib._bootstrap>:1360)"]);
        assert_eq!(blamed(&all_lib, 0), (all_lib.clone(), 0));
        let native = v(&["Py_InitializeFromConfig (python3.12)"]);
        assert_eq!(blamed(&native, 1), (native.clone(), 1));
    }
}
