//! One plugin's life: start it, move its records and tasks, notice faults, restart
//! it with backoff, stop it on request.
//!
//! Nothing a plugin does reaches past this module: a bad frame, an exit, a hang or
//! a pipe it never reads only ever ends or restarts this plugin.

use std::convert::Infallible;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use bytes::{Buf, BytesMut};
use keel_common::backoff::Backoff;
use keel_common::time::now_secs;
use keel_proto::data_type::{self, FromPlugin};
use keel_proto::frame::{self, FrameError};
use keel_proto::grpc::Task;
use nix::sys::signal::{Signal, killpg};
use nix::unistd::Pid;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::unix::pipe;
use tokio::sync::{Notify, mpsc};
use tokio_util::sync::CancellationToken;
use tracing::{Instrument, info, warn};

use super::cgroup::{Cgroups, PluginCgroup};
use super::logfile::{self, RotatingLog};
use super::spawn;
use crate::config::PluginLimits;
use crate::outbox::Outbox;
use crate::record::{Record, Source};
use crate::tasks::{self, TaskRequest};

/// A run shorter than this counts towards a crash loop; a longer one resets the backoff.
const STABLE: Duration = Duration::from_secs(60);
/// After the process exits, how long to keep reading what it wrote before.
const DRAIN_AFTER_EXIT: Duration = Duration::from_secs(2);

/// What the heartbeat and the runtime read about a plugin.
#[derive(Debug, Default)]
pub struct Status {
    inner: Mutex<StatusInner>,
    /// Records read from the plugin.
    pub records: AtomicU64,
    /// Record bytes read from the plugin.
    pub bytes: AtomicU64,
    /// Tasks written to the plugin.
    pub tasks: AtomicU64,
    /// Tasks refused because the queue was full.
    pub refused_tasks: AtomicU64,
}

/// A snapshot of a plugin's state.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct StatusInner {
    /// `starting`, `running`, `backoff`, `crashloop`, `stopping` or `stopped`.
    pub state: &'static str,
    /// PID while running.
    pub pid: Option<u32>,
    /// When the current process started, Unix seconds.
    pub started_at: i64,
    /// Restarts after unexpected exits.
    pub restarts: u64,
    /// How the last process ended.
    pub last_exit: String,
    /// The last protocol or start fault.
    pub last_fault: String,
    /// OOM kills seen in its cgroup.
    pub oom_kills: u64,
    /// Whether it runs in its own cgroup.
    pub limited: bool,
}

impl Status {
    /// A snapshot.
    pub fn get(&self) -> StatusInner {
        self.inner.lock().unwrap_or_else(|p| p.into_inner()).clone()
    }

    fn update(&self, f: impl FnOnce(&mut StatusInner)) {
        f(&mut self.inner.lock().unwrap_or_else(|p| p.into_inner()));
    }
}

/// Everything needed to run one plugin.
#[derive(Debug)]
pub struct Supervisor {
    /// Plugin name.
    pub name: String,
    /// Its directory (working directory; the executable is `<dir>/<name>`).
    pub dir: std::path::PathBuf,
    /// Installed version.
    pub version: String,
    /// `Config.detail`, passed as `DETAIL`.
    pub detail: String,
    /// Largest frame accepted.
    pub max_frame: usize,
    /// After closing fd 3, how long a stopping plugin may keep writing before SIGTERM.
    pub stop_wait: Duration,
    /// SIGTERM to SIGKILL.
    pub grace: Duration,
    /// Restart schedule.
    pub backoff: Backoff,
    /// Limits for its cgroup.
    pub limits: PluginLimits,
    /// Where cgroups go, if anywhere.
    pub cgroups: Option<Arc<Cgroups>>,
    /// Where records go.
    pub outbox: Outbox,
    /// Shared status.
    pub status: Arc<Status>,
    /// Tasks for the plugin.
    pub tasks: mpsc::Receiver<TaskRequest>,
    /// Cancelled to stop the plugin for good.
    pub stop: CancellationToken,
    /// Notified on every state change, so the heartbeat reports it at once.
    pub changed: Arc<Notify>,
}

/// How one process run ended.
enum Ended {
    Stopped,
    Exited {
        how: String,
        fault: Option<String>,
        ran: Duration,
    },
}

