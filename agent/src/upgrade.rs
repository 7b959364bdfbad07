//! Self-upgrade with the system package manager, guarded by a watchdog that is not
//! the new version's code.
//!
//! When the effective configuration names a `keel-agent` version other than the
//! running one, the agent:
//! 1. downloads the new package for its package manager (deb or rpm) and checks its
//!    SHA-256 and Ed25519 signature against the pinned release key;
//! 2. makes sure it holds the package of the running version (kept from the last
//!    upgrade, or downloaded and checked the same way);
//! 3. records the attempt in `<state>/upgrade/pending.json`, copies its own (old)
//!    executable to `<state>/upgrade/watchdog`, and starts it detached (with
//!    `systemd-run` when systemd runs, so a service restart does not kill it);
//! 4. the watchdog installs the new package and stops the old agent, so that the
//!    service manager starts the new binary;
//! 5. the new agent proves itself by connecting and getting its heartbeat
//!    acknowledged, then writes `alive` and reports success on the task;
//! 6. if `alive` does not appear within `upgrade.watchdog_window`, the watchdog
//!    writes `failed.json`, reinstalls the previous package and stops whatever runs;
//!    the previous version starts again and reports the failure on the task.
//!
//! A new version that crashes at start-up is rolled back all the same: the decision
//! is the watchdog's, which is the old code.
//!
//! A rolled-back package is remembered in `rolled-back.json` and not tried again
//! when the server merely repeats the configuration (as it does on every connect);
//! a `sync-config` task, an operator's explicit request, tries it again.

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

use keel_common::time::now_ms;
use nix::sys::signal::{Signal, kill};
use nix::unistd::Pid;
use serde::{Deserialize, Serialize};
use tracing::{info, warn};

use crate::config::AgentConfig;
use crate::plugin::PluginConfig;
use crate::plugin::install::Installer;

/// The component name of the agent in the configuration.
pub const COMPONENT: &str = keel_proto::product::KEEL_AGENT;

/// A watchdog that disappears without finishing is given up on after this much
/// more than its window.
const STALE_AFTER: Duration = Duration::from_secs(600);
/// How often the watchdog looks whether the new version is connected.
const WATCHDOG_POLL: Duration = Duration::from_millis(250);
/// How long a new upgrade waits for the last one's watchdog, which has seen this
/// version connected, to finish.
const FINISHING: Duration = Duration::from_secs(2);

/// The attempt in progress, shared by the old agent, the watchdog and the new agent.
#[derive(Debug, Clone, Serialize, Deserialize)]
struct Pending {
    token: String,
    from: String,
    to: String,
    started_at: i64,
    window_secs: u64,
    install: Vec<String>,
    new_package: PathBuf,
    previous_package: PathBuf,
    agent_pid: u32,
    plugins: String,
    #[serde(default)]
    sha256: String,
}

#[derive(Debug, Serialize, Deserialize)]
struct Failed {
    reason: String,
}

/// The package the last rollback came from.
#[derive(Debug, Serialize, Deserialize)]
struct RolledBack {
    version: String,
    sha256: String,
    reason: String,
}

/// Why an upgrade to `entry` that nobody explicitly asked for (no task token) is
/// not attempted: its very package was rolled back before.
pub fn held_back(state_dir: &Path, entry: &PluginConfig) -> Option<String> {
    read::<RolledBack>(&dir(state_dir).join("rolled-back.json"))
        .filter(|r| r.version == entry.version && r.sha256.eq_ignore_ascii_case(&entry.sha256))
        .map(|r| r.reason)
}

#[derive(Debug, Serialize, Deserialize)]
struct Current {
    version: String,
}

#[derive(Debug, Deserialize)]
struct Rollback {
    version: String,
    sha256: String,
    signature: String,
    download_urls: Vec<String>,
}

#[derive(Debug, Default, Deserialize)]
struct Detail {
    #[serde(default)]
    rollback: Option<Rollback>,
}

fn dir(state_dir: &Path) -> PathBuf {
    state_dir.join("upgrade")
}

fn read<T: serde::de::DeserializeOwned>(path: &Path) -> Option<T> {
    std::fs::read(path).ok().and_then(|b| serde_json::from_slice(&b).ok())
}

