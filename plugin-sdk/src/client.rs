//! The [`Client`]: buffered records out, tasks in.

use std::collections::HashMap;
use std::io::{BufRead, BufReader, BufWriter, ErrorKind, Read, Write};
use std::sync::{Arc, Condvar, Mutex, Weak};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use keel_proto::data_type::TASK_RESULT;
use keel_proto::frame::{self, DEFAULT_MAX_FRAME};
use keel_proto::grpc::{Payload, Record, Task};
use prost::Message;
use serde::{Deserialize, Serialize};

use crate::{DEBUG_ENV, fds, stop};

/// What can go wrong talking to the agent.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// The agent closed the pipe: it is stopping this plugin (or has gone away).
    /// Finish up and exit.
    #[error("the agent closed the pipe")]
    Closed,
    /// Reading or writing failed.
    #[error("pipe I/O: {0}")]
    Io(#[from] std::io::Error),
    /// A task frame could not be read.
    #[error("invalid task frame: {0}")]
    Frame(String),
}

fn io(e: std::io::Error) -> Error {
    match e.kind() {
        ErrorKind::BrokenPipe | ErrorKind::UnexpectedEof => Error::Closed,
        _ => Error::Io(e),
    }
}

/// Tuning for a [`Client`].
#[derive(Debug, Clone)]
pub struct ClientOptions {
    /// Buffered records are written at most this long after the first of them
    /// was queued. With nothing buffered the flush thread sleeps until a record
    /// comes, so an idle plugin does not wake.
    pub flush_interval: Duration,
    /// Records are written once this many bytes are buffered.
    pub buffer_bytes: usize,
    /// Largest task frame accepted.
    pub max_task_bytes: usize,
    /// JSON lines on stdin/stdout instead of the pipes. `None`: from `KEEL_PLUGIN_DEBUG`.
    pub debug: Option<bool>,
    /// SIGTERM and SIGINT flush and exit ([`crate::stop`]). Off for a plugin that
    /// handles them itself.
    pub stop_signals: bool,
}

impl Default for ClientOptions {
    fn default() -> Self {
        Self {
            flush_interval: Duration::from_millis(100),
            buffer_bytes: 64 << 10,
            max_task_bytes: DEFAULT_MAX_FRAME,
            debug: None,
            stop_signals: true,
        }
    }
}

struct Out {
    writer: BufWriter<Box<dyn Write + Send>>,
    scratch: Vec<u8>,
    closed: bool,
    /// The number of the last record written: records are numbered from 1.
    seq: u64,
    /// The flush thread was told of records since its last flush.
    told: bool,
}

/// How the flush thread is woken: set and notified when a record is queued
/// after a flush.
#[derive(Default)]
struct Wake {
    queued: Mutex<bool>,
    cv: Condvar,
}

impl Wake {
    fn notify(&self) {
        *self.queued.lock().unwrap_or_else(|p| p.into_inner()) = true;
        self.cv.notify_one();
    }
}

/// How often a flush thread with nothing to flush checks that its client still
/// exists.
const FLUSHER_IDLE_CHECK: Duration = Duration::from_secs(60);

/// What runs on a stop signal before the last flush.
type StopHook = Box<dyn FnOnce() + Send>;

struct Inner {
    out: Mutex<Out>,
    wake: Arc<Wake>,
    on_stop: Mutex<Option<StopHook>>,
    input: Mutex<BufReader<Box<dyn Read + Send>>>,
    debug: bool,
    max_task_bytes: usize,
}

/// The plugin's connection to the agent. Cheap to clone; clones share the pipes, so
/// one thread can wait for tasks while others send records.
#[derive(Clone)]
pub struct Client {
    inner: Arc<Inner>,
}

impl std::fmt::Debug for Client {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Client")
            .field("debug", &self.inner.debug)
            .finish_non_exhaustive()
    }
}

