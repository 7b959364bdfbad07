//! The socket provider: one unix-socket connection per lookup, `id:001` or
//! `ip:10.1.2.3` sent as Wazuh sends it (no newline), one reply read back: until
//! end-of-file or until the bytes so far form a complete JSON value, whichever
//! comes first, within the timeout and at most [`MAX_REPLY_BYTES`].

use std::io::{ErrorKind, Read, Write};
use std::os::fd::AsRawFd;
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use nix::sys::socket::{self, AddressFamily, SockFlag, SockType, UnixAddr, sockopt};
use nix::sys::time::{TimeVal, TimeValLike};
use serde::de::IgnoredAny;

use super::{MAX_REPLY_BYTES, Problem, ProviderError};
use crate::request::Lookup;

/// Connect attempts per lookup.
pub const CONNECT_ATTEMPTS: usize = 3;
/// The pauses between connect attempts: growing, and short, because a socket that
/// refuses connections is usually not there at all.
pub const CONNECT_PAUSES: [Duration; CONNECT_ATTEMPTS - 1] = [Duration::from_millis(100), Duration::from_millis(200)];
/// The longest a single connect may wait (for a server whose backlog is full).
pub const CONNECT_TIMEOUT: Duration = Duration::from_secs(1);
/// Bytes read at a time.
const READ_CHUNK: usize = 16 << 10;

/// Asks a unix socket.
#[derive(Debug)]
pub struct SocketProvider {
    path: PathBuf,
    via: String,
    timeout: Duration,
}

impl SocketProvider {
    /// A provider at `path`; each lookup may take `timeout`.
    pub fn new(path: PathBuf, timeout: Duration) -> Self {
        let via = format!("socket {}", path.display());
        Self { path, via, timeout }
    }

    /// The socket's path.
    pub fn path(&self) -> &Path {
        &self.path
    }

    fn error(&self, problem: Problem) -> ProviderError {
        ProviderError {
            via: self.via.clone(),
            problem,
        }
    }

    /// Connects and closes at once: whether something is listening.
    pub fn probe(&self) -> std::io::Result<()> {
        connect(&self.path, CONNECT_TIMEOUT.min(self.timeout)).map(drop)
    }

    /// Sends the lookup and returns the raw reply.
    pub fn request(&self, lookup: &Lookup) -> Result<Vec<u8>, ProviderError> {
        let start = Instant::now();
        let deadline = start + self.timeout;
        let left = || deadline.saturating_duration_since(Instant::now());
        let timed_out = || self.error(Problem::TimedOut(self.timeout.as_secs()));

        let mut stream = None;
        let mut last_error = String::new();
        for attempt in 0..CONNECT_ATTEMPTS {
            if left().is_zero() {
                return Err(timed_out());
            }
            match connect(&self.path, CONNECT_TIMEOUT.min(left())) {
                Ok(s) => {
                    stream = Some(s);
                    break;
                }
                Err(e) => last_error = e.to_string(),
            }
            if let Some(pause) = CONNECT_PAUSES.get(attempt) {
                std::thread::sleep((*pause).min(left()));
            }
        }
        let Some(mut stream) = stream else {
            return Err(self.error(Problem::Unreachable {
                attempts: CONNECT_ATTEMPTS,
                error: last_error,
            }));
        };

        let io = |op: &'static str, e: std::io::Error| {
            if matches!(e.kind(), ErrorKind::WouldBlock | ErrorKind::TimedOut) {
                timed_out()
            } else {
                self.error(Problem::Io {
                    op,
                    error: e.to_string(),
                })
            }
        };
        stream
            .set_write_timeout(Some(left().max(Duration::from_millis(1))))
            .map_err(|e| io("set the write timeout", e))?;
        stream
            .write_all(lookup.wire().as_bytes())
            .map_err(|e| io("send the request", e))?;

        let mut reply = Vec::new();
        let mut chunk = vec![0u8; READ_CHUNK];
        loop {
            let remaining = left();
            if remaining.is_zero() {
                return Err(timed_out());
            }
            stream
                .set_read_timeout(Some(remaining))
                .map_err(|e| io("set the read timeout", e))?;
            let n = match stream.read(&mut chunk) {
                Ok(n) => n,
                Err(e) if e.kind() == ErrorKind::Interrupted => continue,
                Err(e) => return Err(io("read the reply", e)),
            };
            if n == 0 {
                if reply.is_empty() {
                    return Err(self.error(Problem::NoReply));
                }
                return Ok(reply);
            }
            reply.extend_from_slice(&chunk[..n]);
            if reply.len() > MAX_REPLY_BYTES {
                return Err(self.error(Problem::ReplyTooLarge));
            }
            if holds_one_value(&reply) {
                return Ok(reply);
            }
        }
    }
}

