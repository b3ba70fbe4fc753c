//! tracefs, which aya needs to find tracepoint ids: mounted on demand.

use std::path::Path;

use crate::errors::UserError;

/// Mounts tracefs at /sys/kernel/tracing unless it (or debugfs's copy) is already there.
pub fn ensure_mounted() -> Result<(), UserError> {
    if Path::new("/sys/kernel/tracing/events").exists()
        || Path::new("/sys/kernel/debug/tracing/events").exists()
    {
        return Ok(());
    }
    let status = std::process::Command::new("mount")
        .args(["-t", "tracefs", "tracefs", "/sys/kernel/tracing"])
        .output()
        .map_err(|e| UserError::NoTracefs(e.to_string()))?;
    if !status.status.success() || !Path::new("/sys/kernel/tracing/events").exists() {
        return Err(UserError::NoTracefs(
            String::from_utf8_lossy(&status.stderr).trim().to_owned(),
        ));
    }
    Ok(())
}
