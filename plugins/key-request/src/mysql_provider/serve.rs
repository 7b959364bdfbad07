//! Socket mode: a unix-socket server, one request per connection.
//!
//! The main thread accepts connections and reads their requests: every connection
//! waiting for its request is in one `poll` set with a deadline, so a client that
//! sends nothing holds no worker and is closed after [`CLIENT_TIMEOUT`]; a request
//! longer than [`MAX_REQUEST_BYTES`] or malformed is answered with error 1 at once.
//! Well-formed lookups go through a bounded queue to a fixed pool of workers, each
//! with its own database connection and prepared statements, which answer with one
//! write and close. When the queue is full the main thread waits for room, so the
//! kernel's listen backlog, not this process, holds the excess.
//!
//! SIGTERM and SIGINT stop the server: the socket file is removed and the process
//! exits with status 0.

use std::io::{ErrorKind, Read, Write};
use std::os::fd::AsFd;
use std::os::unix::fs::{FileTypeExt, PermissionsExt};
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::{Path, PathBuf};
use std::sync::mpsc::{Receiver, SyncSender, sync_channel};
use std::sync::{Arc, Mutex, PoisonError};
use std::time::{Duration, Instant};

use nix::errno::Errno;
use nix::poll::{PollFd, PollFlags, PollTimeout, poll};
use nix::sys::stat::{Mode, umask};

use super::answer::{MAX_REQUEST_BYTES, Reply, parse_request};
use super::db::{Database, DbError, Settings};
use crate::request::Lookup;

/// How long a client may take to send its request.
pub const CLIENT_TIMEOUT: Duration = Duration::from_secs(10);
/// Connections accepted whose request has not arrived yet, at most; past that the
/// server stops accepting until some are answered or time out.
pub const MAX_PENDING: usize = 1024;
/// Lookups waiting for a worker, at most.
pub const JOB_QUEUE: usize = 1024;
/// How long accepting pauses after it failed for want of resources (file
/// descriptors, memory), rather than retrying in a busy loop.
pub const ACCEPT_PAUSE: Duration = Duration::from_millis(100);
/// The most bytes read and dropped after a request that is too long.
pub const MAX_DISCARD_BYTES: usize = 64 << 10;
/// The socket's mode: whoever can connect can read every key.
pub const SOCKET_MODE: u32 = 0o600;
/// The umask while binding, so that the socket is never more open than
/// [`SOCKET_MODE`], not even between `bind` and `chmod`.
const BIND_UMASK: u32 = 0o177;

/// Why the server could not start or had to stop.
#[derive(Debug, thiserror::Error)]
pub enum ServeError {
    /// Something that is not a socket is in the way.
    #[error("{} exists and is not a socket; not removing it", .0.display())]
    NotASocket(PathBuf),
    /// A system call failed.
    #[error("{what} {}: {error}", path.display())]
    Io {
        /// What was being done.
        what: &'static str,
        /// The socket's path.
        path: PathBuf,
        /// The error.
        error: std::io::Error,
    },
    /// The stop signals could not be set up.
    #[error("cannot block the stop signals: {0}")]
    Signals(Errno),
    /// `poll` failed.
    #[error("poll: {0}")]
    Poll(Errno),
    /// Every worker is gone (none should ever stop).
    #[error("the worker threads have stopped")]
    WorkersGone,
}

/// A lookup for a worker: the client's connection and what it asked.
#[derive(Debug)]
struct Job {
    stream: UnixStream,
    lookup: Lookup,
}

/// A connection whose request has not arrived yet.
#[derive(Debug)]
struct Pending {
    stream: UnixStream,
    deadline: Instant,
}