fn write<T: Serialize>(path: &Path, value: &T) -> std::io::Result<()> {
    let json = serde_json::to_vec_pretty(value).map_err(std::io::Error::other)?;
    keel_common::fsutil::write_private(path, &json)
}

/// The package manager the agent upgrades itself with: configured, or detected.
pub fn package_type(cfg: &AgentConfig) -> Option<String> {
    if !cfg.upgrade.package_type.is_empty() {
        return Some(cfg.upgrade.package_type.clone());
    }
    if Path::new("/usr/bin/dpkg").exists() {
        Some("deb".into())
    } else if Path::new("/usr/bin/rpm").exists() {
        Some("rpm".into())
    } else {
        None
    }
}

fn install_command(cfg: &AgentConfig, kind: &str) -> Vec<String> {
    if !cfg.upgrade.install_command.is_empty() {
        return cfg.upgrade.install_command.clone();
    }
    match kind {
        "rpm" => vec!["rpm".into(), "-U".into(), "--oldpackage".into(), "--replacepkgs".into()],
        _ => vec!["dpkg".into(), "-i".into()],
    }
}

/// Refuses while another upgrade is in progress. The upgrade to this very
/// version may still be finishing: this process has said it is connected, and
/// the watchdog cleans up within a poll, which is waited for (at most
/// [`FINISHING`]).
async fn none_in_progress(up: &Path) -> Result<(), String> {
    let deadline = Instant::now() + FINISHING;
    while let Some(p) = read::<Pending>(&up.join("pending.json")) {
        let alive = std::fs::read_to_string(up.join("alive")).is_ok_and(|v| v.trim() == p.to);
        if p.to != keel_common::VERSION || !alive || Instant::now() >= deadline {
            return Err(format!("an upgrade from {} to {} is already in progress", p.from, p.to));
        }
        tokio::time::sleep(WATCHDOG_POLL / 5).await;
    }
    Ok(())
}

/// Starts an upgrade to `entry`. `Ok` means the watchdog runs and will stop this
/// process; the outcome is reported on `token` by whichever version runs next.
pub async fn begin(
    cfg: &AgentConfig,
    installer: &Installer,
    entry: &PluginConfig,
    token: &str,
    plugins: &str,
) -> Result<(), String> {
    let state = &cfg.agent.state_dir;
    let up = dir(state);
    none_in_progress(&up).await?;
    let kind = package_type(cfg).ok_or("no package manager (dpkg or rpm) found; set upgrade.package_type")?;
    let running = keel_common::VERSION;
    keel_common::fsutil::create_dir(&up, 0o700).map_err(|e| format!("{}: {e}", up.display()))?;
    let new_package = up.join(format!("keel-agent-{}.{kind}", entry.version));
    installer
        .fetch_verified(
            COMPONENT,
            &entry.download_urls,
            &entry.sha256,
            &entry.signature,
            &new_package,
        )
        .await
        .map_err(|e| format!("package of {} refused: {e}", entry.version))?;

    // The package of the running version, to go back to.
    let previous_package = up.join(format!("keel-agent-{running}.{kind}"));
    let kept =
        read::<Current>(&up.join("current.json")).is_some_and(|c| c.version == running) && previous_package.exists();
    if !kept {
        let detail: Detail = if entry.detail.is_empty() {
            Detail::default()
        } else {
            serde_json::from_str(&entry.detail).unwrap_or_default()
        };
        let rollback = detail.rollback.filter(|r| r.version == running).ok_or_else(|| {
            format!(
                "no package of the running version {running} to roll back to; upload it to the component store first"
            )
        })?;
        installer
            .fetch_verified(
                COMPONENT,
                &rollback.download_urls,
                &rollback.sha256,
                &rollback.signature,
                &previous_package,
            )
            .await
            .map_err(|e| format!("package of the running version {running} refused: {e}"))?;
        write(
            &up.join("current.json"),
            &Current {
                version: running.to_owned(),
            },
        )
        .map_err(|e| e.to_string())?;
    }

    let pending = Pending {
        token: token.to_owned(),
        from: running.to_owned(),
        to: entry.version.clone(),
        started_at: now_ms(),
        window_secs: cfg.upgrade.watchdog_window.as_secs().max(1),
        install: install_command(cfg, &kind),
        new_package,
        previous_package,
        agent_pid: std::process::id(),
        plugins: plugins.to_owned(),
        sha256: entry.sha256.clone(),
    };
    write(&up.join("pending.json"), &pending).map_err(|e| e.to_string())?;
    let _ = std::fs::remove_file(up.join("rolled-back.json"));
    let _ = std::fs::remove_file(up.join("alive"));
    let _ = std::fs::remove_file(up.join("failed.json"));

    // The watchdog is this (old) executable, copied so the package manager cannot
    // replace it underneath.
    let watchdog = up.join("watchdog");
    let copied = std::fs::copy("/proc/self/exe", &watchdog)
        .and_then(|_| std::fs::set_permissions(&watchdog, std::os::unix::fs::PermissionsExt::from_mode(0o700)));
    if let Err(e) = copied.and_then(|()| spawn_watchdog(&watchdog, state)) {
        let _ = std::fs::remove_file(up.join("pending.json"));
        return Err(format!("cannot start the upgrade watchdog: {e}"));
    }
    info!(from = running, to = %entry.version, "upgrade started; the watchdog installs the new package");
    Ok(())
}

