//! Logging setup: `tracing` to a rotating file and to stderr, filtered by `KEEL_LOG`.

use std::io::IsTerminal;
use std::path::PathBuf;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};

use tracing_appender::non_blocking::{ErrorCounter, NonBlocking, NonBlockingBuilder, WorkerGuard};
use tracing_appender::rolling::{RollingFileAppender, Rotation};
use tracing_subscriber::filter::{LevelFilter, Targets};
use tracing_subscriber::layer::SubscriberExt;
use tracing_subscriber::util::SubscriberInitExt;
use tracing_subscriber::{Layer, Registry};

/// The one filter variable: a level (`info`), or comma-separated `target=level`
/// directives after an optional level (`info,h2=warn,keel_agent=debug`).
pub const ENV_FILTER: &str = "KEEL_LOG";

/// A layer that can be added to the process's subscriber.
pub type BoxedLayer = Box<dyn Layer<Registry> + Send + Sync>;

/// How log lines are written.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, serde::Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum LogFormat {
    /// One line of text per event.
    #[default]
    Text,
    /// One JSON object per line, for log shippers: `timestamp`, `level`,
    /// `target`, `fields` (with `message`) and the enclosing `span`'s fields.
    Json,
}

/// Where and how much to log.
#[derive(Debug, Clone)]
pub struct LogOptions {
    /// Directory of the rotating log file; `None` logs to stderr only.
    pub dir: Option<PathBuf>,
    /// File name prefix, e.g. `keel-agent` for `keel-agent.2026-11-22.log`.
    pub file_prefix: String,
    /// How many rotated files to keep.
    pub max_files: usize,
    /// Filter used when `KEEL_LOG` is unset or empty, in its syntax.
    pub default_filter: String,
    /// Also log to stderr.
    pub stderr: bool,
    /// Text or JSON lines.
    pub format: LogFormat,
}

/// Lines queued for the log file's writer thread, at most. A line logged while
/// the queue is full is dropped and counted ([`LogGuard::drop_reporter`]). The
/// queue is allocated whole up front: 32 bytes a line (tracing-appender's
/// default of 128,000 lines cost every process 4 MB).
pub const LOG_QUEUE_LINES: usize = 8192;

/// How often dropped log lines are reported, at most.
pub const DROP_REPORT_EVERY: std::time::Duration = std::time::Duration::from_secs(60);

/// Keeps the background file writer alive; logs are flushed when it drops.
#[derive(Debug)]
pub struct LogGuard {
    _file: Option<WorkerGuard>,
    dropped: Option<ErrorCounter>,
    /// Dropped lines already reported.
    told: Arc<AtomicUsize>,
}

impl LogGuard {
    /// A task to spawn on the process's runtime: every [`DROP_REPORT_EVERY`] it
    /// logs a warning with the lines dropped since the last one, if any. What is
    /// dropped after its last look is reported on stderr when the guard drops.
    pub fn drop_reporter(&self) -> impl std::future::Future<Output = ()> + Send + 'static {
        let (counter, told) = (self.dropped.clone(), Arc::clone(&self.told));
        async move {
            let Some(counter) = counter else { return };
            let mut every = tokio::time::interval(DROP_REPORT_EVERY);
            every.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
            loop {
                every.tick().await;
                let total = counter.dropped_lines();
                let before = told.swap(total, Ordering::Relaxed);
                if total > before {
                    tracing::warn!(
                        dropped = total - before,
                        total,
                        queue = LOG_QUEUE_LINES,
                        "log lines were dropped: the log file's queue was full"
                    );
                }
            }
        }
    }
}

impl Drop for LogGuard {
    fn drop(&mut self) {
        let total = self.dropped.as_ref().map_or(0, ErrorCounter::dropped_lines);
        let before = self.told.swap(total, Ordering::Relaxed);
        if total > before {
            eprintln!(
                "{} log lines were dropped: the log file's queue ({LOG_QUEUE_LINES} lines) was full",
                total - before
            );
        }
    }
}

/// The log file's writer: a thread behind a queue of [`LOG_QUEUE_LINES`] lines.
fn file_writer<W: std::io::Write + Send + 'static>(file: W) -> (NonBlocking, WorkerGuard) {
    NonBlockingBuilder::default()
        .buffered_lines_limit(LOG_QUEUE_LINES)
        .lossy(true)
        .finish(file)
}

/// Logging could not start.
#[derive(Debug, thiserror::Error)]
pub enum LogError {
    /// The log directory could not be created or opened.
    #[error("log directory {dir}: {source}")]
    Dir {
        /// The directory.
        dir: PathBuf,
        /// Why.
        source: Box<dyn std::error::Error + Send + Sync>,
    },
    /// A filter does not parse.
    #[error(
        "{from}: {value:?} is not a log filter ({reason}); write a level (error, warn, info, debug, trace) or target=level directives, e.g. info,h2=warn"
    )]
    Filter {
        /// Where it came from: `KEEL_LOG` or the configuration.
        from: &'static str,
        /// The filter as given.
        value: String,
        /// What the parser said.
        reason: String,
    },
    /// A global subscriber was already installed.
    #[error("logging already initialised: {0}")]
    Init(#[from] tracing_subscriber::util::TryInitError),
}

