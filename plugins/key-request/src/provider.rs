//! Where keys come from: a unix socket ([`socket`]) or a program ([`exec`]). With
//! both configured the socket is used while it answers; when it does not (at the
//! start-up check, or after its connect attempts fail) lookups go to the program,
//! and the socket is tried again every [`SOCKET_RECHECK`].

pub mod exec;
pub mod socket;

use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use crate::config::Config;
use crate::request::Lookup;

pub use exec::{Children, ExecProvider};
pub use socket::SocketProvider;

/// The largest reply or output accepted from a provider, in bytes.
pub const MAX_REPLY_BYTES: usize = 64 << 10;
/// How long the socket is left alone after it failed, before it is tried again.
pub const SOCKET_RECHECK: Duration = Duration::from_secs(30);

/// A lookup that gave no reply.
#[derive(Debug, thiserror::Error)]
#[error("{via}: {problem}")]
pub struct ProviderError {
    /// `socket <path>` or `exec <program>`.
    pub via: String,
    /// What went wrong.
    pub problem: Problem,
}

/// What went wrong with a provider.
#[derive(Debug, thiserror::Error)]
pub enum Problem {
    /// Every connect attempt failed.
    #[error("cannot connect after {attempts} attempts: {error}")]
    Unreachable {
        /// Attempts made.
        attempts: usize,
        /// The last attempt's error.
        error: String,
    },
    /// No complete reply within the timeout.
    #[error("timed out after {0} s")]
    TimedOut(u64),
    /// The socket sent more than [`MAX_REPLY_BYTES`].
    #[error("reply larger than {MAX_REPLY_BYTES} bytes")]
    ReplyTooLarge,
    /// The program wrote more than [`MAX_REPLY_BYTES`] to stdout.
    #[error("output larger than {MAX_REPLY_BYTES} bytes")]
    OutputTooLarge,
    /// The socket closed without sending anything.
    #[error("closed the connection without a reply")]
    NoReply,
    /// The program could not be started.
    #[error("cannot run it: {0}")]
    Spawn(String),
    /// The program exited unsuccessfully.
    #[error("provider exited with status {0}")]
    Exit(i32),
    /// The program was killed by a signal.
    #[error("provider killed by signal {0}")]
    Signal(String),
    /// Reading or writing failed.
    #[error("{op}: {error}")]
    Io {
        /// What was being done.
        op: &'static str,
        /// The error.
        error: String,
    },
}

#[derive(Debug)]
struct Health {
    up: bool,
    checked: Instant,
}

/// The configured providers and the choice between them.
#[derive(Debug)]
pub struct Provider {
    socket: Option<SocketProvider>,
    exec: Option<ExecProvider>,
    health: Mutex<Health>,
}

impl Provider {
    /// The providers `config` names; `children` tracks the programs running.
    pub fn new(config: &Config, children: Arc<Children>) -> Self {
        Self {
            socket: config
                .socket
                .as_ref()
                .map(|p| SocketProvider::new(p.clone(), config.timeout)),
            exec: config
                .exec
                .as_ref()
                .map(|c| ExecProvider::new(c.clone(), config.timeout, children)),
            health: Mutex::new(Health {
                up: true,
                checked: Instant::now(),
            }),
        }
    }

    /// The start-up check: connects to the socket, if any, closes at once, and logs
    /// the outcome.
    pub fn check_at_start(&self) {
        let Some(socket) = &self.socket else { return };
        match socket.probe() {
            Ok(()) => tracing::info!(socket = %socket.path().display(), "socket provider answers"),
            Err(e) => {
                self.set_up(false);
                if self.exec.is_some() {
                    tracing::warn!(
                        socket = %socket.path().display(),
                        error = %e,
                        "socket provider unavailable at start-up: using exec_path, trying the socket again every {} s",
                        SOCKET_RECHECK.as_secs()
                    );
                } else {
                    tracing::warn!(
                        socket = %socket.path().display(),
                        error = %e,
                        "socket provider unavailable at start-up: lookups fail until it answers"
                    );
                }
            }
        }
    }

    fn set_up(&self, up: bool) {
        let mut h = self.health.lock().unwrap_or_else(|p| p.into_inner());
        h.up = up;
        h.checked = Instant::now();
    }

