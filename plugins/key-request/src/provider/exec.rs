//! The exec provider: `<program> <args…> id 001` (or `ip 10.1.2.3`), run without a
//! shell, with stdin from /dev/null and stderr discarded (it could hold anything,
//! a key included), in a process group of its own so that a timeout or an
//! oversized output kills everything it started. Its stdout is the reply, at most
//! [`MAX_REPLY_BYTES`].

use std::collections::HashSet;
use std::io::{ErrorKind, Read};
use std::os::fd::AsFd;
use std::os::unix::process::{CommandExt, ExitStatusExt};
use std::process::{Child, ChildStdout, Command, ExitStatus, Stdio};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use nix::poll::{PollFd, PollFlags, PollTimeout, poll};
use nix::sys::signal::{Signal, killpg};
use nix::unistd::Pid;

use super::{MAX_REPLY_BYTES, Problem, ProviderError};
use crate::config::ExecCommand;
use crate::request::Lookup;

/// Bytes read at a time.
const READ_CHUNK: usize = 16 << 10;
/// The first and the longest pause while waiting for a program that closed its
/// stdout to exit.
const EXIT_POLL: (Duration, Duration) = (Duration::from_millis(1), Duration::from_millis(20));

/// The process groups of the programs running now, so that stopping the plugin
/// can kill them: they are in groups of their own, out of the agent's reach.
#[derive(Debug, Default)]
pub struct Children(Mutex<HashSet<i32>>);

impl Children {
    fn set(&self) -> std::sync::MutexGuard<'_, HashSet<i32>> {
        self.0.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// SIGKILLs every process group still running.
    pub fn kill_all(&self) {
        for pgid in self.set().drain() {
            let _ = killpg(Pid::from_raw(pgid), Signal::SIGKILL);
        }
    }
}

/// Removes a group from [`Children`] when its lookup is over, however it ended.
struct Registered<'a> {
    children: &'a Children,
    pgid: i32,
}

impl Drop for Registered<'_> {
    fn drop(&mut self) {
        self.children.set().remove(&self.pgid);
    }
}

/// Runs a program per lookup.
#[derive(Debug)]
pub struct ExecProvider {
    command: ExecCommand,
    via: String,
    timeout: Duration,
    children: Arc<Children>,
}

impl ExecProvider {
    /// A provider running `command`; each lookup may take `timeout`.
    pub fn new(command: ExecCommand, timeout: Duration, children: Arc<Children>) -> Self {
        let via = format!("exec {}", command.program);
        Self {
            command,
            via,
            timeout,
            children,
        }
    }

    fn error(&self, problem: Problem) -> ProviderError {
        ProviderError {
            via: self.via.clone(),
            problem,
        }
    }