/// A task as JSON in debug mode: the `Task` field names, each optional.
#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct JsonTask {
    #[serde(default)]
    data_type: i32,
    #[serde(default)]
    object_name: String,
    #[serde(default)]
    data: String,
    #[serde(default)]
    token: String,
}

/// A record as JSON in debug mode.
#[derive(Serialize)]
struct JsonRecord<'a> {
    data_type: i32,
    timestamp: i64,
    seq: u64,
    fields: &'a HashMap<String, String>,
}

fn now_secs() -> i64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_secs() as i64)
        .unwrap_or(0)
}

impl Client {
    /// Attaches to the agent with default options.
    pub fn new() -> Result<Self, Error> {
        Self::with_options(ClientOptions::default())
    }

    /// Attaches to the agent: fds 3 and 4, or stdin/stdout in debug mode; with
    /// `stop_signals`, sets up the stop handling of [`crate::stop`].
    pub fn with_options(opts: ClientOptions) -> Result<Self, Error> {
        let debug = opts
            .debug
            .unwrap_or_else(|| std::env::var(DEBUG_ENV).is_ok_and(|v| v == "1" || v == "true"));
        // Before the flush thread starts, so that it inherits the blocked signals.
        let signals = if opts.stop_signals {
            Some(stop::block_signals().map_err(|e| Error::Io(e.into()))?)
        } else {
            None
        };
        let (input, output): (Box<dyn Read + Send>, Box<dyn Write + Send>) = if debug {
            (Box::new(std::io::stdin()), Box::new(std::io::stdout()))
        } else {
            let (tasks, records) = fds::take()?;
            (Box::new(tasks), Box::new(records))
        };
        let client = Self::from_parts(input, output, debug, &opts);
        if let Some(signals) = signals {
            let inner = Arc::downgrade(&client.inner);
            stop::wait_then(signals, move || {
                if let Some(inner) = inner.upgrade() {
                    let hook = inner.on_stop.lock().unwrap_or_else(|p| p.into_inner()).take();
                    if let Some(hook) = hook {
                        hook();
                    }
                    let mut out = inner.out.lock().unwrap_or_else(|p| p.into_inner());
                    let _ = out.writer.flush();
                }
            })?;
        }
        Ok(client)
    }

    /// A client over any reader and writer, for tests of plugin code.
    pub fn from_io(
        input: impl Read + Send + 'static,
        output: impl Write + Send + 'static,
        opts: ClientOptions,
    ) -> Self {
        let debug = opts.debug.unwrap_or(false);
        Self::from_parts(Box::new(input), Box::new(output), debug, &opts)
    }

    fn from_parts(
        input: Box<dyn Read + Send>,
        output: Box<dyn Write + Send>,
        debug: bool,
        opts: &ClientOptions,
    ) -> Self {
        let wake = Arc::new(Wake::default());
        let inner = Arc::new(Inner {
            out: Mutex::new(Out {
                writer: BufWriter::with_capacity(opts.buffer_bytes.max(4096), output),
                scratch: Vec::new(),
                closed: false,
                seq: 0,
                told: false,
            }),
            wake: Arc::clone(&wake),
            on_stop: Mutex::new(None),
            input: Mutex::new(BufReader::with_capacity(64 << 10, input)),
            debug,
            max_task_bytes: opts.max_task_bytes,
        });
        spawn_flusher(Arc::downgrade(&inner), wake, opts.flush_interval);
        Self { inner }
    }

    /// Whether the client speaks JSON lines on stdin/stdout.
    pub fn is_debug(&self) -> bool {
        self.inner.debug
    }