fn describe_exit(status: std::process::ExitStatus) -> String {
    use std::os::unix::process::ExitStatusExt;
    match (status.code(), status.signal()) {
        (Some(code), _) => format!("exited with status {code}"),
        (None, Some(sig)) => {
            let name = Signal::try_from(sig)
                .map(|s| s.as_str().to_owned())
                .unwrap_or_else(|_| sig.to_string());
            format!("killed by {name}")
        }
        _ => "ended".to_owned(),
    }
}

/// Reads frames until the pipe closes, handing records to the outbox's normal or
/// `high` lane. Waiting on a full lane stops the reading, so the plugin's writes
/// block: backpressure. The buffer is allocated at the first byte: most plugins
/// never write on fd 5.
async fn read_frames(
    mut pipe: pipe::Receiver,
    outbox: &Outbox,
    high: bool,
    max: usize,
    status: &Status,
    run: &Run,
) -> Result<(), FrameError> {
    let mut buf = BytesMut::new();
    if pipe.readable().await.is_err() {
        return Ok(());
    }
    loop {
        let mut records = Vec::new();
        let parsed = parse_frames(&mut buf, max, status, run, &mut records);
        // What was whole before a bad frame still goes out; then the fault counts.
        if !records.is_empty() {
            status.records.fetch_add(records.len() as u64, Ordering::Relaxed);
            let sent = if high {
                outbox.send_all_high(records).await
            } else {
                outbox.send_all(records).await
            };
            if !sent {
                return Ok(());
            }
        }
        parsed?;
        if buf.capacity() - buf.len() < 16 << 10 {
            buf.reserve(64 << 10);
        }
        let n = pipe.read_buf(&mut buf).await.unwrap_or(0);
        if n == 0 {
            if buf.is_empty() {
                return Ok(());
            }
            let missing = match buf.len() {
                l if l < 4 => 4 - l,
                l => (u32::from_le_bytes([buf[0], buf[1], buf[2], buf[3]]) as usize + 4).saturating_sub(l),
            };
            return Err(FrameError::Truncated { missing });
        }
    }
}

/// One run of a plugin process, named in each of its records.
#[derive(Debug)]
struct Run {
    plugin: Arc<str>,
    instance: u32,
}

/// Moves every whole frame at the front of `buf` into `records`, up to the first
/// bad one, whose error is returned.
fn parse_frames(
    buf: &mut BytesMut,
    max: usize,
    status: &Status,
    run: &Run,
    records: &mut Vec<Record>,
) -> Result<(), FrameError> {
    while buf.len() >= 4 {
        let len = frame::frame_len([buf[0], buf[1], buf[2], buf[3]], max)?;
        if buf.len() < 4 + len {
            buf.reserve(4 + len - buf.len());
            break;
        }
        buf.advance(4);
        let raw = frame::parse_record(buf.split_to(len).freeze())?;
        let data_type = match data_type::from_plugin(raw.data_type) {
            FromPlugin::Pass => raw.data_type,
            FromPlugin::As(t) => t,
            FromPlugin::Refused => return Err(FrameError::Reserved(raw.data_type)),
        };
        status.bytes.fetch_add(len as u64, Ordering::Relaxed);
        let timestamp = if raw.timestamp == 0 { now_secs() } else { raw.timestamp };
        records.push(Record {
            data_type,
            timestamp,
            data: raw.payload,
            source: Some(Source {
                plugin: Arc::clone(&run.plugin),
                instance: run.instance,
                seq: raw.seq,
            }),
        });
    }
    Ok(())
}

/// Writes tasks to the plugin as they come. A plugin that never reads blocks only
/// this future (its queue then fills and further tasks are refused as busy). It
/// never completes: it ends by being dropped, which closes the pipe.
async fn write_tasks(mut pipe: pipe::Sender, tasks: &mut mpsc::Receiver<TaskRequest>, status: &Status) -> Infallible {
    while let Some(t) = tasks.recv().await {
        let token = t.token.clone();
        let frame = frame::encode_task(&Task {
            data_type: t.data_type,
            object_name: t.object_name,
            data: t.data,
            token: t.token,
        });
        if pipe.write_all(&frame).await.is_err() {
            // It closed fd 3; it may still be running and writing records.
            warn!(%token, "plugin closed its task pipe; task not delivered");
            break;
        }
        status.tasks.fetch_add(1, Ordering::Relaxed);
    }
    std::future::pending().await
}

fn signal_group(pid: u32, sig: Signal) {
    if let Ok(pid) = i32::try_from(pid) {
        let _ = killpg(Pid::from_raw(pid), sig);
    }
}