    /// Whether to ask the socket now: it is up, or it is time to try it again and
    /// it answers. (Without a program to fall back on, the socket is always asked.)
    fn socket_usable(&self, socket: &SocketProvider) -> bool {
        if self.exec.is_none() {
            return true;
        }
        let mut h = self.health.lock().unwrap_or_else(|p| p.into_inner());
        if h.up {
            return true;
        }
        if h.checked.elapsed() < SOCKET_RECHECK {
            return false;
        }
        h.checked = Instant::now();
        if socket.probe().is_ok() {
            h.up = true;
            tracing::info!(socket = %socket.path().display(), "socket provider answers again: using it");
        }
        h.up
    }

    /// Performs one lookup and returns the provider's raw reply. The reply holds
    /// the key: it goes to [`crate::reply::parse`] and nowhere else.
    pub fn lookup(&self, lookup: &Lookup) -> Result<Vec<u8>, ProviderError> {
        if let Some(socket) = &self.socket
            && self.socket_usable(socket)
        {
            match socket.request(lookup) {
                Err(e) if matches!(e.problem, Problem::Unreachable { .. }) && self.exec.is_some() => {
                    self.set_up(false);
                    tracing::warn!(
                        error = %e,
                        "socket provider unavailable: using exec_path, trying the socket again every {} s",
                        SOCKET_RECHECK.as_secs()
                    );
                }
                other => return other,
            }
        }
        match &self.exec {
            Some(exec) => exec.run(lookup),
            // Config::parse guarantees one of the two.
            None => Err(ProviderError {
                via: "key-request".into(),
                problem: Problem::Spawn("no provider configured".into()),
            }),
        }
    }
}

#[cfg(test)]
mod tests {
    use std::io::{Read, Write};
    use std::os::unix::net::UnixListener;
    use std::path::Path;

    use super::*;
    use crate::config::ExecCommand;
    use crate::request::By;

    fn config(socket: &Path) -> Config {
        Config {
            exec: Some(ExecCommand {
                program: "/bin/sh".into(),
                args: vec!["-c".into(), "printf exec".into()],
            }),
            socket: Some(socket.to_owned()),
            timeout: Duration::from_secs(5),
            threads: 1,
            queue_size: 1,
        }
    }

    /// Answers every connection with "socket".
    fn serve(path: &Path) {
        let listener = UnixListener::bind(path).unwrap();
        std::thread::spawn(move || {
            for mut conn in listener.incoming().flatten() {
                let _ = conn.read(&mut [0u8; 64]);
                let _ = conn.write_all(b"socket");
            }
        });
    }

    #[test]
    fn falls_back_to_exec_and_returns_to_the_socket_after_the_recheck_interval() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("p.sock");
        let lookup = Lookup::new(By::Id, "001").unwrap();
        let p = Provider::new(&config(&path), Arc::default());
        p.check_at_start();
        assert_eq!(p.lookup(&lookup).unwrap(), b"exec", "down at start-up: exec");
        serve(&path);
        assert_eq!(
            p.lookup(&lookup).unwrap(),
            b"exec",
            "not tried again before the interval"
        );
        p.health.lock().unwrap().checked -= SOCKET_RECHECK;
        assert_eq!(
            p.lookup(&lookup).unwrap(),
            b"socket",
            "back to the socket once it answers"
        );
    }

    #[test]
    fn a_socket_that_stops_answering_falls_back_at_once() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("p.sock");
        serve(&path);
        let lookup = Lookup::new(By::Ip, "10.0.0.1").unwrap();
        let p = Provider::new(&config(&path), Arc::default());
        p.check_at_start();
        assert_eq!(p.lookup(&lookup).unwrap(), b"socket");
        std::fs::remove_file(&path).unwrap();
        assert_eq!(p.lookup(&lookup).unwrap(), b"exec", "three failed connects: exec");
        assert!(!p.health.lock().unwrap().up);
    }

    #[test]
    fn without_a_program_the_socket_is_always_asked() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("p.sock");
        let mut c = config(&path);
        c.exec = None;
        let p = Provider::new(&c, Arc::default());
        p.check_at_start();
        let e = p.lookup(&Lookup::new(By::Id, "1").unwrap()).unwrap_err();
        assert!(matches!(e.problem, Problem::Unreachable { attempts: 3, .. }), "{e}");
        serve(&path);
        assert_eq!(p.lookup(&Lookup::new(By::Id, "1").unwrap()).unwrap(), b"socket");
    }
}