    fn out(&self) -> std::sync::MutexGuard<'_, Out> {
        self.inner.out.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Queues a record. It is written when the buffer fills or at the next flush.
    /// A `timestamp` of 0 is replaced with the current time, so that the fields are
    /// always all present (Elkeid's agent reads them at fixed positions). The
    /// record's `seq` is set here: the records of one run are numbered from 1
    /// without gaps, so the server can tell if any went missing.
    pub fn send_record(&self, record: &Record) -> Result<(), Error> {
        if record.timestamp == 0 {
            return self.send_record(&Record {
                timestamp: now_secs(),
                ..record.clone()
            });
        }
        let mut out = self.out();
        if out.closed {
            return Err(Error::Closed);
        }
        let seq = out.seq + 1;
        let result = if self.inner.debug {
            let empty = HashMap::new();
            let fields = record.data.as_ref().map_or(&empty, |p| &p.fields);
            let line = JsonRecord {
                data_type: record.data_type,
                timestamp: record.timestamp,
                seq,
                fields,
            };
            serde_json::to_writer(&mut out.writer, &line)
                .map_err(std::io::Error::from)
                .and_then(|()| out.writer.write_all(b"\n"))
        } else {
            let Out { writer, scratch, .. } = &mut *out;
            scratch.clear();
            encode_numbered(record, seq, scratch);
            writer.write_all(scratch)
        };
        match result {
            Ok(()) => {
                out.seq = seq;
                if !out.told {
                    out.told = true;
                    self.inner.wake.notify();
                }
                Ok(())
            }
            Err(e) => {
                let e = io(e);
                if matches!(e, Error::Closed) {
                    out.closed = true;
                }
                Err(e)
            }
        }
    }

    /// What runs when a stop signal arrives, before the SDK flushes and exits:
    /// e.g. answering the tasks still in progress. Replaces an earlier hook.
    pub fn on_stop(&self, hook: impl FnOnce() + Send + 'static) {
        *self.inner.on_stop.lock().unwrap_or_else(|p| p.into_inner()) = Some(Box::new(hook));
    }

    /// The task loop with stop handling, the one call most plugins need: calls
    /// `handle` for each task until the agent closes the task pipe (it is stopping
    /// the plugin), then flushes every buffered record. Return from `main` after
    /// it. A stop signal meanwhile flushes and exits ([`crate::stop`]).
    pub fn serve(&self, mut handle: impl FnMut(Task) -> Result<(), Error>) -> Result<(), Error> {
        while let Some(task) = self.next_task()? {
            handle(task)?;
        }
        self.flush().or_else(|e| match e {
            Error::Closed => Ok(()),
            e => Err(e),
        })
    }

    /// Queues a record of `data_type` with `fields`, stamped now.
    pub fn send<K: Into<String>, V: Into<String>>(
        &self,
        data_type: i32,
        fields: impl IntoIterator<Item = (K, V)>,
    ) -> Result<(), Error> {
        let fields = fields.into_iter().map(|(k, v)| (k.into(), v.into())).collect();
        self.send_record(&Record {
            data_type,
            timestamp: now_secs(),
            data: Some(Payload { fields }),
            seq: 0,
        })
    }

    /// Reports a task's outcome (data_type 5100) and flushes it.
    pub fn task_result(&self, token: &str, ok: bool, msg: &str) -> Result<(), Error> {
        let status = if ok { "succeeded" } else { "failed" };
        self.send(TASK_RESULT, [("token", token), ("status", status), ("msg", msg)])?;
        self.flush()
    }

    /// Writes every buffered record now.
    pub fn flush(&self) -> Result<(), Error> {
        let mut out = self.out();
        out.writer.flush().map_err(|e| {
            let e = io(e);
            if matches!(e, Error::Closed) {
                out.closed = true;
            }
            e
        })
    }

    /// The next task, or `None` once the agent has closed the task pipe (it is
    /// stopping the plugin: flush and exit). In debug mode a line that is not a
    /// task is logged and skipped; from the agent, a bad frame is an error.
    pub fn next_task(&self) -> Result<Option<Task>, Error> {
        loop {
            match self.receive_task() {
                Ok(task) => return Ok(Some(task)),
                Err(Error::Closed) => return Ok(None),
                Err(Error::Frame(e)) if self.is_debug() => {
                    tracing::warn!(error = %e, "skipping a task line that is not a task");
                }
                Err(e) => return Err(e),
            }
        }
    }