fn spawn_watchdog(watchdog: &Path, state_dir: &Path) -> std::io::Result<()> {
    let systemd = Path::new("/run/systemd/system").exists() && Path::new("/usr/bin/systemd-run").exists();
    let log = std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(dir(state_dir).join("watchdog.log"))?;
    let mut cmd = if systemd {
        // Outside the agent's cgroup: a service restart must not take it along.
        let mut c = Command::new("/usr/bin/systemd-run");
        c.args([
            "--collect",
            "--quiet",
            "--unit",
            &format!("keel-agent-upgrade-{}", now_ms()),
        ])
        .arg(watchdog);
        c
    } else {
        Command::new(watchdog)
    };
    use std::os::unix::process::CommandExt;
    cmd.arg("upgrade-watchdog")
        .arg("--state-dir")
        .arg(state_dir)
        .stdin(std::process::Stdio::null())
        .stdout(log.try_clone()?)
        .stderr(log)
        .process_group(0);
    let mut child = cmd.spawn()?;
    if systemd {
        child.wait()?;
    } else {
        // Reaped by whoever outlives it; the agent is about to be stopped anyway.
        std::thread::spawn(move || child.wait());
    }
    Ok(())
}

/// What an agent finds about an upgrade when it starts.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Found {
    /// No upgrade.
    Nothing,
    /// This is the new version: prove it runs, then report success.
    Upgraded {
        /// Task token.
        token: String,
        /// The version it replaced.
        from: String,
        /// What happened to the plugins in the same configuration.
        plugins: String,
    },
    /// The upgrade failed and this is the previous version again: report it.
    RolledBack {
        /// Task token.
        token: String,
        /// Why.
        reason: String,
    },
    /// The watchdog is still at work.
    InProgress,
}

/// Looks at the upgrade state when the agent starts, and cleans up what is finished.
pub fn on_start(state_dir: &Path) -> Found {
    let up = dir(state_dir);
    let Some(p) = read::<Pending>(&up.join("pending.json")) else {
        return Found::Nothing;
    };
    let remember = |reason: &str| {
        let r = RolledBack {
            version: p.to.clone(),
            sha256: p.sha256.clone(),
            reason: reason.to_owned(),
        };
        if let Err(e) = write(&up.join("rolled-back.json"), &r) {
            warn!(error = %e, "cannot record the rolled-back version");
        }
    };
    if let Some(f) = read::<Failed>(&up.join("failed.json")) {
        for done in ["pending.json", "failed.json", "alive", "new.pid"] {
            let _ = std::fs::remove_file(up.join(done));
        }
        remember(&f.reason);
        return Found::RolledBack {
            token: p.token,
            reason: f.reason,
        };
    }
    // Whatever runs now, the watchdog stops it if it has to roll back: this may be
    // the new version, or a package that holds another version than it claimed.
    let _ = std::fs::write(up.join("new.pid"), std::process::id().to_string());
    if keel_common::VERSION == p.to {
        if std::fs::read_to_string(up.join("alive")).is_ok_and(|v| v.trim() == p.to) {
            return Found::InProgress;
        }
        return Found::Upgraded {
            token: p.token,
            from: p.from,
            plugins: p.plugins,
        };
    }
    let stale = now_ms() - p.started_at
        > i64::try_from((Duration::from_secs(p.window_secs) + STALE_AFTER).as_millis()).unwrap_or(i64::MAX);
    if stale {
        let _ = std::fs::remove_file(up.join("pending.json"));
        let _ = std::fs::remove_file(up.join("new.pid"));
        let reason = format!("the upgrade watchdog for {} never finished", p.to);
        remember(&reason);
        return Found::RolledBack { token: p.token, reason };
    }
    Found::InProgress
}

