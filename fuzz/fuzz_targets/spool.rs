//! Spool recovery: the agent opens whatever the last run (or a crash, or a full
//! disk) left in its spool directory, and sends it. The input becomes the spool
//! directory: either raw bytes as segment `00000000000000000001.seg`, or (first
//! byte odd) a structured layout of segments whose entries carry valid CRCs (so
//! that recovery goes past the checksum), torn tails, and `epoch` and `dropped`
//! files. The spool is then opened and driven as the agent drives it: `next`
//! until it has nothing more, acknowledgements, rewinds, and appends while
//! disconnected (which evict when full). Nothing may panic, and every batch the
//! spool hands out must be an entry that was in the input, with a valid header,
//! or one appended here.
#![no_main]

use std::path::Path;
use std::time::Duration;

use arbitrary::{Arbitrary, Unstructured};
use bytes::BytesMut;
use keel_agent::spool::{Spool, SpoolOptions};
use libfuzzer_sys::fuzz_target;

const HEADER: usize = 20;

#[derive(Debug, Arbitrary)]
struct Layout {
    segments: Vec<SegmentIn>,
    epoch: Option<FileIn>,
    dropped: Option<FileIn>,
    /// Bound for the appends, on top of what the input holds.
    room: u16,
    segment_bytes: u16,
    cache_bytes: u16,
    ops: Vec<Op>,
}

#[derive(Debug, Arbitrary)]
enum FileIn {
    /// As the agent writes it.
    Number(u64),
    Raw(Vec<u8>),
}

#[derive(Debug, Arbitrary)]
struct SegmentIn {
    id: u64,
    entries: Vec<EntryIn>,
    /// Bytes after the last entry: a torn write.
    tail: Vec<u8>,
}

#[derive(Debug, Arbitrary)]
struct EntryIn {
    seq: u64,
    records: u32,
    body: Vec<u8>,
    bad_crc: bool,
}

#[derive(Debug, Arbitrary)]
enum Op {
    Next,
    Ack(u64),
    AckOwnEpoch(u64),
    Rewind,
    Append { body: Vec<u8>, records: u32 },
    Sync,
}

fn checksum(seq: u64, records: u32, bytes: &[u8]) -> u32 {
    let mut h = crc32fast::Hasher::new();
    h.update(&seq.to_le_bytes());
    h.update(&records.to_le_bytes());
    h.update(bytes);
    h.finalize()
}

fn segment_name(id: u64) -> String {
    format!("{id:020}.seg")
}

fn entry(e: &EntryIn) -> Vec<u8> {
    let mut crc = checksum(e.seq, e.records, &e.body);
    if e.bad_crc {
        crc ^= 1;
    }
    let mut out = Vec::with_capacity(HEADER + e.body.len());
    out.extend_from_slice(&(e.body.len() as u32).to_le_bytes());
    out.extend_from_slice(&crc.to_le_bytes());
    out.extend_from_slice(&e.seq.to_le_bytes());
    out.extend_from_slice(&e.records.to_le_bytes());
    out.extend_from_slice(&e.body);
    out
}

/// Whether `batch` is an entry of one of `files` with a header that describes it.
fn was_in_input(files: &[Vec<u8>], batch: &[u8], records: u32) -> bool {
    files.iter().any(|f| {
        (HEADER..=f.len().saturating_sub(batch.len())).any(|p| {
            let h = &f[p - HEADER..p];
            f[p..p + batch.len()] == *batch
                && u32::from_le_bytes([h[0], h[1], h[2], h[3]]) as usize == batch.len()
                && u32::from_le_bytes([h[16], h[17], h[18], h[19]]) == records
                && u32::from_le_bytes([h[4], h[5], h[6], h[7]])
                    == checksum(
                        u64::from_le_bytes([h[8], h[9], h[10], h[11], h[12], h[13], h[14], h[15]]),
                        records,
                        batch,
                    )
        })
    })
}

fn write(dir: &Path, name: &str, bytes: &[u8]) {
    std::fs::write(dir.join(name), bytes).expect("write to the temporary directory");
}