    /// For a plugin that cannot work, e.g. with an invalid configuration: reports
    /// `msg` once (a failed 5100 result without a token), then answers every task
    /// with it until the agent closes the pipe. Exiting instead would only have
    /// the agent restart the plugin into the same error.
    pub fn refuse_all(&self, msg: &str) -> Result<(), Error> {
        self.task_result("", false, msg)?;
        while let Some(task) = self.next_task()? {
            self.task_result(&task.token, false, msg)?;
        }
        self.flush().or(Ok(()))
    }

    /// Waits for the next task. [`Error::Closed`] means the agent is stopping
    /// the plugin: flush and exit. [`Client::next_task`] is the easier loop.
    pub fn receive_task(&self) -> Result<Task, Error> {
        let mut input = self.inner.input.lock().unwrap_or_else(|p| p.into_inner());
        if self.inner.debug {
            return loop {
                let mut line = String::new();
                if input.read_line(&mut line).map_err(io)? == 0 {
                    break Err(Error::Closed);
                }
                if line.trim().is_empty() {
                    continue;
                }
                let t: JsonTask = serde_json::from_str(&line).map_err(|e| Error::Frame(format!("task JSON: {e}")))?;
                break Ok(Task {
                    data_type: t.data_type,
                    object_name: t.object_name,
                    data: t.data,
                    token: t.token,
                });
            };
        }
        let mut header = [0u8; 4];
        input.read_exact(&mut header).map_err(io)?;
        let len = frame::frame_len(header, self.inner.max_task_bytes).map_err(|e| Error::Frame(e.to_string()))?;
        let mut body = vec![0u8; len];
        input.read_exact(&mut body).map_err(|e| match e.kind() {
            ErrorKind::UnexpectedEof => Error::Frame(format!("pipe closed inside a {len}-byte task frame")),
            _ => Error::Io(e),
        })?;
        Task::decode(&body[..]).map_err(|e| Error::Frame(e.to_string()))
    }
}

/// A record frame: length prefix, then the record's fields as prost writes them
/// (zero scalars left out), with `seq` (field 100) last.
fn encode_numbered(record: &Record, seq: u64, out: &mut Vec<u8>) {
    use prost::encoding::{int32, int64, message, uint64};
    let len = (if record.data_type != 0 {
        int32::encoded_len(1, &record.data_type)
    } else {
        0
    }) + (if record.timestamp != 0 {
        int64::encoded_len(2, &record.timestamp)
    } else {
        0
    }) + record.data.as_ref().map_or(0, |d| message::encoded_len(3, d))
        + uint64::encoded_len(100, &seq);
    out.reserve(4 + len);
    out.extend_from_slice(&(len as u32).to_le_bytes());
    if record.data_type != 0 {
        int32::encode(1, &record.data_type, out);
    }
    if record.timestamp != 0 {
        int64::encode(2, &record.timestamp, out);
    }
    if let Some(d) = &record.data {
        message::encode(3, d, out);
    }
    uint64::encode(100, &seq, out);
}

/// The flush thread: waits until a record is queued, lets `every` pass, then
/// writes what is buffered; ends with its client.
fn spawn_flusher(inner: Weak<Inner>, wake: Arc<Wake>, every: Duration) {
    let spawned = std::thread::Builder::new()
        .name("keel-sdk-flush".into())
        .spawn(move || {
            loop {
                {
                    let mut queued = wake.queued.lock().unwrap_or_else(|p| p.into_inner());
                    while !*queued {
                        if inner.strong_count() == 0 {
                            return;
                        }
                        queued = wake
                            .cv
                            .wait_timeout(queued, FLUSHER_IDLE_CHECK)
                            .unwrap_or_else(|p| p.into_inner())
                            .0;
                    }
                    *queued = false;
                }
                std::thread::sleep(every);
                let Some(inner) = inner.upgrade() else { return };
                let mut out = inner.out.lock().unwrap_or_else(|p| p.into_inner());
                out.told = false;
                if out.closed || out.writer.flush().is_err() {
                    return;
                }
            }
        });
    if let Err(e) = spawned {
        // Without the thread, records still go out when the buffer fills or on flush().
        eprintln!("keel-plugin-sdk: cannot start the flush thread: {e}");
    }
}