/// Kills whatever is left in the plugin's cgroup (children that left its process group).
fn sweep(cgroup: Option<&PluginCgroup>) {
    let Some(cg) = cgroup else { return };
    for _ in 0..10 {
        let pids = cg.pids();
        if pids.is_empty() {
            return;
        }
        for pid in pids {
            let _ = nix::sys::signal::kill(Pid::from_raw(pid), Signal::SIGKILL);
        }
        std::thread::sleep(Duration::from_millis(10));
    }
}

impl Supervisor {
    /// Runs the plugin until stopped, restarting it after every unexpected end.
    /// Everything it logs is in the plugin's span ([`super::span`]).
    pub async fn run(self) {
        let span = super::span(&self.name);
        self.supervise().instrument(span).await;
    }

    async fn supervise(mut self) {
        let mut warned_cgroup = false;
        loop {
            if self.stop.is_cancelled() {
                break;
            }
            let cgroup = match &self.cgroups {
                Some(c) => match c.create(&self.name, &self.limits) {
                    Ok(cg) => Some(cg),
                    Err(e) => {
                        if !warned_cgroup {
                            warn!(error = %e, "cannot create the plugin's cgroup; it runs without limits");
                            warned_cgroup = true;
                        }
                        None
                    }
                },
                None => None,
            };
            let ended = self.run_once(cgroup.as_ref()).await;
            sweep(cgroup.as_ref());
            let (how, fault, ran) = match ended {
                Ended::Stopped => {
                    if let Some(cg) = &cgroup {
                        cg.remove();
                    }
                    break;
                }
                Ended::Exited { how, fault, ran } => (how, fault, ran),
            };
            let oom = cgroup.as_ref().map_or(0, PluginCgroup::oom_kills);
            let how = if oom > self.status.get().oom_kills {
                format!("{how} (out of memory: its cgroup limit)")
            } else {
                how
            };
            if ran >= STABLE {
                self.backoff.reset();
            }
            let delay = self.backoff.next_delay();
            let crashloop = self.backoff.attempts() >= 3;
            self.status.update(|s| {
                s.state = if crashloop { "crashloop" } else { "backoff" };
                s.pid = None;
                s.restarts += 1;
                s.last_exit = how.clone();
                s.oom_kills = oom;
                if let Some(f) = &fault {
                    s.last_fault = f.clone();
                }
            });
            let msg = match &fault {
                Some(f) => format!("plugin {} stopped for a fault: {f}; {how}", self.name),
                None => format!("plugin {} {how}", self.name),
            };
            warn!(restart_in = ?delay, crashloop, "{msg}");
            self.changed.notify_one();
            let mut report = tasks::result("", false, &msg);
            report.data = keel_proto::payload::encode([
                ("token", ""),
                ("status", "failed"),
                ("msg", msg.as_str()),
                ("plugin", self.name.as_str()),
                ("version", self.version.as_str()),
            ]);
            self.outbox.try_send(report);
            tokio::select! {
                _ = self.stop.cancelled() => break,
                _ = tokio::time::sleep(delay) => {}
            }
        }
        self.status.update(|s| {
            s.state = "stopped";
            s.pid = None;
        });
        self.changed.notify_one();
    }

    /// One run of the process: start it, move records and tasks until it ends or
    /// is stopped, then stop it gracefully.
    async fn run_once(&mut self, cgroup: Option<&PluginCgroup>) -> Ended {
        self.status.update(|s| s.state = "starting");
        let procs = self.cgroup_procs(cgroup);
        let limited = !procs.is_empty();
        let started = Instant::now();
        let spawned = match self.spawn(procs) {
            Ok(s) => s,
            Err(ended) => return ended,
        };
        let pid = spawned.pid;
        self.mark_running(pid, limited);
        let pumps = self.pump_output(spawned.stdout, spawned.stderr);
        let mut child = spawned.child;
        let run = Run {
            plugin: Arc::from(self.name.as_str()),
            instance: rand::random::<u32>().max(1),
        };
        // Both pipes, until both close or one fails.
        let reader = async {
            tokio::try_join!(
                read_frames(spawned.records, &self.outbox, false, self.max_frame, &self.status, &run),
                read_frames(spawned.high, &self.outbox, true, self.max_frame, &self.status, &run),
            )
            .map(drop)
        };
        tokio::pin!(reader);
        let mut writer = Box::pin(write_tasks(spawned.tasks, &mut self.tasks, &self.status));
        let (outcome, reader_done) =
            until_ended(&mut child, reader.as_mut(), writer.as_mut(), &self.stop, pid, started).await;
        // Closing the task pipe is the first stop signal a plugin sees.
        drop(writer);
        if let Ended::Stopped = outcome {
            self.status.update(|s| s.state = "stopping");
            let stopping = Stopping {
                pid,
                stop_wait: self.stop_wait,
                grace: self.grace,
            };
            stopping.stop(&mut child, reader.as_mut(), reader_done).await;
        }
        for p in pumps {
            p.abort();
        }
        outcome
    }

