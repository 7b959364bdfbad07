//! For tests: a file system of a test's own, to fill up. Needs root, as Keel's
//! tests run.

use std::path::{Path, PathBuf};
use std::process::Command;

/// A tmpfs mounted at a directory, unmounted when dropped.
#[derive(Debug)]
pub struct TmpFs(PathBuf);

impl TmpFs {
    /// Mounts a tmpfs of `size` (`mount -o size=`, e.g. `6m`) at `at`, creating the
    /// directory. Panics when it cannot: a test that needs it cannot run without.
    pub fn mount(at: &Path, size: &str) -> Self {
        if let Err(e) = std::fs::create_dir_all(at) {
            panic!("creating {}: {e}", at.display());
        }
        let ok = Command::new("mount")
            .args(["-t", "tmpfs", "-o", &format!("size={size},mode=0700"), "tmpfs"])
            .arg(at)
            .status()
            .is_ok_and(|s| s.success());
        assert!(ok, "mounting a tmpfs at {} (tests run as root)", at.display());
        Self(at.to_path_buf())
    }
}

impl Drop for TmpFs {
    fn drop(&mut self) {
        let _ = Command::new("umount").arg("-l").arg(&self.0).status();
    }
}
