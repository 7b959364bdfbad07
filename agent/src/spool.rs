//! The disk spool: every batch is written here before it is sent, and deleted only
//! after the server acknowledges it, so neither a disconnect nor an agent restart
//! loses data.
//!
//! A batch is stored as the complete encoded `PackagedData` it will be sent as, in
//! append-only segment files (`<dir>/<id>.seg`). Each entry is framed as
//! `len u32 | crc32 u32 | seq u64 | records u32 | bytes` (little-endian); the CRC
//! covers seq, records and bytes, so a write torn by a crash is found and cut off
//! when the spool is opened again. Recent batches are also kept in memory (up to
//! `cache_bytes`) so sending rarely reads the disk.
//!
//! The spool is bounded by `max_bytes`, and by the free space of its file system
//! less `min_free_bytes`: a full disk is a full spool. While connected, a full
//! spool makes the batcher wait (backpressure reaches the plugins). While
//! disconnected, the oldest segment is evicted and its records counted as dropped.
//! A batch that finds no room even in an empty spool (the disk filled by something
//! else), or whose write fails, is dropped and counted the same way; the next
//! batch tries again, so writing resumes on its own when space returns. Eviction
//! and these drops are the only ways a record is lost, and always reported.
//!
//! The count of lost records is kept in `<dir>/dropped`, rewritten in place at
//! each loss, so it survives agent restarts (and kill -9) and the heartbeat's
//! `dropped` only ever grows: a loss while disconnected is reported once the agent
//! reconnects, whatever happened in between.
//!
//! `epoch` (in `<dir>/epoch`) names the sequence space. It is kept while the spool
//! holds batches and renewed when the spool opens empty, so the server never takes
//! a new batch for a resend of an old one.

use std::collections::VecDeque;
use std::fs::{File, OpenOptions};
use std::io::{Read, Seek, SeekFrom, Write};
use std::path::{Path, PathBuf};
use std::sync::{Condvar, Mutex, MutexGuard};
use std::time::Duration;

use bytes::{BufMut, Bytes, BytesMut};
use tokio::sync::Notify;
use tracing::{info, warn};

use crate::wire;

const HEADER: usize = 20;
/// No entry is larger than this; a larger length on disk means corruption.
const MAX_ENTRY: usize = 256 << 20;
/// Batch numbers and segment IDs count up from 1, one at a time: nothing the spool
/// wrote comes near this, so a larger one on disk means corruption (and there is
/// room to count on from any smaller one).
const MAX_NUMBER: u64 = 1 << 62;

/// Where and how much.
#[derive(Debug, Clone)]
pub struct SpoolOptions {
    /// Directory of the segments.
    pub dir: PathBuf,
    /// Bound on the segments' total size.
    pub max_bytes: u64,
    /// A segment is closed at this size.
    pub segment_bytes: u64,
    /// Batches kept in memory as well, to send without reading the disk.
    pub cache_bytes: u64,
    /// Free space the spool leaves on its file system.
    pub min_free_bytes: u64,
}

/// The spool could not be used.
#[derive(Debug, thiserror::Error)]
#[error("spool {path}: {source}")]
pub struct SpoolError {
    path: PathBuf,
    source: std::io::Error,
}

fn err(path: &Path) -> impl FnOnce(std::io::Error) -> SpoolError + '_ {
    move |source| SpoolError {
        path: path.to_path_buf(),
        source,
    }
}

/// Counters for the heartbeat.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct SpoolStats {
    /// Bytes on disk.
    pub bytes: u64,
    /// Batches waiting for an acknowledgement.
    pub batches: usize,
    /// Records lost: evicted because the bound was hit while disconnected, or not
    /// written for want of space or for an I/O error.
    pub dropped_records: u64,
    /// Batches sent more than once.
    pub resent_batches: u64,
}

#[derive(Debug)]
struct Entry {
    seq: u64,
    records: u32,
    segment: u64,
    offset: u64,
    len: u32,
    data: Option<Bytes>,
}

#[derive(Debug)]
struct Segment {
    id: u64,
    bytes: u64,
    last_seq: u64,
}