/// Whether `bytes` begin with a whole JSON value, or with something that can never
/// become one (then reading on is pointless; the reply check says what is wrong).
fn holds_one_value(bytes: &[u8]) -> bool {
    match serde_json::Deserializer::from_slice(bytes)
        .into_iter::<IgnoredAny>()
        .next()
    {
        None => false,
        Some(Ok(_)) => true,
        Some(Err(e)) => !e.is_eof(),
    }
}

/// A connected stream; `timeout` bounds a connect to a server whose backlog is full.
fn connect(path: &Path, timeout: Duration) -> std::io::Result<UnixStream> {
    let fd = socket::socket(AddressFamily::Unix, SockType::Stream, SockFlag::SOCK_CLOEXEC, None)?;
    let millis = i64::try_from(timeout.as_millis()).unwrap_or(i64::MAX).max(1);
    socket::setsockopt(&fd, sockopt::SendTimeout, &TimeVal::milliseconds(millis))?;
    let addr = UnixAddr::new(path)?;
    socket::connect(fd.as_raw_fd(), &addr)?;
    Ok(UnixStream::from(fd))
}

#[cfg(test)]
mod tests {
    use std::os::unix::net::UnixListener;

    use super::*;
    use crate::request::By;

    #[test]
    fn complete_values_end_the_read() {
        assert!(!holds_one_value(b""));
        assert!(!holds_one_value(b"  \n"));
        assert!(!holds_one_value(br#"{"error":0,"data":{"id":"0"#));
        assert!(holds_one_value(br#"{"error":4}"#));
        assert!(holds_one_value(br#"{"error":4} junk"#));
        assert!(holds_one_value(b"not json"));
    }

    #[test]
    fn sends_the_wazuh_request_and_reads_a_split_reply() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("p.sock");
        let listener = UnixListener::bind(&path).unwrap();
        let server = std::thread::spawn(move || {
            let (mut conn, _) = listener.accept().unwrap();
            let mut req = [0u8; 64];
            let n = conn.read(&mut req).unwrap();
            conn.write_all(br#"{"error":4,"#).unwrap();
            std::thread::sleep(Duration::from_millis(50));
            conn.write_all(br#""message":"No agent key found"}"#).unwrap();
            // Keeps the connection open: the complete value must end the read.
            std::thread::sleep(Duration::from_secs(3));
            String::from_utf8_lossy(&req[..n]).into_owned()
        });
        let p = SocketProvider::new(path, Duration::from_secs(2));
        let reply = p.request(&Lookup::new(By::Id, "001").unwrap()).unwrap();
        assert_eq!(reply, br#"{"error":4,"message":"No agent key found"}"#);
        assert_eq!(server.join().unwrap(), "id:001");
    }

    /// A server that answers every connection with `reply`, then closes.
    fn answering(reply: Vec<u8>) -> (tempfile::TempDir, SocketProvider) {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("p.sock");
        let listener = UnixListener::bind(&path).unwrap();
        std::thread::spawn(move || {
            for mut conn in listener.incoming().flatten() {
                let _ = conn.read(&mut [0u8; 64]);
                let _ = conn.write_all(&reply);
            }
        });
        (dir, SocketProvider::new(path, Duration::from_secs(5)))
    }

    #[test]
    fn oversized_and_empty_replies_fail() {
        let lookup = Lookup::new(By::Id, "001").unwrap();
        // Whitespace never completes a value: the cap ends the read.
        let (_dir, p) = answering(vec![b' '; MAX_REPLY_BYTES + 10]);
        let e = p.request(&lookup).unwrap_err();
        assert!(e.to_string().ends_with("p.sock: reply larger than 65536 bytes"), "{e}");
        let (_dir, p) = answering(Vec::new());
        let e = p.request(&lookup).unwrap_err();
        assert!(
            e.to_string().ends_with("p.sock: closed the connection without a reply"),
            "{e}"
        );
        // Up to end-of-file, a reply that is not JSON is handed on for the check.
        let (_dir, p) = answering(b"oops".to_vec());
        assert_eq!(p.request(&lookup).unwrap(), b"oops");
    }

    #[test]
    fn a_missing_socket_is_unreachable_after_three_attempts() {
        let dir = tempfile::tempdir().unwrap();
        let p = SocketProvider::new(dir.path().join("none.sock"), Duration::from_secs(5));
        let start = Instant::now();
        let e = p.request(&Lookup::new(By::Ip, "10.0.0.1").unwrap()).unwrap_err();
        assert!(start.elapsed() >= Duration::from_millis(300), "pauses 100 + 200 ms");
        assert!(
            e.to_string()
                .ends_with("none.sock: cannot connect after 3 attempts: No such file or directory (os error 2)"),
            "{e}"
        );
        assert!(p.probe().is_err());
    }
}