/// The filter: `KEEL_LOG` when set and not empty, else `default`. Targets and
/// levels only (no regular expressions to compile at start-up, and none to keep
/// in memory).
fn filter(env: Option<String>, default: &str) -> Result<Targets, LogError> {
    let (from, value) = match env {
        Some(v) if !v.trim().is_empty() => (ENV_FILTER, v),
        _ => ("log.level", default.to_owned()),
    };
    // A bare word is a level or nothing: the parser would take it as a target
    // to log at every level, and silence the rest.
    let bare = value
        .split(',')
        .map(str::trim)
        .find(|d| !d.is_empty() && !d.contains('=') && d.parse::<LevelFilter>().is_err());
    if let Some(word) = bare {
        return Err(LogError::Filter {
            from,
            reason: format!("{word:?} is neither a level nor target=level"),
            value,
        });
    }
    value.trim().parse::<Targets>().map_err(|e| LogError::Filter {
        from,
        reason: e.to_string(),
        value,
    })
}

/// A layer writing to `writer` in the configured format.
fn layer<W>(opts: &LogOptions, filter: &Targets, writer: W, ansi: bool) -> BoxedLayer
where
    W: for<'w> tracing_subscriber::fmt::MakeWriter<'w> + Send + Sync + 'static,
{
    let fmt = tracing_subscriber::fmt::layer().with_writer(writer);
    match opts.format {
        LogFormat::Text => fmt.with_ansi(ansi).with_filter(filter.clone()).boxed(),
        LogFormat::Json => fmt
            .json()
            .with_current_span(true)
            .with_span_list(false)
            .with_filter(filter.clone())
            .boxed(),
    }
}

/// Installs the global subscriber: file and/or stderr, plus `extra` layers (for
/// example the agent's upstream error forwarder).
pub fn init(opts: &LogOptions, extra: Vec<BoxedLayer>) -> Result<LogGuard, LogError> {
    let filter = filter(std::env::var(ENV_FILTER).ok(), &opts.default_filter)?;
    let mut layers: Vec<BoxedLayer> = extra;
    let (mut guard, mut dropped) = (None, None);
    if let Some(dir) = &opts.dir {
        std::fs::create_dir_all(dir).map_err(|e| LogError::Dir {
            dir: dir.clone(),
            source: Box::new(e),
        })?;
        let appender = RollingFileAppender::builder()
            .rotation(Rotation::DAILY)
            .filename_prefix(&opts.file_prefix)
            .filename_suffix("log")
            .max_log_files(opts.max_files.max(1))
            .build(dir)
            .map_err(|e| LogError::Dir {
                dir: dir.clone(),
                source: Box::new(e),
            })?;
        let (writer, g) = file_writer(appender);
        guard = Some(g);
        dropped = Some(writer.error_counter());
        layers.push(layer(opts, &filter, writer, false));
    }
    if opts.stderr {
        layers.push(layer(opts, &filter, std::io::stderr, std::io::stderr().is_terminal()));
    }
    tracing_subscriber::registry().with(layers).try_init()?;
    Ok(LogGuard {
        _file: guard,
        dropped,
        told: Arc::default(),
    })
}

#[cfg(test)]
mod tests {
    use std::io::Write;
    use std::sync::mpsc;

    use super::*;

    /// A file that blocks every write until told to go on.
    struct Stuck(mpsc::Receiver<()>);

    impl Write for Stuck {
        fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
            let _ = self.0.recv();
            Ok(buf.len())
        }
        fn flush(&mut self) -> std::io::Result<()> {
            Ok(())
        }
    }

    #[test]
    fn a_filter_is_a_level_or_target_directives_and_a_bad_one_is_named() {
        use tracing::Level;
        let f = filter(Some("info,h2=warn,keel_agent=debug".into()), "error").expect("a filter");
        assert!(f.would_enable("keel_agent::transport", &Level::DEBUG));
        assert!(!f.would_enable("h2::proto", &Level::INFO));
        assert!(f.would_enable("tokio", &Level::INFO));
        assert!(!f.would_enable("tokio", &Level::DEBUG));
        // Unset or empty: the configured level.
        let f = filter(Some("  ".into()), "warn").expect("the default");
        assert!(f.would_enable("x", &Level::WARN) && !f.would_enable("x", &Level::INFO));
        let e = filter(Some("info,h2=loud".into()), "info").unwrap_err().to_string();
        assert!(e.starts_with("KEEL_LOG: \"info,h2=loud\" is not a log filter"), "{e}");
        let e = filter(None, "verbose").unwrap_err().to_string();
        assert!(e.starts_with("log.level: \"verbose\" is not a log filter"), "{e}");
        assert!(e.contains("\"verbose\" is neither a level nor target=level"), "{e}");
        assert!(
            filter(None, "warn,keel_agent=debug,").is_ok(),
            "a trailing comma is fine"
        );
    }

    #[test]
    fn lines_past_the_queue_are_dropped_and_counted() {
        let (go, wait) = mpsc::channel();
        let (mut writer, guard) = file_writer(Stuck(wait));
        let counter = writer.error_counter();
        // The writer thread takes at most one line before it is stuck; the queue
        // holds LOG_QUEUE_LINES more.
        for _ in 0..LOG_QUEUE_LINES + 100 {
            writer.write_all(b"a line\n").expect("a lossy writer never fails");
        }
        let dropped = counter.dropped_lines();
        assert!(
            (99..=100).contains(&dropped),
            "{dropped} lines dropped of 100 past the queue"
        );
        drop(go);
        drop(guard);
    }
}