#[derive(Debug)]
struct State {
    epoch: u64,
    next_seq: u64,
    entries: VecDeque<Entry>,
    segments: VecDeque<Segment>,
    /// Open for appending: the last segment.
    active: Option<File>,
    next_segment: u64,
    bytes: u64,
    cached: u64,
    cursor: u64,
    highest_sent: u64,
    connected: bool,
    dropped_records: u64,
    /// `<dir>/dropped`, where `dropped_records` is kept.
    loss_file: Option<File>,
    resent: u64,
    acked: u64,
    /// Written since the last [`Spool::sync`].
    unsynced: bool,
}

/// The spool. Appends come from one blocking thread (the batcher); the sender
/// awaits [`Spool::next`].
#[derive(Debug)]
pub struct Spool {
    opts: SpoolOptions,
    state: Mutex<State>,
    space: Condvar,
    wake: Notify,
    /// Told when a write follows a sync ([`Spool::wait_unsynced`]).
    written: Notify,
}

fn segment_path(dir: &Path, id: u64) -> PathBuf {
    dir.join(format!("{id:020}.seg"))
}

fn checksum(seq: u64, records: u32, bytes: &[u8]) -> u32 {
    let mut h = crc32fast::Hasher::new();
    h.update(&seq.to_le_bytes());
    h.update(&records.to_le_bytes());
    h.update(bytes);
    h.finalize()
}

/// Reads the entries of one segment; cuts off a torn tail, and anything from an
/// entry whose batch number does not follow on from those before it (which the
/// spool never writes: only a damaged or altered file holds one).
fn scan(path: &Path, id: u64, out: &mut Vec<Entry>) -> std::io::Result<u64> {
    let mut data = Vec::new();
    File::open(path)?.read_to_end(&mut data)?;
    let mut pos = 0usize;
    let mut last = out.last().map_or(0, |e| e.seq);
    while pos + HEADER <= data.len() {
        let h = &data[pos..pos + HEADER];
        let len = u32::from_le_bytes([h[0], h[1], h[2], h[3]]) as usize;
        let crc = u32::from_le_bytes([h[4], h[5], h[6], h[7]]);
        let seq = u64::from_le_bytes([h[8], h[9], h[10], h[11], h[12], h[13], h[14], h[15]]);
        let records = u32::from_le_bytes([h[16], h[17], h[18], h[19]]);
        let end = pos + HEADER + len;
        if len > MAX_ENTRY || end > data.len() || checksum(seq, records, &data[pos + HEADER..end]) != crc {
            break;
        }
        if seq <= last || seq >= MAX_NUMBER {
            warn!(segment = %path.display(), offset = pos, seq, after = last,
                "a spool entry out of sequence; cutting it and what follows");
            break;
        }
        last = seq;
        out.push(Entry {
            seq,
            records,
            segment: id,
            offset: pos as u64,
            len: len as u32,
            data: None,
        });
        pos = end;
    }
    if pos < data.len() {
        warn!(segment = %path.display(), offset = pos, lost_bytes = data.len() - pos, "cutting a torn spool entry");
        OpenOptions::new().write(true).open(path)?.set_len(pos as u64)?;
    }
    Ok(pos as u64)
}

fn read_entry(path: &Path, offset: u64, len: u32, seq: u64, records: u32) -> std::io::Result<Bytes> {
    let mut f = File::open(path)?;
    f.seek(SeekFrom::Start(offset + HEADER as u64))?;
    let mut buf = vec![0u8; len as usize];
    f.read_exact(&mut buf)?;
    let mut header = [0u8; 8];
    f.seek(SeekFrom::Start(offset))?;
    f.read_exact(&mut header)?;
    let crc = u32::from_le_bytes([header[4], header[5], header[6], header[7]]);
    if checksum(seq, records, &buf) != crc {
        return Err(std::io::Error::new(
            std::io::ErrorKind::InvalidData,
            "spool entry checksum mismatch",
        ));
    }
    Ok(Bytes::from(buf))
}

/// Appends protobuf varint field `field` = `value` (PackagedData's seq and epoch).
/// Opens `<dir>/dropped` (0600) holding `count`, written at its full width now so
/// that rewriting it needs no new space on a full disk.
fn open_loss_file(path: &Path, count: u64) -> std::io::Result<File> {
    use std::os::unix::fs::{FileExt, OpenOptionsExt};
    let f = OpenOptions::new()
        .create(true)
        .write(true)
        .truncate(false)
        .mode(0o600)
        .open(path)?;
    let text = loss_text(count);
    f.write_all_at(text.as_bytes(), 0)?;
    f.set_len(text.len() as u64)?;
    Ok(f)
}