/// Serves on `path` with `threads` workers until SIGTERM or SIGINT.
pub fn run(settings: Settings, path: &Path, threads: usize) -> Result<(), ServeError> {
    // Before any thread starts, so that only the signal thread takes them.
    let signals = keel_plugin_sdk::stop::block_signals().map_err(ServeError::Signals)?;
    let listener = bind(path)?;
    let io = |what: &'static str| {
        move |error| ServeError::Io {
            what,
            path: path.to_owned(),
            error,
        }
    };
    let (wake_rx, mut wake_tx) = UnixStream::pair().map_err(io("cannot make a wake-up pipe for"))?;
    std::thread::Builder::new()
        .name("signals".into())
        .spawn(move || {
            if let Ok(signal) = signals.wait() {
                tracing::info!(%signal, "stopping");
            }
            let _ = wake_tx.write_all(&[1]);
        })
        .map_err(io("cannot start the signal thread for"))?;

    let (jobs, queue) = sync_channel::<Job>(JOB_QUEUE);
    let queue = Arc::new(Mutex::new(queue));
    let settings = Arc::new(settings);
    for i in 0..threads {
        let (settings, queue) = (Arc::clone(&settings), Arc::clone(&queue));
        std::thread::Builder::new()
            .name(format!("worker-{i}"))
            .spawn(move || worker(&settings, &queue))
            .map_err(io("cannot start a worker thread for"))?;
    }
    tracing::info!(socket = %path.display(), threads, database = %settings.server(), "serving");
    let result = accept_loop(&listener, &wake_rx, &jobs);
    drop(listener);
    if let Err(e) = std::fs::remove_file(path) {
        tracing::warn!(socket = %path.display(), error = %e, "cannot remove the socket");
    }
    result
}

/// Binds a fresh socket of mode [`SOCKET_MODE`] at `path`, replacing a stale socket
/// (never another kind of file).
fn bind(path: &Path) -> Result<UnixListener, ServeError> {
    let io = |what: &'static str, error| ServeError::Io {
        what,
        path: path.to_owned(),
        error,
    };
    match std::fs::symlink_metadata(path) {
        Ok(m) if m.file_type().is_socket() => {
            std::fs::remove_file(path).map_err(|e| io("cannot remove the old socket", e))?;
        }
        Ok(_) => return Err(ServeError::NotASocket(path.to_owned())),
        Err(e) if e.kind() == ErrorKind::NotFound => {}
        Err(e) => return Err(io("cannot check", e)),
    }
    // No other thread runs yet: the umask is changed for nobody else.
    let old = umask(Mode::from_bits_truncate(BIND_UMASK));
    let bound = UnixListener::bind(path);
    umask(old);
    let listener = bound.map_err(|e| io("cannot listen on", e))?;
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(SOCKET_MODE))
        .map_err(|e| io("cannot set the mode of", e))?;
    listener
        .set_nonblocking(true)
        .map_err(|e| io("cannot make non-blocking", e))?;
    Ok(listener)
}

/// Accepts connections and reads requests until `wake` becomes readable.
fn accept_loop(listener: &UnixListener, wake: &UnixStream, jobs: &SyncSender<Job>) -> Result<(), ServeError> {
    let mut pending: Vec<Pending> = Vec::new();
    let mut accept_paused_until: Option<Instant> = None;
    let mut ready = Vec::new();
    loop {
        let now = Instant::now();
        // A client that said nothing in time is closed without a reply.
        pending.retain(|p| p.deadline > now);
        accept_paused_until = accept_paused_until.filter(|t| *t > now);
        let listening = accept_paused_until.is_none() && pending.len() < MAX_PENDING;
        let next = pending.iter().map(|p| p.deadline).chain(accept_paused_until).min();

        ready.clear();
        let (woken, acceptable) = {
            let mut fds = Vec::with_capacity(pending.len() + 2);
            fds.push(PollFd::new(wake.as_fd(), PollFlags::POLLIN));
            if listening {
                fds.push(PollFd::new(listener.as_fd(), PollFlags::POLLIN));
            }
            fds.extend(pending.iter().map(|p| PollFd::new(p.stream.as_fd(), PollFlags::POLLIN)));
            match poll(&mut fds, timeout(next, now)) {
                Ok(_) => {}
                Err(Errno::EINTR) => continue,
                Err(e) => return Err(ServeError::Poll(e)),
            }
            let is_ready = |fd: &PollFd| fd.revents().is_some_and(|r| !r.is_empty());
            let first_pending = if listening { 2 } else { 1 };
            ready.extend(
                fds[first_pending..]
                    .iter()
                    .enumerate()
                    .filter(|(_, fd)| is_ready(fd))
                    .map(|(i, _)| i),
            );
            (is_ready(&fds[0]), listening && is_ready(&fds[1]))
        };
        if woken {
            return Ok(());
        }
        // Highest index first, so that swap_remove moves only entries already seen
        // or not ready.
        for &i in ready.iter().rev() {
            let p = pending.swap_remove(i);
            if let Some(p) = take_request(p, jobs)? {
                pending.push(p);
            }
        }
        if acceptable {
            accept_paused_until = accept_all(listener, &mut pending, jobs)?;
        }
    }
}

