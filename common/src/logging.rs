//! Logging setup: `tracing` to a rotating file and to stderr, filtered by `KEEL_LOG`.

use std::io::IsTerminal;
use std::path::PathBuf;

use tracing_appender::non_blocking::WorkerGuard;
use tracing_appender::rolling::{RollingFileAppender, Rotation};
use tracing_subscriber::layer::SubscriberExt;
use tracing_subscriber::util::SubscriberInitExt;
use tracing_subscriber::{EnvFilter, Layer, Registry};

/// The one filter variable, in `tracing` `EnvFilter` syntax.
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
    /// Filter used when `KEEL_LOG` is unset.
    pub default_filter: String,
    /// Also log to stderr.
    pub stderr: bool,
    /// Text or JSON lines.
    pub format: LogFormat,
}

/// Keeps the background file writer alive; logs are flushed when it drops.
#[derive(Debug)]
pub struct LogGuard {
    _file: Option<WorkerGuard>,
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
    /// A global subscriber was already installed.
    #[error("logging already initialised: {0}")]
    Init(#[from] tracing_subscriber::util::TryInitError),
}

fn filter(default: &str) -> EnvFilter {
    EnvFilter::try_from_env(ENV_FILTER).unwrap_or_else(|_| EnvFilter::new(default))
}

/// A layer writing to `writer` in the configured format.
fn layer<W>(opts: &LogOptions, writer: W, ansi: bool) -> BoxedLayer
where
    W: for<'w> tracing_subscriber::fmt::MakeWriter<'w> + Send + Sync + 'static,
{
    let fmt = tracing_subscriber::fmt::layer().with_writer(writer);
    match opts.format {
        LogFormat::Text => fmt.with_ansi(ansi).with_filter(filter(&opts.default_filter)).boxed(),
        LogFormat::Json => fmt
            .json()
            .with_current_span(true)
            .with_span_list(false)
            .with_filter(filter(&opts.default_filter))
            .boxed(),
    }
}

/// Installs the global subscriber: file and/or stderr, plus `extra` layers (for
/// example the agent's upstream error forwarder).
pub fn init(opts: &LogOptions, extra: Vec<BoxedLayer>) -> Result<LogGuard, LogError> {
    let mut layers: Vec<BoxedLayer> = extra;
    let mut guard = None;
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
        let (writer, g) = tracing_appender::non_blocking(appender);
        guard = Some(g);
        layers.push(layer(opts, writer, false));
    }
    if opts.stderr {
        layers.push(layer(opts, std::io::stderr, std::io::stderr().is_terminal()));
    }
    tracing_subscriber::registry().with(layers).try_init()?;
    Ok(LogGuard { _file: guard })
}