fn loss_text(count: u64) -> String {
    format!("{count:020}\n")
}

/// Counts `records` as lost, in memory and in `<dir>/dropped`.
fn record_loss(st: &mut State, records: u64) {
    use std::os::unix::fs::FileExt;
    st.dropped_records += records;
    if let Some(f) = &st.loss_file
        && let Err(e) = f.write_all_at(loss_text(st.dropped_records).as_bytes(), 0)
    {
        warn!(error = %e, dropped = st.dropped_records, "cannot keep the count of lost records on disk");
    }
}

impl Spool {
    /// Opens the spool, recovering what a previous run left.
    pub fn open(opts: SpoolOptions) -> Result<Self, SpoolError> {
        let dir = opts.dir.clone();
        keel_common::fsutil::create_dir(&dir, 0o700).map_err(err(&dir))?;
        let mut ids: Vec<u64> = std::fs::read_dir(&dir)
            .map_err(err(&dir))?
            .filter_map(|e| e.ok())
            .filter_map(|e| e.file_name().to_str()?.strip_suffix(".seg")?.parse().ok())
            // Not a name the spool gives a segment: left alone.
            .filter(|id| *id > 0 && *id < MAX_NUMBER)
            .collect();
        ids.sort_unstable();
        let mut entries = Vec::new();
        let mut segments = VecDeque::new();
        let mut bytes = 0;
        for id in &ids {
            let path = segment_path(&dir, *id);
            let before = entries.len();
            let size = scan(&path, *id, &mut entries).map_err(err(&path))?;
            if entries.len() == before {
                std::fs::remove_file(&path).map_err(err(&path))?;
                continue;
            }
            bytes += size;
            segments.push_back(Segment {
                id: *id,
                bytes: size,
                last_seq: entries.last().map_or(0, |e| e.seq),
            });
        }
        let epoch_path = dir.join("epoch");
        let stored_epoch = std::fs::read_to_string(&epoch_path)
            .ok()
            .and_then(|s| u64::from_str_radix(s.trim(), 16).ok());
        let epoch = match stored_epoch {
            Some(e) if !entries.is_empty() => e,
            _ => {
                if !entries.is_empty() {
                    warn!("spool epoch file missing; resending the spool in a new epoch");
                }
                let e = rand::random::<u64>().max(1);
                keel_common::fsutil::write_private(&epoch_path, format!("{e:016x}\n").as_bytes())
                    .map_err(err(&epoch_path))?;
                e
            }
        };
        let next_seq = entries.last().map_or(1, |e| e.seq + 1);
        if !entries.is_empty() {
            info!(
                batches = entries.len(),
                bytes, "spool holds unacknowledged batches from the last run"
            );
        }
        let first = entries.first().map_or(next_seq, |e| e.seq);
        let loss_path = dir.join("dropped");
        let dropped_records = std::fs::read_to_string(&loss_path)
            .ok()
            .and_then(|s| s.trim().parse().ok())
            .unwrap_or(0);
        let loss_file = open_loss_file(&loss_path, dropped_records).map_err(err(&loss_path))?;
        let state = State {
            epoch,
            next_seq,
            entries: entries.into(),
            segments,
            active: None,
            next_segment: ids.last().map_or(1, |i| i + 1),
            bytes,
            cached: 0,
            cursor: first,
            highest_sent: next_seq - 1,
            connected: false,
            dropped_records,
            loss_file: Some(loss_file),
            resent: 0,
            acked: first - 1,
            unsynced: false,
        };
        Ok(Self {
            opts,
            state: Mutex::new(state),
            space: Condvar::new(),
            wake: Notify::new(),
            written: Notify::new(),
        })
    }

    fn lock(&self) -> MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// The sequence space.
    pub fn epoch(&self) -> u64 {
        self.lock().epoch
    }

    /// Tells the spool whether a stream is open: full while connected means wait,
    /// full while disconnected means evict.
    pub fn set_connected(&self, connected: bool) {
        self.lock().connected = connected;
        self.space.notify_all();
    }