#[cfg(test)]
mod tests {
    use std::sync::{Arc, Mutex};

    use bytes::Bytes;

    use super::*;

    #[derive(Clone, Default)]
    struct Shared(Arc<Mutex<Vec<u8>>>);
    impl Write for Shared {
        fn write(&mut self, b: &[u8]) -> std::io::Result<usize> {
            self.0.lock().unwrap().extend_from_slice(b);
            Ok(b.len())
        }
        fn flush(&mut self) -> std::io::Result<()> {
            Ok(())
        }
    }

    fn opts(debug: bool) -> ClientOptions {
        ClientOptions {
            debug: Some(debug),
            flush_interval: Duration::from_secs(3600),
            ..Default::default()
        }
    }

    /// Bytes written, and how many times the writer was flushed.
    #[derive(Clone, Default)]
    struct Counted(Arc<Mutex<(Vec<u8>, usize)>>);
    impl Write for Counted {
        fn write(&mut self, b: &[u8]) -> std::io::Result<usize> {
            self.0.lock().unwrap().0.extend_from_slice(b);
            Ok(b.len())
        }
        fn flush(&mut self) -> std::io::Result<()> {
            self.0.lock().unwrap().1 += 1;
            Ok(())
        }
    }

    #[test]
    fn queued_records_go_out_within_the_interval_and_an_idle_client_never_flushes() {
        let out = Counted::default();
        let every = Duration::from_millis(5);
        let c = Client::from_io(
            std::io::empty(),
            out.clone(),
            ClientOptions {
                flush_interval: every,
                ..opts(false)
            },
        );
        // Waits until `min` bytes were written and the flush that wrote them ended.
        let written = |min: usize| {
            let start = std::time::Instant::now();
            loop {
                let (bytes, flushes) = {
                    let o = out.0.lock().unwrap();
                    (o.0.len(), o.1)
                };
                if bytes >= min && flushes >= 1 {
                    return (bytes, flushes);
                }
                assert!(
                    start.elapsed() < Duration::from_secs(5),
                    "{bytes} bytes written, {min} expected"
                );
                std::thread::sleep(Duration::from_millis(1));
            }
        };
        c.send(1, [("a", "b")]).unwrap();
        let (first, flushes) = written(1);
        // Twenty intervals with nothing queued: the flush thread stays asleep.
        std::thread::sleep(every * 20);
        assert_eq!(out.0.lock().unwrap().1, flushes, "flushed with nothing queued");
        c.send(1, [("a", "c")]).unwrap();
        written(first + 1);
    }

    #[test]
    fn frames_records_and_reads_tasks() {
        let task = Task {
            data_type: 6000,
            object_name: "p".into(),
            data: "{}".into(),
            token: "t".into(),
        };
        let input = frame::encode_task(&task).to_vec();
        let out = Shared::default();
        let c = Client::from_io(std::io::Cursor::new(input), out.clone(), opts(false));
        assert_eq!(c.receive_task().unwrap(), task);
        assert!(matches!(c.receive_task(), Err(Error::Closed)));
        c.send(6001, [("k", "v")]).unwrap();
        c.flush().unwrap();
        let bytes = out.0.lock().unwrap().clone();
        let len = u32::from_le_bytes(bytes[..4].try_into().unwrap()) as usize;
        assert_eq!(len, bytes.len() - 4);
        let raw = frame::parse_record(Bytes::from(bytes[4..].to_vec())).unwrap();
        assert_eq!(raw.data_type, 6001);
        assert_eq!(keel_proto::payload::decode(&raw.payload).unwrap()["k"], "v");
    }

