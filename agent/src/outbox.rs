//! The agent's outbound data path: producers → outbox → batcher → spool → stream.
//!
//! Producers (heartbeat, logs, task results, plugin pipes) put records into a
//! bounded channel and wait when it is full: that wait is the backpressure that
//! stops the agent reading a plugin's pipe. A second channel, the high-priority
//! lane (what plugins write on fd 5), has its own room and is always taken from
//! first, so its records go into the next batch ahead of any waiting normal ones. The batcher cuts records into batches
//! (by count and size), encodes each straight into the bytes of a `PackagedData`,
//! and appends it to the [`Spool`], which waits while it is full and connected.
//!
//! A batch holds what is waiting when the batcher takes it: the records that
//! arrived while the previous batch was being written. So records reach the spool
//! (the page cache) as soon as they are read, and batches grow with the load, as
//! a group commit does. A `batch_interval` above zero has a batch wait that long
//! for more records instead.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, RwLock};
use std::time::{Duration, Instant};

use bytes::BytesMut;
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;
use tracing::{error, info};

use crate::record::{Header, Record};
use crate::spool::Spool;
use crate::wire;

/// The producers' end: cheap to clone. Items are chunks of records, so a plugin
/// pipe read of many frames costs one channel operation.
#[derive(Debug, Clone)]
pub struct Outbox {
    tx: mpsc::Sender<Vec<Record>>,
    high: mpsc::Sender<Vec<Record>>,
    dropped: Arc<AtomicU64>,
}

/// The batcher's end of the two lanes.
#[derive(Debug)]
pub struct Lanes {
    high: mpsc::Receiver<Vec<Record>>,
    normal: mpsc::Receiver<Vec<Record>>,
}

impl Lanes {
    /// The next chunk, high-priority first; `None` once every producer is gone
    /// and both lanes are empty.
    async fn recv(&mut self) -> Option<Vec<Record>> {
        tokio::select! {
            biased;
            Some(r) = self.high.recv() => Some(r),
            r = self.normal.recv() => match r {
                Some(r) => Some(r),
                // Both senders live in the same `Outbox`es: gone together.
                None => self.high.try_recv().ok(),
            },
        }
    }

    /// A chunk already waiting, high-priority first.
    fn try_recv(&mut self) -> Option<Vec<Record>> {
        self.high.try_recv().or_else(|_| self.normal.try_recv()).ok()
    }

    fn close(&mut self) {
        self.high.close();
        self.normal.close();
    }
}

impl Outbox {
    /// Two lanes of `capacity` chunks each; the receivers go to [`batcher`].
    pub fn channel(capacity: usize) -> (Self, Lanes) {
        let (tx, normal) = mpsc::channel(capacity.max(1));
        let (high_tx, high) = mpsc::channel(capacity.max(1));
        (
            Self {
                tx,
                high: high_tx,
                dropped: Arc::new(AtomicU64::new(0)),
            },
            Lanes { high, normal },
        )
    }

    /// Queues records on the high-priority lane, waiting while it is full.
    /// Returns false after shutdown.
    pub async fn send_all_high(&self, records: Vec<Record>) -> bool {
        records.is_empty() || self.high.send(records).await.is_ok()
    }

    /// Queues a record, waiting while the queue is full. Returns false after shutdown.
    pub async fn send(&self, record: Record) -> bool {
        self.tx.send(vec![record]).await.is_ok()
    }

    /// Queues records, waiting while the queue is full. Returns false after shutdown.
    pub async fn send_all(&self, records: Vec<Record>) -> bool {
        records.is_empty() || self.tx.send(records).await.is_ok()
    }

    /// Queues a record if there is room; otherwise drops and counts it. For
    /// producers that must never block, such as logging.
    pub fn try_send(&self, record: Record) -> bool {
        match self.tx.try_send(vec![record]) {
            Ok(()) => true,
            Err(_) => {
                self.dropped.fetch_add(1, Ordering::Relaxed);
                false
            }
        }
    }

    /// Records dropped by [`try_send`](Self::try_send).
    pub fn dropped(&self) -> u64 {
        self.dropped.load(Ordering::Relaxed)
    }
}

/// Limits of one batch.
#[derive(Debug, Clone, Copy)]
pub struct BatchLimits {
    /// How long a batch may wait for more records; zero: not at all.
    pub interval: Duration,
    /// Cut at this many records.
    pub max_records: usize,
    /// Cut at this many encoded bytes.
    pub max_bytes: usize,
}

struct Building {
    buf: BytesMut,
    records: usize,
}

impl Building {
    fn new() -> Self {
        // Grows as records arrive; a fixed large capacity would stay pinned in the
        // spool's cache even for a one-record batch.
        Self {
            buf: BytesMut::with_capacity(8192),
            records: 0,
        }
    }

    fn add(&mut self, records: Vec<Record>) {
        for r in &records {
            wire::put_record(&mut self.buf, r);
        }
        self.records += records.len();
    }

    fn full(&self, limits: &BatchLimits) -> bool {
        self.records >= limits.max_records || self.buf.len() >= limits.max_bytes
    }
}

/// How often a spool that keeps refusing batches is logged.
const SPOOL_WARN_EVERY: Duration = Duration::from_secs(10);