    fn evict_oldest(&self, st: &mut State) {
        let Some(seg) = st.segments.pop_front() else { return };
        if st.segments.is_empty() {
            st.active = None;
        }
        let mut dropped = 0u64;
        while st.entries.front().is_some_and(|e| e.segment == seg.id) {
            if let Some(e) = st.entries.pop_front() {
                dropped += u64::from(e.records);
                if e.data.is_some() {
                    st.cached -= u64::from(e.len);
                }
            }
        }
        st.bytes -= seg.bytes;
        record_loss(st, dropped);
        if st.cursor <= seg.last_seq {
            st.cursor = seg.last_seq + 1;
        }
        let path = segment_path(&self.opts.dir, seg.id);
        if let Err(e) = std::fs::remove_file(&path) {
            warn!(segment = %path.display(), error = %e, "cannot delete an evicted spool segment");
        }
        warn!(
            records = dropped,
            "spool full while disconnected: oldest segment evicted"
        );
    }

    /// Appends a batch: `body` is an encoded `PackagedData` without seq and epoch,
    /// which are added here. Blocks while the spool is full and connected.
    ///
    /// A batch that cannot be written (no room left even with the spool empty, or
    /// an I/O error) is counted in `dropped_records` and the error returned; the
    /// spool stays usable.
    pub fn append(&self, body: BytesMut, records: u32) -> Result<(), SpoolError> {
        let (mut st, result) = self.append_locked(self.lock(), body, records);
        if result.is_err() {
            record_loss(&mut st, u64::from(records));
        }
        drop(st);
        if result.is_ok() {
            self.wake.notify_waiters();
        }
        result
    }

    /// Counts `records` that never reached the spool as lost.
    pub fn count_lost(&self, records: u32) {
        record_loss(&mut self.lock(), u64::from(records));
    }

    /// How large the spool may grow now: `max_bytes`, or what it holds plus the
    /// file system's free space less `min_free_bytes`, whichever is smaller.
    fn bound(&self, st: &State) -> u64 {
        match nix::sys::statvfs::statvfs(&self.opts.dir) {
            Ok(fs) => {
                let free = fs.blocks_available().saturating_mul(fs.fragment_size());
                self.opts
                    .max_bytes
                    .min(st.bytes.saturating_add(free.saturating_sub(self.opts.min_free_bytes)))
            }
            Err(_) => self.opts.max_bytes,
        }
    }