    /// The example in PROTOCOL.md, byte for byte.
    #[test]
    fn protocol_page_example_bytes() {
        let out = Shared::default();
        let c = Client::from_io(std::io::empty(), out.clone(), opts(false));
        let record = Record {
            data_type: 6001,
            timestamp: 1_700_000_000,
            data: Some(Payload {
                fields: [("k".to_owned(), "v".to_owned())].into(),
            }),
            seq: 0,
        };
        c.send_record(&record).unwrap();
        c.flush().unwrap();
        let hex: Vec<String> = out.0.lock().unwrap().iter().map(|b| format!("{b:02x}")).collect();
        assert_eq!(
            hex.join(" "),
            "16 00 00 00 08 f1 2e 10 80 e2 cf aa 06 1a 08 0a 06 0a 01 6b 12 01 76 a0 06 01"
        );
    }

    /// Elkeid's agent reads a record at fixed positions: one key byte, data_type,
    /// one key byte, timestamp, one key byte, the payload length, the payload. The
    /// SDK's frames must parse that way too, including a record sent with timestamp 0.
    #[test]
    fn frames_parse_with_elkeids_fixed_order_reader() {
        fn varint(b: &[u8], pos: &mut usize) -> u64 {
            let mut v = 0;
            for shift in (0..64).step_by(7) {
                let byte = b[*pos];
                *pos += 1;
                v |= u64::from(byte & 0x7f) << shift;
                if byte < 0x80 {
                    break;
                }
            }
            v
        }
        let out = Shared::default();
        let c = Client::from_io(std::io::empty(), out.clone(), opts(false));
        c.send_record(&Record {
            data_type: 6002,
            timestamp: 0,
            data: Some(Payload::default()),
            seq: 0,
        })
        .unwrap();
        c.send(6003, [("a", "b")]).unwrap();
        c.flush().unwrap();
        let bytes = out.0.lock().unwrap().clone();
        let mut pos = 0;
        for expect in [6002u64, 6003] {
            let len = u32::from_le_bytes(bytes[pos..pos + 4].try_into().unwrap()) as usize;
            let end = pos + 4 + len;
            pos += 5;
            assert_eq!(varint(&bytes, &mut pos), expect);
            pos += 1;
            assert!(
                varint(&bytes, &mut pos) > 1_600_000_000,
                "a timestamp is always present"
            );
            pos += 1;
            let payload_len = varint(&bytes, &mut pos) as usize;
            // Elkeid takes the rest of the frame as the payload: the record number
            // after it is an unknown field there, which decoders skip.
            let rest = Payload::decode(&bytes[pos..end]).unwrap();
            let payload = Payload::decode(&bytes[pos..pos + payload_len]).unwrap();
            assert_eq!(rest, payload);
            pos = end;
        }
    }

    #[test]
    fn records_are_numbered_from_one_without_gaps() {
        let out = Shared::default();
        let c = Client::from_io(std::io::empty(), out.clone(), opts(false));
        for i in 0..3 {
            c.send_record(&Record {
                data_type: 6001,
                timestamp: 1,
                data: None,
                // What the caller sets is replaced.
                seq: 99,
            })
            .unwrap();
            c.send(6002, [("i", i.to_string())]).unwrap();
        }
        c.flush().unwrap();
        let bytes = out.0.lock().unwrap().clone();
        let mut seqs = Vec::new();
        let mut pos = 0;
        while pos < bytes.len() {
            let len = u32::from_le_bytes(bytes[pos..pos + 4].try_into().unwrap()) as usize;
            let body = Bytes::from(bytes[pos + 4..pos + 4 + len].to_vec());
            assert_eq!(
                Record::decode(body.clone()).unwrap().seq,
                frame::parse_record(body).unwrap().seq
            );
            seqs.push(Record::decode(&bytes[pos + 4..pos + 4 + len]).unwrap().seq);
            pos += 4 + len;
        }
        assert_eq!(seqs, [1, 2, 3, 4, 5, 6]);
    }