    /// The open `cgroup.procs` of the plugin's cgroup (empty: no limits).
    fn cgroup_procs(&self, cgroup: Option<&PluginCgroup>) -> Vec<std::os::fd::OwnedFd> {
        match cgroup.map(PluginCgroup::open_procs).transpose() {
            Ok(p) => p.unwrap_or_default(),
            Err(e) => {
                warn!(error = %e, "cannot open the plugin's cgroup; it runs without limits");
                Vec::new()
            }
        }
    }

    /// Starts the process with its environment, or says how the run ended.
    fn spawn(&self, procs: Vec<std::os::fd::OwnedFd>) -> Result<spawn::Spawned, Ended> {
        let exe = self.dir.join(&self.name);
        let env = vec![
            (
                "PATH".to_owned(),
                "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin".to_owned(),
            ),
            ("DETAIL".to_owned(), self.detail.clone()),
            ("KEEL_PLUGIN_NAME".to_owned(), self.name.clone()),
            ("KEEL_PLUGIN_VERSION".to_owned(), self.version.clone()),
        ];
        spawn::spawn(&exe, &self.dir, &env, procs).map_err(|e| Ended::Exited {
            how: "did not start".into(),
            fault: Some(format!("cannot start {}: {e}", exe.display())),
            ran: Duration::ZERO,
        })
    }

    fn mark_running(&self, pid: u32, limited: bool) {
        info!(pid, version = %self.version, limited, "plugin started");
        self.status.update(|s| {
            s.state = "running";
            s.pid = Some(pid);
            s.started_at = now_secs();
            s.limited = limited;
        });
        self.changed.notify_one();
    }

    /// Copies the plugin's stdout and stderr into its rotating log.
    fn pump_output(
        &self,
        stdout: Option<tokio::process::ChildStdout>,
        stderr: Option<tokio::process::ChildStderr>,
    ) -> Vec<tokio::task::JoinHandle<()>> {
        let log = Arc::new(Mutex::new(RotatingLog::open(&self.dir, &self.name)));
        let mut pumps = Vec::new();
        if let Some(out) = stdout {
            pumps.push(tokio::spawn(logfile::pump(out, Arc::clone(&log)).in_current_span()));
        }
        if let Some(err) = stderr {
            pumps.push(tokio::spawn(logfile::pump(err, Arc::clone(&log)).in_current_span()));
        }
        pumps
    }
}

/// Waits for the run to end: the process exits (what it wrote before is still
/// read), its record pipes fail or close, or the plugin is stopped. Also says
/// whether the reader finished.
async fn until_ended(
    child: &mut tokio::process::Child,
    mut reader: std::pin::Pin<&mut impl Future<Output = Result<(), FrameError>>>,
    writer: std::pin::Pin<&mut impl Future<Output = Infallible>>,
    stop: &CancellationToken,
    pid: u32,
    started: Instant,
) -> (Ended, bool) {
    let mut reader_done = false;
    let outcome = tokio::select! {
        exit = child.wait() => {
            // What it wrote before exiting is still in the pipe: read it.
            let fault = match tokio::time::timeout(DRAIN_AFTER_EXIT, reader.as_mut()).await {
                Ok(Err(f)) => Some(f.to_string()),
                _ => None,
            };
            let how = exit.map(describe_exit).unwrap_or_else(|e| format!("wait failed: {e}"));
            Ended::Exited { how, fault, ran: started.elapsed() }
        }
        r = reader.as_mut() => {
            reader_done = true;
            match r {
                Err(fault) => {
                    signal_group(pid, Signal::SIGKILL);
                    let how = child.wait().await.map(describe_exit).unwrap_or_default();
                    Ended::Exited { how, fault: Some(fault.to_string()), ran: started.elapsed() }
                }
                // It closed its record pipe; it may still be running.
                Ok(()) => {
                    tokio::select! {
                        exit = child.wait() => {
                            let how = exit.map(describe_exit).unwrap_or_default();
                            Ended::Exited { how, fault: None, ran: started.elapsed() }
                        }
                        _ = stop.cancelled() => Ended::Stopped,
                    }
                }
            }
        }
        never = writer => match never {},
        _ = stop.cancelled() => Ended::Stopped,
    };
    (outcome, reader_done)
}