/// Cuts the record channel into batches until `shutdown` and the channel is
/// drained, appending each to `spool`. Returns when every producer is gone. A
/// batch the spool cannot take is counted there as dropped; this carries on, so
/// the data flow resumes by itself once the spool has room again.
pub async fn batcher(
    mut rx: Lanes,
    spool: Arc<Spool>,
    header: Arc<RwLock<Header>>,
    limits: BatchLimits,
    shutdown: CancellationToken,
) {
    let mut stopping = false;
    let mut refused = Refusals::default();
    loop {
        let first = if stopping {
            rx.try_recv()
        } else {
            tokio::select! {
                r = rx.recv() => r,
                _ = shutdown.cancelled() => {
                    // Whatever producers queued before shutdown still goes to the spool.
                    stopping = true;
                    rx.close();
                    continue;
                }
            }
        };
        let Some(first) = first else { break };
        let mut batch = Building::new();
        batch.add(first);
        let deadline = tokio::time::sleep(limits.interval);
        tokio::pin!(deadline);
        while !batch.full(&limits) {
            let more = if stopping || limits.interval.is_zero() {
                rx.try_recv()
            } else {
                tokio::select! {
                    r = rx.recv() => r,
                    _ = &mut deadline => None,
                    _ = shutdown.cancelled() => None,
                }
            };
            let Some(more) = more else { break };
            batch.add(more);
        }
        {
            let h = header.read().unwrap_or_else(|p| p.into_inner());
            wire::put_header(&mut batch.buf, &h);
        }
        let writer = Arc::clone(&spool);
        let records = u32::try_from(batch.records).unwrap_or(u32::MAX);
        let appended = tokio::task::spawn_blocking(move || writer.append(batch.buf, records)).await;
        match appended {
            Ok(Ok(())) => refused.recovered(),
            Ok(Err(e)) => refused.note(&e.to_string(), records),
            Err(e) => {
                // The write never finished (its task panicked): the spool did not count it.
                spool.count_lost(records);
                refused.note(&format!("spool task failed: {e}"), records);
            }
        }
    }
}

/// Batches the spool refused, logged at most every [`SPOOL_WARN_EVERY`].
#[derive(Default)]
struct Refusals {
    last_warning: Option<Instant>,
    batches: u64,
    records: u64,
}

impl Refusals {
    fn note(&mut self, error: &str, records: u32) {
        self.batches += 1;
        self.records += u64::from(records);
        if self.last_warning.is_none_or(|t| t.elapsed() >= SPOOL_WARN_EVERY) {
            error!(
                error,
                batches = self.batches,
                records = self.records,
                "the spool refused batches; their records are counted as dropped"
            );
            self.last_warning = Some(Instant::now());
            self.batches = 0;
            self.records = 0;
        }
    }

    fn recovered(&mut self) {
        if self.last_warning.take().is_some() {
            info!(
                refused_since_warning = self.batches,
                dropped_records = self.records,
                "the spool takes batches again"
            );
            self.batches = 0;
            self.records = 0;
        }
    }
}

#[cfg(test)]
mod tests {
    use bytes::Bytes;
    use keel_proto::grpc::PackagedData;
    use prost::Message;

    use super::*;
    use crate::spool::SpoolOptions;

    fn rec(n: u8) -> Record {
        Record {
            data_type: 1,
            timestamp: 0,
            data: Bytes::from(vec![n; 10]),
            source: None,
        }
    }

    #[tokio::test]
    async fn the_high_lane_is_taken_first_and_both_drain_after_the_producers_go() {
        let (outbox, mut lanes) = Outbox::channel(10);
        assert!(outbox.send(rec(1)).await);
        assert!(outbox.send(rec(2)).await);
        assert!(outbox.send_all_high(vec![rec(9)]).await);
        assert_eq!(lanes.recv().await.unwrap(), vec![rec(9)]);
        assert!(outbox.send_all_high(vec![rec(8)]).await);
        assert_eq!(lanes.try_recv().unwrap(), vec![rec(8)]);
        assert_eq!(lanes.recv().await.unwrap(), vec![rec(1)]);
        assert!(outbox.send_all_high(vec![rec(7)]).await);
        drop(outbox);
        assert_eq!(lanes.recv().await.unwrap(), vec![rec(7)]);
        assert_eq!(lanes.recv().await.unwrap(), vec![rec(2)]);
        assert_eq!(lanes.recv().await, None);
    }

    #[tokio::test]
    async fn batches_by_count_and_flushes_on_shutdown() {
        let dir = tempfile::tempdir().unwrap();
        let spool = Arc::new(
            Spool::open(SpoolOptions {
                dir: dir.path().into(),
                max_bytes: 1 << 20,
                segment_bytes: 1 << 20,
                cache_bytes: 1 << 20,
                min_free_bytes: 0,
            })
            .unwrap(),
        );
        let (outbox, rx) = Outbox::channel(100);
        let stop = CancellationToken::new();
        let header = Arc::new(RwLock::new(Header {
            agent_id: "a".into(),
            ..Default::default()
        }));
        let limits = BatchLimits {
            interval: Duration::from_secs(3600),
            max_records: 3,
            max_bytes: 1 << 20,
        };
        let task = tokio::spawn(batcher(rx, Arc::clone(&spool), header, limits, stop.clone()));
        for i in 0..4 {
            assert!(outbox.send(rec(i)).await);
        }
        let (first, n) = spool.next().await.unwrap();
        assert_eq!(n, 3);
        let pd = PackagedData::decode(first).unwrap();
        assert_eq!((pd.records.len(), pd.seq, pd.agent_id.as_str()), (3, 1, "a"));
        assert_eq!(pd.epoch, spool.epoch());
        stop.cancel();
        task.await.unwrap();
        let (second, _) = spool.next().await.unwrap();
        let pd = PackagedData::decode(second).unwrap();
        assert_eq!(pd.records[0].data, rec(3).data);
        assert_eq!(pd.seq, 2);
    }
}
