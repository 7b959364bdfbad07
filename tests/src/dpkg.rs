//! Real packages in throwaway roots: where `./build.sh test` put them, and dpkg run
//! on an empty root.

use std::path::{Path, PathBuf};
use std::process::Command;

use tempfile::TempDir;

/// The directory of the deb and rpm packages `./build.sh test` builds (versions
/// 1.0.0 and 1.0.1), or `None` (with a note on stderr) when it is not set.
pub fn packages() -> Option<PathBuf> {
    match std::env::var_os("KEEL_TEST_PACKAGES") {
        Some(dir) => Some(PathBuf::from(dir)),
        None => {
            eprintln!("SKIPPED: KEEL_TEST_PACKAGES is not set (./build.sh test builds the packages and sets it)");
            None
        }
    }
}

/// The path of a deb in `dir`.
pub fn deb(dir: &Path, name: &str, version: &str) -> PathBuf {
    dir.join(format!("{name}_{version}_amd64.deb"))
}

/// Runs a command that must succeed; returns its stdout.
pub fn run(cmd: &mut Command) -> String {
    let out = cmd.output().unwrap_or_else(|e| panic!("{cmd:?}: {e}"));
    assert!(
        out.status.success(),
        "{cmd:?} failed: {}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// An empty root for dpkg: its database and the account files useradd edits.
pub fn throwaway_root() -> TempDir {
    let root = tempfile::tempdir().expect("tempdir");
    let r = root.path();
    std::fs::create_dir_all(r.join("var/lib/dpkg/info")).expect("dpkg dir");
    std::fs::create_dir_all(r.join("var/lib/dpkg/updates")).expect("dpkg dir");
    std::fs::create_dir_all(r.join("var/lib/dpkg/alternatives")).expect("alternatives dir");
    std::fs::create_dir_all(r.join("etc/alternatives")).expect("alternatives dir");
    std::fs::create_dir_all(r.join("etc")).expect("etc");
    for (f, text) in [
        ("var/lib/dpkg/status", ""),
        ("var/lib/dpkg/available", ""),
        ("etc/passwd", "root:x:0:0:root:/root:/bin/sh\n"),
        ("etc/group", "root:x:0:\n"),
        ("etc/shadow", "root:*:19000:0:99999:7:::\n"),
        ("etc/gshadow", "root:*::\n"),
    ] {
        std::fs::write(r.join(f), text).expect("root file");
    }
    root
}

/// The dpkg command line for `root`: maintainer scripts run outside it with
/// `DPKG_ROOT` set, as on a machine without systemd; its dependencies (libc6,
/// passwd) are not in the empty root.
pub fn dpkg_command(root: &Path) -> Vec<String> {
    vec![
        "dpkg".into(),
        format!("--root={}", root.display()),
        format!("--admindir={}", root.join("var/lib/dpkg").display()),
        "--force-script-chrootless".into(),
        "--force-depends".into(),
    ]
}

/// Runs dpkg on `root` with `args` and `pkgs`.
pub fn dpkg(root: &Path, args: &[&str], pkgs: &[PathBuf]) -> String {
    let base = dpkg_command(root);
    let mut cmd = Command::new(&base[0]);
    cmd.args(&base[1..]).args(args).args(pkgs);
    run(&mut cmd)
}
