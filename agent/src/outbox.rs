//! The agent's outbound data path: producers → batcher → pending batches → stream.
//!
//! Producers (heartbeat, logs, task results, plugins) put records into a bounded
//! channel. The batcher cuts them into numbered batches (by count, size, or every
//! `batch_interval`). Batches stay in [`Pending`] until the server acknowledges
//! them, and are sent again after a reconnect. Pending is bounded in bytes; when
//! the bound is hit the oldest batch is dropped and counted, the only way a record
//! is lost, and always reported in the heartbeat.

use std::collections::VecDeque;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use bytes::Bytes;
use keel_common::time::now_secs;
use keel_proto::payload;
use tokio::sync::{Notify, mpsc};
use tokio_util::sync::CancellationToken;

/// A record on its way up; `data` is an encoded `Payload`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Record {
    /// The record type.
    pub data_type: i32,
    /// Unix seconds.
    pub timestamp: i64,
    /// Encoded `Payload`, never decoded on the way.
    pub data: Bytes,
}

impl Record {
    /// A record the agent produces itself, stamped now.
    pub fn new<K: Into<String>, V: Into<String>>(data_type: i32, fields: impl IntoIterator<Item = (K, V)>) -> Self {
        Self {
            data_type,
            timestamp: now_secs(),
            data: payload::encode(fields),
        }
    }
}

/// The producers' end: cheap to clone.
#[derive(Debug, Clone)]
pub struct Outbox {
    tx: mpsc::Sender<Record>,
    dropped: Arc<AtomicU64>,
}

impl Outbox {
    /// A channel of `capacity` records; the receiver goes to [`batcher`].
    pub fn channel(capacity: usize) -> (Self, mpsc::Receiver<Record>) {
        let (tx, rx) = mpsc::channel(capacity.max(1));
        (
            Self {
                tx,
                dropped: Arc::new(AtomicU64::new(0)),
            },
            rx,
        )
    }

    /// Queues a record, waiting while the queue is full. Returns false after shutdown.
    pub async fn send(&self, record: Record) -> bool {
        self.tx.send(record).await.is_ok()
    }