/// The poll timeout until `next`, rounded up to a whole millisecond so that a
/// deadline less than 1 ms away does not make a busy loop.
fn timeout(next: Option<Instant>, now: Instant) -> PollTimeout {
    let Some(next) = next else {
        return PollTimeout::NONE;
    };
    let micros = next.saturating_duration_since(now).as_micros();
    let millis = micros.div_ceil(1000);
    PollTimeout::try_from(millis).unwrap_or(PollTimeout::MAX)
}

/// Accepts every waiting connection; a request that is already there is taken at
/// once. Returns until when accepting pauses, if it must.
fn accept_all(
    listener: &UnixListener,
    pending: &mut Vec<Pending>,
    jobs: &SyncSender<Job>,
) -> Result<Option<Instant>, ServeError> {
    while pending.len() < MAX_PENDING {
        match listener.accept() {
            Ok((stream, _)) => {
                if let Err(e) = stream.set_nonblocking(true) {
                    tracing::debug!(error = %e, "cannot make a connection non-blocking; closing it");
                    continue;
                }
                let p = Pending {
                    stream,
                    deadline: Instant::now() + CLIENT_TIMEOUT,
                };
                if let Some(p) = take_request(p, jobs)? {
                    pending.push(p);
                }
            }
            Err(e) if e.kind() == ErrorKind::WouldBlock => return Ok(None),
            Err(e) if matches!(e.kind(), ErrorKind::Interrupted | ErrorKind::ConnectionAborted) => {}
            Err(e) => {
                // EMFILE, ENFILE, ENOMEM...: the connection stays in the backlog.
                tracing::warn!(error = %e, pause = ?ACCEPT_PAUSE, "cannot accept a connection");
                return Ok(Some(Instant::now() + ACCEPT_PAUSE));
            }
        }
    }
    Ok(None)
}

/// Reads the request of `p`: a lookup goes to the workers, anything else is
/// answered with error 1 here. Returns `p` if its request has not arrived yet.
fn take_request(mut p: Pending, jobs: &SyncSender<Job>) -> Result<Option<Pending>, ServeError> {
    // One byte more than allowed, to tell a request that is too long.
    let mut buf = [0u8; MAX_REQUEST_BYTES + 1];
    let request = match p.stream.read(&mut buf) {
        Ok(n) => &buf[..n],
        Err(e) if matches!(e.kind(), ErrorKind::WouldBlock | ErrorKind::Interrupted) => return Ok(Some(p)),
        Err(e) => {
            tracing::debug!(error = %e, "cannot read a request; closing the connection");
            return Ok(None);
        }
    };
    match parse_request(request) {
        Ok(lookup) => {
            let job = Job {
                stream: p.stream,
                lookup,
            };
            jobs.send(job).map_err(|_| ServeError::WorkersGone)?;
        }
        Err(problem) => {
            send_reply(&mut p.stream, &Reply::invalid(problem));
            if request.len() > MAX_REQUEST_BYTES {
                discard_input(&mut p.stream);
            }
        }
    }
    Ok(None)
}