/// How a stopped plugin is brought down.
struct Stopping {
    pid: u32,
    stop_wait: Duration,
    grace: Duration,
}

impl Stopping {
    /// Asked by the closed task pipe, it flushes and exits on its own: read all it
    /// writes until then, for at most `stop_wait`; then SIGTERM, and after `grace`
    /// SIGKILL of its group.
    async fn stop(
        &self,
        child: &mut tokio::process::Child,
        mut reader: std::pin::Pin<&mut impl Future<Output = Result<(), FrameError>>>,
        reader_done: bool,
    ) {
        let mut read_all = reader_done;
        let on_its_own = {
            let drain = async {
                if !read_all {
                    let _ = reader.as_mut().await;
                    read_all = true;
                }
                let _ = child.wait().await;
            };
            tokio::time::timeout(self.stop_wait, drain).await.is_ok()
        };
        if !on_its_own {
            info!(wait = ?self.stop_wait, "plugin still running after its task pipe closed; sending SIGTERM");
            signal_group(self.pid, Signal::SIGTERM);
            let wait = async {
                if read_all {
                    let _ = child.wait().await;
                } else {
                    // Keep reading so a plugin flushing its last records can finish.
                    let _ = tokio::join!(child.wait(), reader.as_mut());
                }
            };
            if tokio::time::timeout(self.grace, wait).await.is_err() {
                warn!(grace = ?self.grace, "plugin ignored SIGTERM; killing its process group");
                signal_group(self.pid, Signal::SIGKILL);
                let _ = child.wait().await;
            }
        }
        info!("plugin stopped");
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use std::io::Write;

    use super::*;

    /// A `MakeWriter` that keeps what is logged.
    #[derive(Clone, Default)]
    struct Captured(Arc<Mutex<Vec<u8>>>);

    impl Write for Captured {
        fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
            self.0.lock().unwrap().extend_from_slice(buf);
            Ok(buf.len())
        }
        fn flush(&mut self) -> std::io::Result<()> {
            Ok(())
        }
    }

    impl<'a> tracing_subscriber::fmt::MakeWriter<'a> for Captured {
        type Writer = Captured;
        fn make_writer(&'a self) -> Self::Writer {
            self.clone()
        }
    }

    #[tokio::test]
    async fn every_line_about_a_plugin_names_it_in_its_span() {
        let captured = Captured::default();
        let subscriber = tracing_subscriber::fmt()
            .with_writer(captured.clone())
            .with_ansi(false)
            .finish();
        let _default = tracing::subscriber::set_default(subscriber);

        let dir = tempfile::tempdir().unwrap();
        let (outbox, _lanes) = Outbox::channel(16);
        let status = Arc::new(Status::default());
        let stop = CancellationToken::new();
        let sup = Supervisor {
            name: "ghost".into(),
            // No executable there: the start fails, which is logged as a fault.
            dir: dir.path().to_owned(),
            version: "1.0.0".into(),
            detail: String::new(),
            max_frame: 1 << 20,
            stop_wait: Duration::from_millis(100),
            grace: Duration::from_millis(100),
            backoff: Backoff::new(Duration::from_millis(10), Duration::from_millis(20), 0.0),
            limits: PluginLimits::default(),
            cgroups: None,
            outbox,
            status: Arc::clone(&status),
            tasks: mpsc::channel(1).1,
            stop: stop.clone(),
            changed: Arc::new(Notify::new()),
        };
        let watch = async {
            let deadline = Instant::now() + Duration::from_secs(10);
            while status.get().restarts == 0 && Instant::now() < deadline {
                tokio::time::sleep(Duration::from_millis(10)).await;
            }
            stop.cancel();
        };
        tokio::join!(sup.run(), watch);

        let text = String::from_utf8(captured.0.lock().unwrap().clone()).unwrap();
        let fault = text
            .lines()
            .find(|l| l.contains("stopped for a fault"))
            .unwrap_or_else(|| panic!("no fault logged: {text}"));
        assert!(fault.contains("plugin{name=ghost}"), "{fault}");
        assert!(
            text.lines().all(|l| l.contains("plugin{name=ghost}")),
            "a line outside the plugin's span: {text}"
        );
    }
}
