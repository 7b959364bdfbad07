//! Plugin logs to the agent: a `tracing` layer that sends each event at or above a
//! level as a data_type 1011 record with `level`, `source`, `msg` and the event's
//! fields. Under the agent they end up in the server's data flow; in debug mode they
//! appear on stdout with the other records.

use tracing::field::{Field, Visit};
use tracing::{Event, Level, Subscriber};
use tracing_subscriber::layer::{Context, Layer};

use crate::Client;
use crate::data_type::PLUGIN_LOG;

/// Logs `tracing` events at `level` and above to the agent (1011 records) and to
/// stderr, which the agent writes to the plugin's log file. A second call (or a
/// subscriber set up before) keeps the first.
pub fn init(client: &Client, level: Level) {
    use tracing_subscriber::layer::SubscriberExt;
    use tracing_subscriber::util::SubscriberInitExt;
    let to_agent = AgentLogLayer::new(client.clone(), level);
    let to_stderr = tracing_subscriber::fmt::layer()
        .with_writer(std::io::stderr)
        .with_ansi(false)
        .with_filter(tracing_subscriber::filter::LevelFilter::from_level(level));
    let _ = tracing_subscriber::registry().with(to_agent).with(to_stderr).try_init();
}

/// Sends `tracing` events upstream.
#[derive(Debug, Clone)]
pub struct AgentLogLayer {
    client: Client,
    min: Level,
}

impl AgentLogLayer {
    /// Forwards events at `min` or more severe (e.g. `Level::INFO`).
    pub fn new(client: Client, min: Level) -> Self {
        Self { client, min }
    }
}

#[derive(Default)]
struct Fields(Vec<(String, String)>);

impl Visit for Fields {
    fn record_str(&mut self, field: &Field, value: &str) {
        self.0.push((field.name().to_owned(), value.to_owned()));
    }
    fn record_debug(&mut self, field: &Field, value: &dyn std::fmt::Debug) {
        self.0.push((field.name().to_owned(), format!("{value:?}")));
    }
}

/// The fields of a log record (the agent's 1010, a plugin's 1011) for `event`:
/// `level` (lowercase), `source` (the tracing target), `msg` (the message) and
/// the event's own fields, in order.
pub fn log_fields(event: &Event<'_>) -> Vec<(String, String)> {
    let meta = event.metadata();
    let mut fields = Fields::default();
    event.record(&mut fields);
    let mut out = vec![
        ("level".to_owned(), meta.level().as_str().to_ascii_lowercase()),
        ("source".to_owned(), meta.target().to_owned()),
    ];
    for (k, v) in fields.0 {
        out.push((if k == "message" { "msg".to_owned() } else { k }, v));
    }
    out
}

impl<S: Subscriber> Layer<S> for AgentLogLayer {
    fn on_event(&self, event: &Event<'_>, _ctx: Context<'_, S>) {
        let meta = event.metadata();
        // Level ordering: ERROR < WARN < … < TRACE; keep events at least as severe as `min`.
        if *meta.level() > self.min {
            return;
        }
        // A closed pipe means the plugin is stopping; there is nobody to tell.
        let _ = self.client.send(PLUGIN_LOG, log_fields(event));
    }
}
