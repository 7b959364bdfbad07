//! Errors the agent logs also go upstream as data_type 1010 records, with `level`,
//! `source` (the tracing target), `msg` and the event's structured fields.
//!
//! The layer never blocks: it hands records to a bounded channel and counts what
//! does not fit.

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};

use keel_proto::data_type;
use tokio::sync::mpsc;
use tracing::{Event, Level, Subscriber};
use tracing_subscriber::layer::{Context, Layer};

use crate::record::Record;

/// Error records waiting for the outbox.
const QUEUE: usize = 256;

/// The tracing layer.
#[derive(Debug, Clone)]
pub struct UpstreamErrors {
    tx: mpsc::Sender<Record>,
    dropped: Arc<AtomicU64>,
}

impl UpstreamErrors {
    /// The layer and the receiving end to drain into the outbox.
    pub fn new() -> (Self, mpsc::Receiver<Record>) {
        let (tx, rx) = mpsc::channel(QUEUE);
        (
            Self {
                tx,
                dropped: Arc::new(AtomicU64::new(0)),
            },
            rx,
        )
    }
}

impl<S: Subscriber> Layer<S> for UpstreamErrors {
    fn on_event(&self, event: &Event<'_>, _ctx: Context<'_, S>) {
        if *event.metadata().level() != Level::ERROR {
            return;
        }
        let fields = keel_plugin_sdk::logging::log_fields(event);
        if self
            .tx
            .try_send(Record::new(data_type::AGENT_ERROR_LOG, fields))
            .is_err()
        {
            self.dropped.fetch_add(1, Ordering::Relaxed);
        }
    }
}

#[cfg(test)]
mod tests {
    use keel_proto::payload;
    use tracing_subscriber::layer::SubscriberExt;

    use super::*;

    #[test]
    fn errors_become_1010_records() {
        let (layer, mut rx) = UpstreamErrors::new();
        let subscriber = tracing_subscriber::registry().with(layer);
        tracing::subscriber::with_default(subscriber, || {
            tracing::info!("not forwarded");
            tracing::error!(plugin = "p1", "plugin crashed");
        });
        let r = rx.try_recv().unwrap();
        assert_eq!(r.data_type, 1010);
        let f = payload::decode(&r.data).unwrap();
        assert_eq!(f["msg"], "plugin crashed");
        assert_eq!(f["plugin"], "p1");
        assert_eq!(f["level"], "error");
        assert!(rx.try_recv().is_err());
    }
}