/// Reads and drops what a client sent past the request, up to
/// [`MAX_DISCARD_BYTES`] and without waiting: closing a unix socket with unread
/// input makes the client's next read fail with "connection reset" instead of
/// seeing the end of the reply.
fn discard_input(stream: &mut UnixStream) {
    let mut buf = [0u8; 4096];
    let mut discarded = 0;
    while discarded < MAX_DISCARD_BYTES {
        match stream.read(&mut buf) {
            Ok(0) | Err(_) => return,
            Ok(n) => discarded += n,
        }
    }
}

/// Writes `reply` in one write and drops the connection.
fn send_reply(stream: &mut UnixStream, reply: &Reply) {
    let bytes = reply.to_json();
    match stream.write(&bytes) {
        Ok(n) if n == bytes.len() => {}
        Ok(n) => tracing::debug!(written = n, len = bytes.len(), "the client took part of a reply"),
        Err(e) => tracing::debug!(error = %e, "cannot send a reply"),
    }
}

/// A worker: answers lookups from `queue` with its own connection.
fn worker(settings: &Settings, queue: &Mutex<Receiver<Job>>) {
    let mut conn = Connection::new(settings);
    // Connected before the first request; a failure is logged, and each lookup
    // tries again.
    let _ = conn.open();
    loop {
        let job = queue.lock().unwrap_or_else(PoisonError::into_inner).recv();
        let Ok(mut job) = job else {
            return;
        };
        let reply = conn.lookup(&job.lookup);
        send_reply(&mut job.stream, &reply);
    }
}

/// A worker's database connection, opened when needed and dropped when broken.
struct Connection<'a> {
    settings: &'a Settings,
    db: Option<Database>,
    /// Whether the last attempt to connect failed (then the next failure is not
    /// logged again: a database that is down would flood the log).
    down: bool,
}

impl<'a> Connection<'a> {
    fn new(settings: &'a Settings) -> Self {
        Self {
            settings,
            db: None,
            down: false,
        }
    }

    /// The connection, opened (and its statements prepared) if there is none.
    fn open(&mut self) -> Result<&mut Database, DbError> {
        let db = match self.db.take() {
            Some(db) => db,
            None => match Database::connect(self.settings) {
                Ok(mut db) => {
                    if let Err(e) = db.prepare() {
                        // The lookup reports it (a missing table, say); the
                        // connection itself is fine.
                        tracing::warn!(error = %e, "cannot prepare the lookups");
                    }
                    if self.down {
                        tracing::info!(database = %self.settings.server(), "connected again");
                    }
                    self.down = false;
                    db
                }
                Err(e) => {
                    if !self.down {
                        tracing::warn!(database = %self.settings.server(), error = %e, "cannot connect");
                    }
                    self.down = true;
                    return Err(e);
                }
            },
        };
        Ok(self.db.insert(db))
    }

    /// One lookup. A connection that has been idle may have been closed by the
    /// server (`wait_timeout`) or a proxy: if the lookup fails for a broken
    /// connection that was not new, it is retried once on a new one.
    fn lookup(&mut self, lookup: &Lookup) -> Reply {
        let was_open = self.db.is_some();
        match self.try_lookup(lookup) {
            Ok(reply) => reply,
            Err(e) if was_open && e.is_connectivity() => {
                tracing::info!(error = %e, "the database connection broke; reconnecting");
                self.try_lookup(lookup).unwrap_or_else(|e| Reply::database_error(&e))
            }
            Err(e) => Reply::database_error(&e),
        }
    }

    fn try_lookup(&mut self, lookup: &Lookup) -> Result<Reply, DbError> {
        let result = self.open()?.lookup(lookup);
        if let Err(e) = &result
            && e.is_connectivity()
        {
            self.db = None;
        }
        result
    }
}
