//! Small tools every part of the harness uses: free ports, workspace binaries,
//! waiting on a condition with a deadline ([`eventually`]), signals and bounded
//! waits for child processes.

use std::future::Future;
use std::path::{Path, PathBuf};
use std::process::{Child, ExitStatus, Output};
use std::time::{Duration, Instant};

/// A port free on 127.0.0.1 now, for a process that must be told its port
/// before it starts.
pub fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .expect("a free port")
        .port()
}

/// How long [`eventually`] waits by default.
pub const DEADLINE: Duration = Duration::from_secs(30);

/// Path of a workspace binary of the same build as the running executable: next to
/// it (a binary such as `keel-bench`) or one level up (a test in `deps/`).
pub fn bin(name: &str) -> PathBuf {
    let exe = std::env::current_exe().expect("test executable path");
    let dir = exe.parent().expect("executable directory");
    let candidates = [dir.join(name), dir.parent().map(|p| p.join(name)).unwrap_or_default()];
    let found = candidates.iter().find(|p| p.is_file()).cloned();
    found.unwrap_or_else(|| {
        panic!(
            "{name} is missing next to {}: build the binaries first (`cargo build --bins`, or ./build.sh test)",
            exe.display()
        )
    })
}

/// Every file below `dir`, at any depth (none when it cannot be read).
pub fn files_under(dir: &Path) -> Vec<PathBuf> {
    let mut out = Vec::new();
    for entry in std::fs::read_dir(dir).into_iter().flatten().flatten() {
        let path = entry.path();
        if path.is_dir() {
            out.extend(files_under(&path));
        } else {
            out.push(path);
        }
    }
    out
}

/// Polls `check` every 50 ms until it returns `Some`, or panics naming `what`
/// after `deadline`.
pub async fn eventually_within<T, F, Fut>(deadline: Duration, what: &str, mut check: F) -> T
where
    F: FnMut() -> Fut,
    Fut: Future<Output = Option<T>>,
{
    let start = Instant::now();
    loop {
        if let Some(v) = check().await {
            return v;
        }
        assert!(
            start.elapsed() < deadline,
            "timed out after {deadline:?} waiting for {what}"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// [`eventually_within`] with the default deadline.
pub async fn eventually<T, F, Fut>(what: &str, check: F) -> T
where
    F: FnMut() -> Fut,
    Fut: Future<Output = Option<T>>,
{
    eventually_within(DEADLINE, what, check).await
}

pub(crate) fn toml_path(p: &Path) -> String {
    format!("{:?}", p.display().to_string())
}

/// Sends `sig` to `child`.
pub fn signal(child: &Child, sig: nix::sys::signal::Signal) {
    if let Ok(pid) = i32::try_from(child.id()) {
        let _ = nix::sys::signal::kill(nix::unistd::Pid::from_raw(pid), sig);
    }
}

/// Waits for `child` to exit, at most `limit`: its status, or `None` if it still runs.
pub fn wait_bounded(child: &mut Child, limit: Duration) -> Option<ExitStatus> {
    let start = Instant::now();
    loop {
        if let Ok(Some(status)) = child.try_wait() {
            return Some(status);
        }
        if start.elapsed() > limit {
            return None;
        }
        std::thread::sleep(Duration::from_millis(20));
    }
}

pub(crate) fn output_ok(out: Output, what: &str) -> String {
    assert!(
        out.status.success(),
        "{what} failed with {}: {}",
        out.status,
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).trim().to_owned()
}

/// The bytes of the test plugin executable, to upload as an `exec` package.
pub fn test_plugin() -> Vec<u8> {
    std::fs::read(bin("keel-test-plugin")).expect("keel-test-plugin binary")
}

/// The log filter of a process under test: `base`, and after it whatever
/// `KEEL_TEST_LOG` adds (say `h2=debug,rustls=debug` to follow a connection).
pub fn log_filter(base: &str) -> String {
    match std::env::var("KEEL_TEST_LOG") {
        Ok(extra) if !extra.trim().is_empty() => format!("{base},{}", extra.trim()),
        _ => base.to_owned(),
    }
}