/// Called by the new version once its heartbeat was acknowledged.
pub fn mark_alive(state_dir: &Path) -> std::io::Result<()> {
    keel_common::fsutil::write_private(&dir(state_dir).join("alive"), keel_common::VERSION.as_bytes())
}

fn log(line: &str) {
    // The watchdog's stdout is its log file.
    println!("{} {line}", keel_common::time::rfc3339_ms(now_ms()));
}

fn run_install(install: &[String], package: &Path) -> Result<(), String> {
    let (prog, args) = install.split_first().ok_or("empty install command")?;
    let out = Command::new(prog)
        .args(args)
        .arg(package)
        .output()
        .map_err(|e| format!("{prog}: {e}"))?;
    if out.status.success() {
        Ok(())
    } else {
        let err = String::from_utf8_lossy(&out.stderr);
        let tail: String = err
            .lines()
            .rev()
            .take(3)
            .collect::<Vec<_>>()
            .into_iter()
            .rev()
            .collect::<Vec<_>>()
            .join("; ");
        Err(format!("{prog} exited with {}: {tail}", out.status))
    }
}

/// SIGTERM to one process. Never 0 or 1: `kill(0)` would signal the whole
/// process group and `kill(1)` init.
fn stop(pid: u32) {
    if let Ok(pid) = i32::try_from(pid)
        && pid > 1
    {
        let _ = kill(Pid::from_raw(pid), Signal::SIGTERM);
    }
}

/// `keel-agent upgrade-watchdog`: installs the new package, then waits for the new
/// version to prove itself or rolls back. Runs detached from the agent.
pub fn watchdog(state_dir: &Path) -> Result<(), String> {
    let up = dir(state_dir);
    let p: Pending = read(&up.join("pending.json")).ok_or("no upgrade pending")?;
    log(&format!("installing {} (from {})", p.to, p.from));
    // `old_running`: the install failed, so the old agent never was stopped; it is
    // stopped now to start again and report. Otherwise its PID may belong to
    // another process by now and is left alone.
    let fail = |reason: String, old_running: bool| -> Result<(), String> {
        log(&format!("rolling back: {reason}"));
        write(&up.join("failed.json"), &Failed { reason: reason.clone() }).map_err(|e| e.to_string())?;
        if let Err(e) = run_install(&p.install, &p.previous_package) {
            log(&format!("reinstalling {} failed: {e}", p.from));
        }
        if let Some(pid) = std::fs::read_to_string(up.join("new.pid"))
            .ok()
            .and_then(|s| s.trim().parse().ok())
        {
            stop(pid);
        }
        if old_running {
            stop(p.agent_pid);
        }
        Err(reason)
    };
    if let Err(e) = run_install(&p.install, &p.new_package) {
        return fail(
            format!("installing {} failed: {e}; rolled back to {}", p.to, p.from),
            true,
        );
    }
    // Stop the old agent; the service manager starts the new binary.
    stop(p.agent_pid);
    let deadline = Instant::now() + Duration::from_secs(p.window_secs);
    while Instant::now() < deadline {
        if std::fs::read_to_string(up.join("alive")).is_ok_and(|v| v.trim() == p.to) {
            log(&format!("{} is connected; upgrade done", p.to));
            let _ = std::fs::rename(
                &p.new_package,
                up.join(format!("keel-agent-{}.{}", p.to, ext(&p.new_package))),
            );
            let _ = std::fs::remove_file(&p.previous_package);
            let _ = write(&up.join("current.json"), &Current { version: p.to.clone() });
            for done in ["pending.json", "alive", "new.pid"] {
                let _ = std::fs::remove_file(up.join(done));
            }
            return Ok(());
        }
        std::thread::sleep(WATCHDOG_POLL);
    }
    warn!(to = %p.to, "new version did not prove itself in time");
    fail(
        format!(
            "{} did not connect and send a heartbeat within {} s; rolled back to {}",
            p.to, p.window_secs, p.from
        ),
        false,
    )
}