thread_local! {
    // Paused time: waiting for a batch that never comes ends at once.
    static RT: tokio::runtime::Runtime = tokio::runtime::Builder::new_current_thread()
        .enable_time()
        .start_paused(true)
        .build()
        .expect("a tokio runtime");
}

fuzz_target!(|data: &[u8]| {
    let Some((&mode, rest)) = data.split_first() else {
        return;
    };
    let tmp = tempfile::tempdir().expect("a temporary directory");
    let dir = tmp.path().join("spool");
    std::fs::create_dir(&dir).expect("create the spool directory");

    let mut files: Vec<Vec<u8>> = Vec::new();
    let layout = if mode & 1 == 0 {
        write(&dir, &segment_name(1), rest);
        files.push(rest.to_vec());
        None
    } else {
        let Ok(layout) = Layout::arbitrary_take_rest(Unstructured::new(rest)) else {
            return;
        };
        for s in layout.segments.iter().take(6) {
            let mut bytes: Vec<u8> = s.entries.iter().flat_map(entry).collect();
            bytes.extend_from_slice(&s.tail);
            write(&dir, &segment_name(s.id), &bytes);
            files.push(bytes);
        }
        for (name, file) in [("epoch", &layout.epoch), ("dropped", &layout.dropped)] {
            match file {
                Some(FileIn::Number(n)) if name == "epoch" => write(&dir, name, format!("{n:016x}\n").as_bytes()),
                Some(FileIn::Number(n)) => write(&dir, name, format!("{n:020}\n").as_bytes()),
                Some(FileIn::Raw(b)) => write(&dir, name, b.as_slice()),
                None => {}
            }
        }
        Some(layout)
    };
    let held: u64 = files.iter().map(|f| f.len() as u64).sum();
    let opts = SpoolOptions {
        dir: dir.clone(),
        max_bytes: held + layout.as_ref().map_or(4096, |l| u64::from(l.room)),
        segment_bytes: layout.as_ref().map_or(1 << 20, |l| u64::from(l.segment_bytes)),
        cache_bytes: layout.as_ref().map_or(1 << 20, |l| u64::from(l.cache_bytes)),
        min_free_bytes: 0,
    };

    RT.with(|rt| {
        rt.block_on(async {
            let Ok(spool) = Spool::open(opts) else { return };
            let epoch = spool.epoch();
            let stats = spool.stats();
            assert!(stats.batches <= files.iter().map(|f| f.len() / HEADER).sum::<usize>());
            let mut appended: Vec<Vec<u8>> = Vec::new();
            let next = async |spool: &Spool, appended: &[Vec<u8>]| {
                match tokio::time::timeout(Duration::from_secs(1), spool.next()).await {
                    Ok(Ok((batch, records))) => {
                        assert!(
                            was_in_input(&files, &batch, records) || appended.iter().any(|a| batch.starts_with(a)),
                            "the spool sent a batch that was never written: {batch:?}"
                        );
                        true
                    }
                    // An I/O error is an answer; the agent reconnects and rewinds.
                    Ok(Err(_)) => false,
                    Err(_) => false,
                }
            };
            // What the agent does on connecting: send everything held.
            for _ in 0..=stats.batches {
                if !next(&spool, &appended).await {
                    break;
                }
            }
            spool.set_connected(false);
            let ops = layout.map(|l| l.ops).unwrap_or_default();
            for op in ops.into_iter().take(32) {
                match op {
                    Op::Next => {
                        next(&spool, &appended).await;
                    }
                    Op::Ack(seq) => spool.ack(epoch ^ 1, seq),
                    Op::AckOwnEpoch(seq) => spool.ack(epoch, seq),
                    Op::Rewind => spool.rewind(),
                    Op::Append { body, records } => {
                        appended.push(body.clone());
                        let _ = spool.append(BytesMut::from(&body[..]), records);
                    }
                    Op::Sync => spool.sync(),
                }
                let _ = spool.stats();
                let _ = spool.acked();
                let _ = spool.is_empty();
            }
            // A new stream: send everything again, then it is all acknowledged.
            spool.rewind();
            for _ in 0..=spool.stats().batches {
                if !next(&spool, &appended).await {
                    break;
                }
            }
            spool.ack(epoch, u64::MAX);
            let _ = spool.stats();
        })
    });
});