    fn append_locked<'a>(
        &'a self,
        mut st: MutexGuard<'a, State>,
        mut body: BytesMut,
        records: u32,
    ) -> (MutexGuard<'a, State>, Result<(), SpoolError>) {
        let need = (HEADER + body.len() + 22) as u64;
        loop {
            if st.bytes + need <= self.bound(&st) {
                break;
            }
            if st.entries.is_empty() {
                let source = std::io::Error::new(
                    std::io::ErrorKind::StorageFull,
                    format!(
                        "no room for a {need}-byte batch with {} bytes left free on the file system (min_free_bytes)",
                        self.opts.min_free_bytes
                    ),
                );
                let path = self.opts.dir.clone();
                return (st, Err(SpoolError { path, source }));
            }
            if st.connected {
                st = self
                    .space
                    .wait_timeout(st, Duration::from_millis(500))
                    .map(|(g, _)| g)
                    .unwrap_or_else(|p| p.into_inner().0);
            } else {
                self.evict_oldest(&mut st);
            }
        }
        let seq = st.next_seq;
        st.next_seq += 1;
        wire::put_mark(&mut body, seq, st.epoch);
        let data = body.freeze();
        let needs_new = st.active.is_none() || st.segments.back().is_none_or(|s| s.bytes >= self.opts.segment_bytes);
        if needs_new {
            let id = st.next_segment;
            st.next_segment += 1;
            let path = segment_path(&self.opts.dir, id);
            match OpenOptions::new().create(true).append(true).open(&path) {
                Ok(file) => st.active = Some(file),
                Err(source) => return (st, Err(SpoolError { path, source })),
            }
            st.segments.push_back(Segment {
                id,
                bytes: 0,
                last_seq: 0,
            });
        }
        let mut frame = BytesMut::with_capacity(HEADER);
        frame.put_u32_le(data.len() as u32);
        frame.put_u32_le(checksum(seq, records, &data));
        frame.put_u64_le(seq);
        frame.put_u32_le(records);
        let (id, offset) = st.segments.back().map(|s| (s.id, s.bytes)).unwrap_or((0, 0));
        let path = segment_path(&self.opts.dir, id);
        let write = st
            .active
            .as_mut()
            .map(|f| f.write_all(&frame).and_then(|()| f.write_all(&data)));
        if let Some(Err(source)) = write {
            // The segment may now hold part of an entry: close it so nothing follows
            // the tear (it is cut off when the spool is next opened).
            st.active = None;
            return (st, Err(SpoolError { path, source }));
        }
        let total = (HEADER + data.len()) as u64;
        if let Some(seg) = st.segments.back_mut() {
            seg.bytes += total;
            seg.last_seq = seq;
        }
        st.bytes += total;
        st.cached += data.len() as u64;
        if !st.unsynced {
            st.unsynced = true;
            self.written.notify_one();
        }
        st.entries.push_back(Entry {
            seq,
            records,
            segment: id,
            offset,
            len: data.len() as u32,
            data: Some(data),
        });
        // Keep memory bounded: older batches are read back from disk when needed.
        let mut i = 0;
        while st.cached > self.opts.cache_bytes && i < st.entries.len() {
            if let Some(e) = st.entries.get_mut(i)
                && let Some(d) = e.data.take()
            {
                st.cached -= d.len() as u64;
            }
            i += 1;
        }
        (st, Ok(()))
    }

    /// Starts over from the oldest unacknowledged batch, for a new stream.
    pub fn rewind(&self) {
        let mut st = self.lock();
        st.cursor = st.entries.front().map_or(st.next_seq, |e| e.seq);
    }

    /// The next batch to send, as the bytes of an encoded `PackagedData`, and how
    /// many records it holds.
    pub async fn next(&self) -> Result<(Bytes, u32), SpoolError> {
        loop {
            let notified = self.wake.notified();
            tokio::pin!(notified);
            notified.as_mut().enable();
            let found = {
                let mut st = self.lock();
                let front = st.entries.front().map(|e| e.seq);
                let idx = front
                    .and_then(|f| st.cursor.checked_sub(f))
                    .and_then(|i| usize::try_from(i).ok());
                match idx
                    .and_then(|i| st.entries.get(i))
                    .map(|e| (e.seq, e.records, e.data.clone(), e.segment, e.offset, e.len))
                {
                    None => None,
                    Some(found) => {
                        let seq = found.0;
                        st.cursor = seq + 1;
                        if seq <= st.highest_sent {
                            st.resent += 1;
                        } else {
                            st.highest_sent = seq;
                        }
                        Some(found)
                    }
                }
            };
            match found {
                Some((_, records, Some(data), ..)) => return Ok((data, records)),
                Some((seq, records, None, segment, offset, len)) => {
                    let path = segment_path(&self.opts.dir, segment);
                    let p = path.clone();
                    let read = tokio::task::spawn_blocking(move || read_entry(&p, offset, len, seq, records)).await;
                    match read {
                        Ok(Ok(data)) => return Ok((data, records)),
                        // Evicted while we read it: move on to what is left.
                        Ok(Err(e)) if e.kind() == std::io::ErrorKind::NotFound => continue,
                        Ok(Err(e)) => return Err(SpoolError { path, source: e }),
                        Err(e) => {
                            return Err(SpoolError {
                                path,
                                source: std::io::Error::other(e),
                            });
                        }
                    }
                }
                None => notified.await,
            }
        }
    }

    /// The highest batch of this epoch the server acknowledged.
    pub fn acked(&self) -> u64 {
        self.lock().acked
    }

    /// Drops every batch of `epoch` up to `seq`, deleting segments that hold
    /// nothing unacknowledged.
    pub fn ack(&self, epoch: u64, seq: u64) {
        let mut st = self.lock();
        if epoch != st.epoch {
            warn!(epoch, "acknowledgement for another epoch ignored");
            return;
        }
        // Nothing past what was written can be acknowledged.
        let seq = seq.min(st.next_seq.saturating_sub(1));
        while st.entries.front().is_some_and(|e| e.seq <= seq) {
            if let Some(e) = st.entries.pop_front()
                && e.data.is_some()
            {
                st.cached -= u64::from(e.len);
            }
        }
        st.acked = st.acked.max(seq);
        if st.cursor <= seq {
            st.cursor = seq + 1;
        }
        while st
            .segments
            .front()
            .is_some_and(|s| s.last_seq <= st.acked && s.last_seq > 0)
        {
            let Some(seg) = st.segments.pop_front() else { break };
            if st.segments.is_empty() {
                st.active = None;
            }
            st.bytes -= seg.bytes;
            let path = segment_path(&self.opts.dir, seg.id);
            if let Err(e) = std::fs::remove_file(&path) {
                warn!(segment = %path.display(), error = %e, "cannot delete an acknowledged spool segment");
            }
        }
        drop(st);
        self.space.notify_all();
        self.wake.notify_waiters();
    }

    /// Flushes the segment being written to disk.
    pub fn sync(&self) {
        let mut st = self.lock();
        st.unsynced = false;
        if let Some(f) = &st.active
            && let Err(e) = f.sync_data()
        {
            warn!(error = %e, "cannot sync the spool");
        }
    }

    /// Returns once something was written since the last [`Spool::sync`]: an idle
    /// spool is never synced, and the syncing task sleeps.
    pub async fn wait_unsynced(&self) {
        while !self.lock().unsynced {
            self.written.notified().await;
        }
    }

    /// Whether everything was acknowledged.
    pub fn is_empty(&self) -> bool {
        self.lock().entries.is_empty()
    }

    /// Counters for the heartbeat.
    pub fn stats(&self) -> SpoolStats {
        let st = self.lock();
        SpoolStats {
            bytes: st.bytes,
            batches: st.entries.len(),
            dropped_records: st.dropped_records,
            resent_batches: st.resent,
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

#[cfg(test)]
mod tests {
    use super::*;

    fn opts(dir: &Path, max: u64, segment: u64) -> SpoolOptions {
        SpoolOptions {
            dir: dir.to_path_buf(),
            max_bytes: max,
            segment_bytes: segment,
            cache_bytes: 64,
            min_free_bytes: 0,
        }
    }

    fn body(n: u8) -> BytesMut {
        BytesMut::from(&[n; 40][..])
    }

    /// An entry as the spool frames it, with a valid checksum.
    fn raw_entry(seq: u64, data: &[u8]) -> Vec<u8> {
        let mut e = Vec::new();
        e.extend_from_slice(&(data.len() as u32).to_le_bytes());
        e.extend_from_slice(&checksum(seq, 1, data).to_le_bytes());
        e.extend_from_slice(&seq.to_le_bytes());
        e.extend_from_slice(&1u32.to_le_bytes());
        e.extend_from_slice(data);
        e
    }

    /// Found by fuzzing (the `spool` target): batch numbers and segment names on
    /// disk that the spool never writes made it overflow, or loop forever on a
    /// segment it had deleted. Such entries are cut like a torn tail.
    #[tokio::test]
    async fn only_a_write_since_the_last_sync_asks_for_one() {
        let dir = tempfile::tempdir().unwrap();
        let s = Spool::open(opts(dir.path(), 1 << 20, 100)).unwrap();
        let quiet = Duration::from_millis(20);
        assert!(
            tokio::time::timeout(quiet, s.wait_unsynced()).await.is_err(),
            "nothing written yet"
        );
        s.append(body(1), 1).unwrap();
        tokio::time::timeout(Duration::from_secs(5), s.wait_unsynced())
            .await
            .expect("a write asks for a sync");
        s.sync();
        assert!(
            tokio::time::timeout(quiet, s.wait_unsynced()).await.is_err(),
            "synced since"
        );
    }

    #[tokio::test]
    async fn entries_out_of_sequence_on_disk_are_cut() {
        for (seqs, kept) in [
            (vec![u64::MAX], vec![]),
            (vec![0], vec![]),
            (vec![u64::MAX - 1], vec![]),
            (vec![5, 3, 9], vec![5]),
            (vec![2, 2], vec![2]),
            (vec![1, 2, 3], vec![1, 2, 3]),
        ] {
            let dir = tempfile::tempdir().unwrap();
            let mut seg = Vec::new();
            for seq in &seqs {
                seg.extend(raw_entry(*seq, b"x"));
            }
            std::fs::write(segment_path(dir.path(), 1), &seg).unwrap();
            // A name no segment of the spool's has: left alone.
            std::fs::write(dir.path().join(format!("{}.seg", u64::MAX)), raw_entry(7, b"y")).unwrap();
            let s = Spool::open(opts(dir.path(), 1 << 20, 1 << 20)).unwrap();
            let got: Vec<u64> = s.lock().entries.iter().map(|e| e.seq).collect();
            assert_eq!(got, kept, "{seqs:?}");
            // It carries on: sends what it kept, appends, acknowledges.
            for _ in &kept {
                s.next().await.unwrap();
            }
            s.append(body(1), 1).unwrap();
            let next = *kept.last().unwrap_or(&0) + 1;
            s.ack(s.epoch(), next);
            assert_eq!(s.lock().entries.len(), 0, "{seqs:?}");
        }
    }

    fn seq_of(b: &Bytes) -> u8 {
        b[0]
    }

    #[tokio::test]
    async fn survives_a_restart_and_resends_only_the_unacknowledged() {
        let dir = tempfile::tempdir().unwrap();
        let s = Spool::open(opts(dir.path(), 1 << 20, 100)).unwrap();
        let epoch = s.epoch();
        for n in 1..=5 {
            s.append(body(n), 1).unwrap();
        }
        assert_eq!(seq_of(&s.next().await.unwrap().0), 1);
        s.ack(epoch, 2);
        drop(s);

        let s = Spool::open(opts(dir.path(), 1 << 20, 100)).unwrap();
        assert_eq!(s.epoch(), epoch, "same epoch while batches remain");
        let got: Vec<u8> = [
            s.next().await.unwrap(),
            s.next().await.unwrap(),
            s.next().await.unwrap(),
        ]
        .iter()
        .map(|(b, _)| seq_of(b))
        .collect();
        assert_eq!(got, [3, 4, 5]);
        s.append(body(6), 1).unwrap();
        let (b, _) = s.next().await.unwrap();
        // seq 6 and the epoch are appended as fields 100 and 101.
        let mut expect = BytesMut::from(&[6u8; 40][..]);
        wire::put_mark(&mut expect, 6, epoch);
        assert_eq!(b, expect.freeze());
        s.ack(epoch, 6);
        assert!(s.is_empty());
        drop(s);
        let s = Spool::open(opts(dir.path(), 1 << 20, 100)).unwrap();
        assert_ne!(s.epoch(), epoch, "an empty spool starts a new epoch");
        let segments = std::fs::read_dir(dir.path())
            .unwrap()
            .filter(|e| e.as_ref().unwrap().path().extension().is_some_and(|x| x == "seg"))
            .count();
        assert_eq!(segments, 0, "acknowledged segments are deleted");
    }

    #[tokio::test]
    async fn a_torn_tail_is_cut_off() {
        let dir = tempfile::tempdir().unwrap();
        let s = Spool::open(opts(dir.path(), 1 << 20, 1 << 20)).unwrap();
        s.append(body(1), 1).unwrap();
        s.append(body(2), 1).unwrap();
        drop(s);
        let seg = std::fs::read_dir(dir.path())
            .unwrap()
            .map(|e| e.unwrap().path())
            .find(|p| p.extension().is_some_and(|x| x == "seg"))
            .unwrap();
        let len = std::fs::metadata(&seg).unwrap().len();
        OpenOptions::new()
            .write(true)
            .open(&seg)
            .unwrap()
            .set_len(len - 5)
            .unwrap();
        let s = Spool::open(opts(dir.path(), 1 << 20, 1 << 20)).unwrap();
        assert_eq!(s.stats().batches, 1);
        assert_eq!(seq_of(&s.next().await.unwrap().0), 1);
    }

    #[tokio::test]
    async fn full_and_disconnected_evicts_and_counts() {
        let dir = tempfile::tempdir().unwrap();
        // Entries are ~82 bytes; segments hold two; the bound holds about four.
        let s = Spool::open(opts(dir.path(), 350, 150)).unwrap();
        for n in 1..=10 {
            s.append(body(n), 3).unwrap();
        }
        let st = s.stats();
        assert!(st.bytes <= 350, "{st:?}");
        assert_eq!(st.dropped_records, 3 * (10 - st.batches as u64));
        let (b, _) = s.next().await.unwrap();
        assert_eq!(seq_of(&b) as usize, 10 - st.batches + 1, "the oldest went first");
    }

    #[tokio::test]
    async fn a_full_disk_is_a_full_spool_and_writing_resumes_when_space_returns() {
        let dir = tempfile::tempdir().unwrap();
        let _fs = keel_common::testfs::TmpFs::mount(dir.path(), "1m");
        let mut o = opts(dir.path(), 64 << 20, 64 << 10);
        o.min_free_bytes = 256 << 10;
        let s = Spool::open(o).unwrap();
        let batch = || BytesMut::from(&[7u8; 8 << 10][..]);
        // Disconnected, 1.6 MB into what the disk leaves: the oldest make room.
        for _ in 0..200 {
            s.append(batch(), 10).unwrap();
        }
        let st = s.stats();
        assert!(st.bytes <= (1 << 20) - (256 << 10), "{st:?}");
        assert!(st.batches > 0 && st.dropped_records > 0, "{st:?}");
        assert_eq!(st.dropped_records, 10 * (200 - st.batches as u64), "every loss counted");

        // Something else fills the disk: what the spool holds makes room.
        let ballast = dir.path().join("ballast");
        let fill = || {
            let mut f = OpenOptions::new().create(true).append(true).open(&ballast).unwrap();
            while f.write_all(&[0u8; 4 << 10]).is_ok() {}
        };
        fill();
        s.append(batch(), 10).unwrap();
        let squeezed = s.stats();
        assert!(squeezed.batches < st.batches, "{squeezed:?}");
        assert_eq!(squeezed.dropped_records, 10 * (201 - squeezed.batches as u64));

        // All sent and acknowledged, and the disk filled again: the batch itself is
        // dropped and counted, and the spool stays usable.
        s.ack(s.epoch(), u64::MAX);
        fill();
        let e = s.append(batch(), 10).unwrap_err().to_string();
        assert!(e.contains("no room"), "{e}");
        let full = s.stats();
        assert_eq!((full.batches, full.bytes), (0, 0), "{full:?}");
        assert_eq!(full.dropped_records, squeezed.dropped_records + 10, "{full:?}");

        // Space returns: writing resumes by itself. The kernel frees the ballast
        // once no descriptor holds it, and a fork made meanwhile by another test's
        // thread holds a copy until its child execs: wait for the space to show.
        std::fs::remove_file(&ballast).unwrap();
        let free = || {
            let v = nix::sys::statvfs::statvfs(dir.path()).unwrap();
            v.blocks_available().saturating_mul(v.fragment_size())
        };
        for _ in 0..200 {
            if free() > 512 << 10 {
                break;
            }
            tokio::time::sleep(std::time::Duration::from_millis(10)).await;
        }
        s.append(batch(), 10).unwrap();
        assert_eq!(s.stats().batches, 1);
        assert_eq!(s.stats().dropped_records, full.dropped_records);
    }

    #[tokio::test]
    async fn the_count_of_lost_records_survives_a_restart() {
        let dir = tempfile::tempdir().unwrap();
        let s = Spool::open(opts(dir.path(), 350, 150)).unwrap();
        for n in 1..=10 {
            s.append(body(n), 3).unwrap();
        }
        let lost = s.stats().dropped_records;
        assert!(lost > 0);
        // Gone without a word (as after kill -9), then back.
        drop(s);
        let s = Spool::open(opts(dir.path(), 350, 150)).unwrap();
        assert_eq!(s.stats().dropped_records, lost, "the count came back");
        s.append(body(11), 3).unwrap();
        s.append(body(12), 3).unwrap();
        assert!(s.stats().dropped_records > lost, "and goes on from there");
        let on_disk: u64 = std::fs::read_to_string(dir.path().join("dropped"))
            .unwrap()
            .trim()
            .parse()
            .unwrap();
        assert_eq!(on_disk, s.stats().dropped_records);
    }

    #[tokio::test]
    async fn full_and_connected_waits_for_acks() {
        let dir = tempfile::tempdir().unwrap();
        let s = std::sync::Arc::new(Spool::open(opts(dir.path(), 200, 1 << 20)).unwrap());
        s.set_connected(true);
        s.append(body(1), 1).unwrap();
        s.append(body(2), 1).unwrap();
        let epoch = s.epoch();
        let writer = {
            let s = std::sync::Arc::clone(&s);
            std::thread::spawn(move || s.append(body(3), 1).unwrap())
        };
        std::thread::sleep(Duration::from_millis(50));
        assert!(
            !writer.is_finished(),
            "a full spool must hold the writer back while connected"
        );
        s.ack(epoch, 2);
        writer.join().unwrap();
        assert_eq!(s.stats().dropped_records, 0);
    }
}