    /// Queues a record if there is room; otherwise drops and counts it. For
    /// producers that must never block, such as logging.
    pub fn try_send(&self, record: Record) -> bool {
        match self.tx.try_send(record) {
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

/// A numbered batch.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Batch {
    /// Position in the epoch, from 1.
    pub seq: u64,
    /// The records.
    pub records: Vec<Record>,
    /// Payload bytes, for the bound.
    pub bytes: usize,
}

/// Counters for the heartbeat.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct PendingStats {
    /// Bytes waiting for an acknowledgement.
    pub bytes: usize,
    /// Batches waiting.
    pub batches: usize,
    /// Records dropped because the bound was hit.
    pub dropped_records: u64,
    /// Batches sent more than once.
    pub resent_batches: u64,
}

#[derive(Debug)]
struct State {
    epoch: u64,
    next_seq: u64,
    queue: VecDeque<Arc<Batch>>,
    bytes: usize,
    /// Next seq to hand to the sender.
    cursor: u64,
    highest_sent: u64,
    dropped_records: u64,
    resent_batches: u64,
}

/// Batches waiting for their acknowledgement.
#[derive(Debug)]
pub struct Pending {
    state: Mutex<State>,
    wake: Notify,
    max_bytes: usize,
}

impl Pending {
    /// An empty store bounded by `max_bytes`, in a new random epoch.
    pub fn new(max_bytes: usize) -> Self {
        let epoch = rand::random::<u64>().max(1);
        Self {
            state: Mutex::new(State {
                epoch,
                next_seq: 1,
                queue: VecDeque::new(),
                bytes: 0,
                cursor: 1,
                highest_sent: 0,
                dropped_records: 0,
                resent_batches: 0,
            }),
            wake: Notify::new(),
            max_bytes,
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// The sequence space of these batches.
    pub fn epoch(&self) -> u64 {
        self.lock().epoch
    }

    /// Adds a batch, evicting the oldest beyond the bound.
    pub fn push(&self, records: Vec<Record>) {
        if records.is_empty() {
            return;
        }
        let bytes = records.iter().map(|r| r.data.len() + 16).sum();
        let mut s = self.lock();
        let seq = s.next_seq;
        s.next_seq += 1;
        s.queue.push_back(Arc::new(Batch { seq, records, bytes }));
        s.bytes += bytes;
        while s.bytes > self.max_bytes && s.queue.len() > 1 {
            let Some(old) = s.queue.pop_front() else {
                break;
            };
            s.bytes -= old.bytes;
            s.dropped_records += old.records.len() as u64;
            tracing::warn!(
                seq = old.seq,
                records = old.records.len(),
                "pending bound reached: oldest batch dropped"
            );
            if s.cursor <= old.seq {
                s.cursor = old.seq + 1;
            }
        }
        drop(s);
        self.wake.notify_waiters();
    }

    /// Starts over from the oldest unacknowledged batch, for a new stream.
    pub fn rewind(&self) {
        let mut s = self.lock();
        s.cursor = s.queue.front().map_or(s.next_seq, |b| b.seq);
    }

    fn take(&self) -> Option<Arc<Batch>> {
        let mut s = self.lock();
        let front = s.queue.front()?.seq;
        let idx = usize::try_from(s.cursor.checked_sub(front)?).ok()?;
        let batch = Arc::clone(s.queue.get(idx)?);
        s.cursor = batch.seq + 1;
        if batch.seq <= s.highest_sent {
            s.resent_batches += 1;
        } else {
            s.highest_sent = batch.seq;
        }
        Some(batch)
    }

    /// The next batch to send, waiting for one.
    pub async fn next(&self) -> Arc<Batch> {
        loop {
            let notified = self.wake.notified();
            tokio::pin!(notified);
            notified.as_mut().enable();
            if let Some(b) = self.take() {
                return b;
            }
            notified.await;
        }
    }

    /// Drops every batch of `epoch` up to `seq`.
    pub fn ack(&self, epoch: u64, seq: u64) {
        let mut s = self.lock();
        if epoch != s.epoch {
            tracing::warn!(epoch, "acknowledgement for another epoch ignored");
            return;
        }
        while s.queue.front().is_some_and(|b| b.seq <= seq) {
            if let Some(b) = s.queue.pop_front() {
                s.bytes -= b.bytes;
            }
        }
        if s.cursor <= seq {
            s.cursor = seq + 1;
        }
        drop(s);
        self.wake.notify_waiters();
    }

    /// Whether everything was acknowledged.
    pub fn is_empty(&self) -> bool {
        self.lock().queue.is_empty()
    }

    /// Counters for the heartbeat.
    pub fn stats(&self) -> PendingStats {
        let s = self.lock();
        PendingStats {
            bytes: s.bytes,
            batches: s.queue.len(),
            dropped_records: s.dropped_records,
            resent_batches: s.resent_batches,
        }
    }

    /// Waits until everything is acknowledged or `limit` passes.
    pub async fn drained(&self, limit: Duration) -> bool {
        let wait = async {
            loop {
                let notified = self.wake.notified();
                tokio::pin!(notified);
                notified.as_mut().enable();
                if self.is_empty() {
                    return;
                }
                notified.await;
            }
        };
        tokio::time::timeout(limit, wait).await.is_ok()
    }
}

/// Limits of one batch.
#[derive(Debug, Clone, Copy)]
pub struct BatchLimits {
    /// Send at least this often while records wait.
    pub interval: Duration,
    /// Cut at this many records.
    pub max_records: usize,
    /// Cut at this many payload bytes.
    pub max_bytes: usize,
}

/// Cuts the record channel into batches until `shutdown`, then flushes.
pub async fn batcher(
    mut rx: mpsc::Receiver<Record>,
    pending: Arc<Pending>,
    limits: BatchLimits,
    shutdown: CancellationToken,
) {
    loop {
        let first = tokio::select! {
            r = rx.recv() => r,
            _ = shutdown.cancelled() => None,
        };
        let Some(first) = first else { break };
        let mut bytes = first.data.len();
        let mut batch = vec![first];
        let deadline = tokio::time::sleep(limits.interval);
        tokio::pin!(deadline);
        while batch.len() < limits.max_records && bytes < limits.max_bytes {
            tokio::select! {
                r = rx.recv() => match r {
                    Some(r) => {
                        bytes += r.data.len();
                        batch.push(r);
                    }
                    None => break,
                },
                _ = &mut deadline => break,
                _ = shutdown.cancelled() => break,
            }
        }
        pending.push(batch);
    }
    // Whatever producers queued before shutdown still gets a seq.
    rx.close();
    let mut rest = Vec::new();
    while let Ok(r) = rx.try_recv() {
        rest.push(r);
    }
    pending.push(rest);
}

#[cfg(test)]
mod tests {
    use super::*;

    fn rec(n: u8) -> Record {
        Record {
            data_type: 1,
            timestamp: 0,
            data: Bytes::from(vec![n; 10]),
        }
    }

    #[tokio::test]
    async fn resends_unacked_after_rewind() {
        let p = Pending::new(1 << 20);
        p.push(vec![rec(1)]);
        p.push(vec![rec(2)]);
        p.push(vec![rec(3)]);
        assert_eq!(p.next().await.seq, 1);
        assert_eq!(p.next().await.seq, 2);
        p.ack(p.epoch(), 1);
        p.rewind();
        assert_eq!(p.next().await.seq, 2, "unacked batch 2 is resent first");
        assert_eq!(p.next().await.seq, 3);
        assert_eq!(p.stats().resent_batches, 1);
        p.ack(p.epoch() ^ 1, 3);
        assert_eq!(p.stats().batches, 2, "ack of another epoch is ignored");
        p.ack(p.epoch(), 3);
        assert!(p.is_empty());
        assert!(p.drained(Duration::from_millis(1)).await);
    }

    #[tokio::test]
    async fn bound_drops_oldest_and_counts() {
        let p = Pending::new(60);
        for i in 0..5 {
            p.push(vec![rec(i), rec(i)]);
        }
        let s = p.stats();
        assert!(s.bytes <= 60);
        assert_eq!(s.dropped_records, 2 * (5 - s.batches as u64));
        assert_eq!(p.next().await.seq, 6 - s.batches as u64);
    }

    #[tokio::test]
    async fn batcher_cuts_by_count_and_flushes_on_shutdown() {
        let (outbox, rx) = Outbox::channel(100);
        let pending = Arc::new(Pending::new(1 << 20));
        let stop = CancellationToken::new();
        let limits = BatchLimits {
            interval: Duration::from_secs(3600),
            max_records: 3,
            max_bytes: 1 << 20,
        };
        let task = tokio::spawn(batcher(rx, Arc::clone(&pending), limits, stop.clone()));
        for i in 0..4 {
            assert!(outbox.send(rec(i)).await);
        }
        let first = pending.next().await;
        assert_eq!(first.records.len(), 3);
        stop.cancel();
        task.await.unwrap();
        let second = pending.next().await;
        assert_eq!(second.records, vec![rec(3)]);
    }
}