    #[test]
    fn serve_answers_every_task_then_flushes() {
        let mut input = Vec::new();
        for i in 0..3 {
            input.extend_from_slice(&frame::encode_task(&Task {
                data_type: 6000,
                token: format!("t{i}"),
                ..Default::default()
            }));
        }
        let out = Shared::default();
        let c = Client::from_io(std::io::Cursor::new(input), out.clone(), opts(false));
        let mut seen = Vec::new();
        c.serve(|task| {
            seen.push(task.token.clone());
            // Buffered, not flushed: serve flushes when the task pipe ends.
            c.send(6001, [("token", task.token.as_str())])
        })
        .unwrap();
        assert_eq!(seen, ["t0", "t1", "t2"]);
        let bytes = out.0.lock().unwrap().clone();
        let mut n = 0;
        let mut pos = 0;
        while pos < bytes.len() {
            pos += 4 + u32::from_le_bytes(bytes[pos..pos + 4].try_into().unwrap()) as usize;
            n += 1;
        }
        assert_eq!(n, 3, "every record written before serve returned");
    }

    #[test]
    fn oversized_and_truncated_tasks_are_errors() {
        let c = Client::from_io(
            std::io::Cursor::new(u32::MAX.to_le_bytes().to_vec()),
            Shared::default(),
            opts(false),
        );
        assert!(matches!(c.receive_task(), Err(Error::Frame(m)) if m.contains("exceeds")));
        let mut half = 10u32.to_le_bytes().to_vec();
        half.extend_from_slice(&[1, 2]);
        let c = Client::from_io(std::io::Cursor::new(half), Shared::default(), opts(false));
        assert!(matches!(c.receive_task(), Err(Error::Frame(m)) if m.contains("inside")));
    }

    #[test]
    fn debug_mode_speaks_json_lines() {
        let input = "{\"data_type\":6000,\"data\":\"x\",\"token\":\"t1\"}\n\n";
        let out = Shared::default();
        let c = Client::from_io(std::io::Cursor::new(input.as_bytes().to_vec()), out.clone(), opts(true));
        let t = c.receive_task().unwrap();
        assert_eq!((t.data_type, t.data.as_str(), t.token.as_str()), (6000, "x", "t1"));
        assert!(matches!(c.receive_task(), Err(Error::Closed)));
        c.task_result("t1", true, "ok").unwrap();
        let text = String::from_utf8(out.0.lock().unwrap().clone()).unwrap();
        let v: serde_json::Value = serde_json::from_str(text.trim()).unwrap();
        assert_eq!(v["data_type"], 5100);
        assert_eq!(v["fields"]["status"], "succeeded");
        assert!(v["timestamp"].as_i64().unwrap() > 0);
    }

    #[test]
    fn a_closed_pipe_is_closed() {
        struct Broken;
        impl Write for Broken {
            fn write(&mut self, _: &[u8]) -> std::io::Result<usize> {
                Err(std::io::Error::from(ErrorKind::BrokenPipe))
            }
            fn flush(&mut self) -> std::io::Result<()> {
                Err(std::io::Error::from(ErrorKind::BrokenPipe))
            }
        }
        let c = Client::from_io(std::io::empty(), Broken, opts(false));
        c.send(1, [("a", "b")]).unwrap();
        assert!(matches!(c.flush(), Err(Error::Closed)));
        assert!(matches!(c.send(1, [("a", "b")]), Err(Error::Closed)));
    }
}