    /// Runs the program for `lookup` and returns its stdout.
    pub fn run(&self, lookup: &Lookup) -> Result<Vec<u8>, ProviderError> {
        let deadline = Instant::now() + self.timeout;
        let mut child = Command::new(&self.command.program)
            .args(&self.command.args)
            .arg(lookup.by.as_str())
            .arg(&lookup.value)
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::null())
            .process_group(0)
            .spawn()
            .map_err(|e| self.error(Problem::Spawn(e.to_string())))?;
        // The child leads its own group: its PID is the group's ID.
        let pgid = i32::try_from(child.id()).unwrap_or(i32::MAX);
        self.children.set().insert(pgid);
        let _registered = Registered {
            children: &self.children,
            pgid,
        };
        let outcome = match child.stdout.take() {
            Some(stdout) => self.read(stdout, deadline),
            None => Err(self.error(Problem::Io {
                op: "read its output",
                error: "no stdout pipe".into(),
            })),
        };
        let output = match outcome {
            Ok(output) => output,
            Err(e) => {
                kill_and_reap(&mut child, pgid);
                return Err(e);
            }
        };
        let status = self.wait(&mut child, pgid, deadline)?;
        match status.code() {
            Some(0) => Ok(output),
            Some(code) => Err(self.error(Problem::Exit(code))),
            None => Err(self.error(Problem::Signal(signal_name(status)))),
        }
    }

    /// Reads stdout to end-of-file, within the deadline and the size cap.
    fn read(&self, mut stdout: ChildStdout, deadline: Instant) -> Result<Vec<u8>, ProviderError> {
        let mut output = Vec::new();
        let mut chunk = vec![0u8; READ_CHUNK];
        let io = |e: String| {
            self.error(Problem::Io {
                op: "read its output",
                error: e,
            })
        };
        loop {
            let left = deadline.saturating_duration_since(Instant::now());
            if left.is_zero() {
                return Err(self.error(Problem::TimedOut(self.timeout.as_secs())));
            }
            let wait = PollTimeout::try_from(left).unwrap_or(PollTimeout::MAX);
            let mut fds = [PollFd::new(stdout.as_fd(), PollFlags::POLLIN)];
            match poll(&mut fds, wait) {
                Ok(0) => continue,
                Ok(_) => {}
                Err(nix::errno::Errno::EINTR) => continue,
                Err(e) => return Err(io(e.to_string())),
            }
            // Readable or hung up: this read does not block.
            let n = match stdout.read(&mut chunk) {
                Ok(n) => n,
                Err(e) if e.kind() == ErrorKind::Interrupted => continue,
                Err(e) => return Err(io(e.to_string())),
            };
            if n == 0 {
                return Ok(output);
            }
            output.extend_from_slice(&chunk[..n]);
            if output.len() > MAX_REPLY_BYTES {
                return Err(self.error(Problem::OutputTooLarge));
            }
        }
    }

    /// Waits for a program that closed its stdout to exit, within the deadline.
    fn wait(&self, child: &mut Child, pgid: i32, deadline: Instant) -> Result<ExitStatus, ProviderError> {
        let mut pause = EXIT_POLL.0;
        loop {
            match child.try_wait() {
                Ok(Some(status)) => return Ok(status),
                Ok(None) => {}
                Err(e) => {
                    kill_and_reap(child, pgid);
                    return Err(self.error(Problem::Io {
                        op: "wait for it",
                        error: e.to_string(),
                    }));
                }
            }
            let left = deadline.saturating_duration_since(Instant::now());
            if left.is_zero() {
                kill_and_reap(child, pgid);
                return Err(self.error(Problem::TimedOut(self.timeout.as_secs())));
            }
            std::thread::sleep(pause.min(left));
            pause = (pause * 2).min(EXIT_POLL.1);
        }
    }
}

/// SIGKILLs the program's whole group and reaps the program.
fn kill_and_reap(child: &mut Child, pgid: i32) {
    let _ = killpg(Pid::from_raw(pgid), Signal::SIGKILL);
    let _ = child.wait();
}

fn signal_name(status: ExitStatus) -> String {
    match status.signal().map(Signal::try_from) {
        Some(Ok(sig)) => format!("{} ({sig})", sig as i32),
        Some(Err(_)) => status.signal().map(|s| s.to_string()).unwrap_or_default(),
        None => status.to_string(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::request::By;

    fn sh(script: &str, timeout: Duration) -> (ExecProvider, Arc<Children>) {
        let children = Arc::new(Children::default());
        let command = ExecCommand {
            program: "/bin/sh".into(),
            args: vec!["-c".into(), script.into(), "provider".into()],
        };
        (ExecProvider::new(command, timeout, Arc::clone(&children)), children)
    }

    fn id() -> Lookup {
        Lookup::new(By::Id, "001").unwrap()
    }

    #[test]
    fn passes_the_lookup_as_two_arguments() {
        let (p, children) = sh(r#"printf '%s|%s|%s' "$1" "$2" "$#""#, Duration::from_secs(5));
        assert_eq!(p.run(&id()).unwrap(), b"id|001|2");
        assert!(children.set().is_empty(), "deregistered");
    }

    #[test]
    fn failures_are_named() {
        let five = Duration::from_secs(5);
        let e = sh("exit 3", five).0.run(&id()).unwrap_err();
        assert_eq!(e.to_string(), "exec /bin/sh: provider exited with status 3");
        let e = sh("kill -9 $$", five).0.run(&id()).unwrap_err();
        assert_eq!(e.to_string(), "exec /bin/sh: provider killed by signal 9 (SIGKILL)");
        let e = sh("head -c 70000 /dev/zero", five).0.run(&id()).unwrap_err();
        assert_eq!(e.to_string(), "exec /bin/sh: output larger than 65536 bytes");
        let start = Instant::now();
        let e = sh("exec >&-; sleep 30", Duration::from_secs(1))
            .0
            .run(&id())
            .unwrap_err();
        assert_eq!(e.to_string(), "exec /bin/sh: timed out after 1 s");
        assert!(start.elapsed() < Duration::from_secs(5));
        let missing = ExecCommand {
            program: "/nonexistent/provider".into(),
            args: vec![],
        };
        let e = ExecProvider::new(missing, five, Arc::default()).run(&id()).unwrap_err();
        assert!(
            e.to_string()
                .starts_with("exec /nonexistent/provider: cannot run it: No such file"),
            "{e}"
        );
    }
}
