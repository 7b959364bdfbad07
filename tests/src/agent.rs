//! A `keel-agent` of a test's own ([`Agent`]): its configuration, enrollment and
//! process.

use std::path::PathBuf;
use std::process::{Child, Command, ExitStatus, Output, Stdio};
use std::time::Duration;

use tempfile::TempDir;

use crate::{Server, bin, failure_report, netns, output_ok, signal, toml_path, wait_bounded};

/// A `keel-agent` with its own state directory.
#[derive(Debug)]
pub struct Agent {
    /// State, logs and configuration.
    pub dir: TempDir,
    /// Its `agent.toml`.
    pub config: PathBuf,
    /// Its ID.
    pub id: String,
    /// The `keel-agent` executable it runs: the workspace build unless replaced.
    pub exe: PathBuf,
    child: Option<Child>,
}

impl Agent {
    /// An agent configured for `server` with an explicit ID. `extra` is TOML
    /// appended at the end (it may open sections other than the ones written here).
    pub fn new(server: &Server, id: &str, extra: &str) -> Agent {
        Agent::with(server, id, "", extra)
    }

    /// Like [`Agent::new`], with `plugins` added to the `[plugins]` section.
    pub fn with(server: &Server, id: &str, plugins: &str, extra: &str) -> Agent {
        let dir = tempfile::tempdir().expect("tempdir");
        let config = dir.path().join("agent.toml");
        let key = server.release_public.as_deref().unwrap_or_default();
        let text = format!(
            "[agent]\nid = {id:?}\nstate_dir = {}\nlog_dir = {}\nheartbeat_interval = \"2s\"\nshutdown_grace = \"5s\"\n\
             [server]\nprivate = [\"{}\"]\nbackoff_min = \"200ms\"\nbackoff_max = \"1s\"\n\
             [plugins]\nrelease_public_key = {key:?}\nplugin_stop_grace = \"1s\"\nstop_grace = \"2s\"\nrestart_backoff_min = \"200ms\"\nrestart_backoff_max = \"2s\"\n{plugins}\n{extra}\n",
            toml_path(&dir.path().join("state")),
            toml_path(&dir.path().join("log")),
            server.grpc
        );
        std::fs::write(&config, text).expect("write agent.toml");
        Agent {
            dir,
            config,
            id: id.to_owned(),
            exe: bin("keel-agent"),
            child: None,
        }
    }

    /// An enrolled agent, not yet running.
    pub fn enrolled(server: &Server, id: &str) -> Agent {
        Agent::enrolled_with(server, id, "")
    }

    /// An enrolled agent with extra `[plugins]` settings, not yet running.
    pub fn enrolled_with(server: &Server, id: &str, plugins: &str) -> Agent {
        let agent = Agent::with(server, id, plugins, "");
        let out = agent.enroll(server, &server.enrollment_token(1, "10m"), Some(&server.fingerprint()));
        assert_eq!(output_ok(out, "keel-agent enroll"), id);
        agent
    }

    /// `keel-agent --config … <args>`.
    pub fn cmd(&self, args: &[&str]) -> Command {
        let mut cmd = Command::new(&self.exe);
        cmd.arg("--config").arg(&self.config).args(args).env_remove("KEEL_LOG");
        cmd
    }

    /// Runs `keel-agent enroll` against `server`.
    pub fn enroll(&self, server: &Server, token: &str, fingerprint: Option<&str>) -> Output {
        let mut cmd = self.cmd(&["enroll", "--server", &server.base_url()]);
        if let Some(fp) = fingerprint {
            cmd.arg("--ca-fingerprint").arg(fp);
        }
        cmd.env("KEEL_ENROLL_TOKEN", token)
            .output()
            .expect("run keel-agent enroll")
    }

    /// Runs `keel-agent enroll --key-file` against `server` with `key` in a 0600
    /// file; the lookup ID is the configured agent ID (none: by address).
    pub fn enroll_by_key(&self, server: &Server, key: &str) -> Output {
        let path = self.dir.path().join("agent.key");
        keel_common::fsutil::write_private(&path, format!("{key}\n").as_bytes()).expect("write the key file");
        self.cmd(&[
            "enroll",
            "--server",
            &server.base_url(),
            "--ca-fingerprint",
            &server.fingerprint(),
        ])
        .arg("--key-file")
        .arg(&path)
        .output()
        .expect("run keel-agent enroll")
    }

    pub(crate) fn log_path(&self) -> PathBuf {
        self.dir.path().join("agent.stderr")
    }

    /// Starts `keel-agent run`.
    pub fn start(&mut self) {
        self.start_with_env(&[]);
    }

    /// Starts `keel-agent run` with `vars` added to its environment.
    pub fn start_with_env(&mut self, vars: &[(&str, &str)]) {
        let mut cmd = self.cmd(&["run"]);
        cmd.envs(vars.iter().copied());
        self.spawn(cmd);
    }

    /// Runs the agent inside network namespace `ns` (see [`netns::NetNs`]).
    pub fn start_in(&mut self, ns: &netns::NetNs) {
        let mut cmd = Command::new("ip");
        cmd.args(["netns", "exec", &ns.name])
            .arg(&self.exe)
            .arg("--config")
            .arg(&self.config)
            .arg("run")
            .env_remove("KEEL_LOG");
        self.spawn(cmd);
    }

    /// Starts `keel-agent run` holding `fd` open without close-on-exec, as a
    /// careless parent process would leave it.
    pub fn start_with_inherited_fd(&mut self, fd: u32) {
        let mut cmd = Command::new("sh");
        cmd.arg("-c")
            .arg(format!("exec {fd}</dev/null; exec \"$0\" \"$@\""))
            .arg(&self.exe)
            .arg("--config")
            .arg(&self.config)
            .arg("run")
            .env_remove("KEEL_LOG");
        self.spawn(cmd);
    }

    fn spawn(&mut self, mut cmd: Command) {
        assert!(self.child.is_none(), "agent already running");
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(self.log_path())
            .expect("log file");
        let child = cmd
            .env("KEEL_LOG", crate::log_filter("info,keel_agent=debug"))
            .stdout(Stdio::null())
            .stderr(log)
            .spawn()
            .expect("spawn keel-agent");
        self.child = Some(child);
    }

    /// The process ID while running.
    pub fn pid(&self) -> Option<u32> {
        self.child.as_ref().map(Child::id)
    }

    /// SIGKILLs the agent (its plugins live on until they find their pipes gone).
    pub fn kill(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }

    /// SIGTERM, and the exit status if it stopped within `limit`.
    pub fn stop_within(&mut self, limit: Duration) -> Option<ExitStatus> {
        let mut child = self.child.take()?;
        signal(&child, nix::sys::signal::Signal::SIGTERM);
        let status = wait_bounded(&mut child, limit);
        if status.is_none() {
            let _ = child.kill();
            let _ = child.wait();
        }
        status
    }

    /// Everything the agent logged to stderr so far.
    pub fn log(&self) -> String {
        std::fs::read_to_string(self.log_path()).unwrap_or_default()
    }

    /// The state directory.
    pub fn state_dir(&self) -> PathBuf {
        self.dir.path().join("state")
    }
}

impl Drop for Agent {
    fn drop(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
        if std::thread::panicking() {
            eprintln!("---- keel-agent {} log ----\n{}", self.id, failure_report(&self.log()));
        }
    }
}