fn ext(path: &Path) -> String {
    path.extension().and_then(|e| e.to_str()).unwrap_or("pkg").to_owned()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn pending(state: &Path, to: &str, started_at: i64) {
        let up = dir(state);
        std::fs::create_dir_all(&up).unwrap();
        let p = Pending {
            token: "t1".into(),
            from: "0.0.1".into(),
            to: to.into(),
            started_at,
            window_secs: 1,
            install: vec!["true".into()],
            new_package: up.join("new.deb"),
            previous_package: up.join("old.deb"),
            agent_pid: 0,
            plugins: String::new(),
            sha256: "ab".into(),
        };
        write(&up.join("pending.json"), &p).unwrap();
    }

    #[test]
    fn start_up_reads_the_attempt() {
        let state = tempfile::tempdir().unwrap();
        assert_eq!(on_start(state.path()), Found::Nothing);
        pending(state.path(), keel_common::VERSION, now_ms());
        assert!(matches!(on_start(state.path()), Found::Upgraded { ref token, .. } if token == "t1"));
        mark_alive(state.path()).unwrap();
        assert_eq!(on_start(state.path()), Found::InProgress, "reported once only");

        pending(state.path(), "99.0.0", now_ms());
        assert_eq!(
            on_start(state.path()),
            Found::InProgress,
            "the watchdog is still at work"
        );
        write(&dir(state.path()).join("failed.json"), &Failed { reason: "r".into() }).unwrap();
        assert_eq!(
            on_start(state.path()),
            Found::RolledBack {
                token: "t1".into(),
                reason: "r".into()
            }
        );
        assert_eq!(on_start(state.path()), Found::Nothing, "cleaned up");
        let entry = |version: &str, sha256: &str| PluginConfig {
            name: COMPONENT.into(),
            version: version.into(),
            kind: Err("deb".into()),
            sha256: sha256.into(),
            signature: String::new(),
            download_urls: Vec::new(),
            detail: String::new(),
            local: None,
        };
        assert_eq!(held_back(state.path(), &entry("99.0.0", "AB")).as_deref(), Some("r"));
        assert_eq!(
            held_back(state.path(), &entry("99.0.0", "cd")),
            None,
            "another package of it"
        );
        assert_eq!(held_back(state.path(), &entry("99.0.1", "ab")), None, "another version");

        pending(state.path(), "99.0.0", 0);
        assert!(
            matches!(on_start(state.path()), Found::RolledBack { .. }),
            "a watchdog that vanished is given up on"
        );
    }

    #[tokio::test]
    async fn a_new_upgrade_waits_only_for_the_last_one_finishing() {
        let state = tempfile::tempdir().unwrap();
        let up = dir(state.path());
        assert_eq!(none_in_progress(&up).await, Ok(()));
        pending(state.path(), "99.0.0", now_ms());
        let err = none_in_progress(&up).await.unwrap_err();
        assert!(err.contains("from 0.0.1 to 99.0.0 is already in progress"), "{err}");
        // This version, not yet seen connected: in progress.
        pending(state.path(), keel_common::VERSION, now_ms());
        assert!(none_in_progress(&up).await.is_err());
        // Seen connected: the watchdog finishes within a poll.
        mark_alive(state.path()).unwrap();
        let pending_file = up.join("pending.json");
        let watchdog = tokio::spawn(async move {
            tokio::time::sleep(WATCHDOG_POLL).await;
            std::fs::remove_file(pending_file).unwrap();
        });
        assert_eq!(none_in_progress(&up).await, Ok(()));
        watchdog.await.unwrap();
    }

    #[test]
    fn a_new_version_that_never_proves_itself_is_rolled_back() {
        let state = tempfile::tempdir().unwrap();
        pending(state.path(), "99.0.0", now_ms());
        let err = watchdog(state.path()).unwrap_err();
        assert!(err.contains("did not connect"), "{err}");
        let f: Failed = read(&dir(state.path()).join("failed.json")).unwrap();
        assert!(f.reason.contains("rolled back to 0.0.1"));
    }
}
