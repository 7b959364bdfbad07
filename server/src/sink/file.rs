//! The embedded default sink: JSON lines in rotating files.
//!
//! `records.jsonl` is the active file. When a write would take it past
//! `max_file_bytes` it is renamed to `records-<unix ms>-<n>.jsonl` and a new one is
//! started; only the newest `max_files - 1` rotated files are kept.
//!
//! Each line holds `agent_id`, `data_type`, `timestamp`, `server_time`, either
//! `fields` (Keel's own record types, decoded) or `data` (base64 of the payload),
//! and for numbered batches `epoch` (hex) and `seq`. A batch is one `write(2)`.
//!
//! Exactly once: the sink remembers the highest batch per agent. At rotation it
//! writes those marks to `marks.json`; when opened it reads `marks.json` and scans
//! the newest rotated file and the active file, so a batch written just before a
//! crash is still known and its resend dropped.

use std::fs::{File, OpenOptions};
use std::io::{BufRead, BufReader, Write};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};

use futures::future::BoxFuture;
use serde::Deserialize;

use super::{Batch, Marks, Record, Sink, SinkError};

const ACTIVE: &str = "records.jsonl";
const MARKS: &str = "marks.json";

/// Rotating JSON-lines files in one directory.
#[derive(Debug, Clone)]
pub struct FileSink {
    inner: Arc<Inner>,
    recovered: Marks,
}

#[derive(Debug)]
struct Inner {
    dir: PathBuf,
    max_file_bytes: u64,
    max_files: usize,
    active: Mutex<Active>,
}

#[derive(Debug)]
struct Active {
    file: File,
    size: u64,
    rotations: u64,
    marks: Marks,
}

/// What recovery reads of a line.
#[derive(Deserialize)]
struct MarkLine {
    agent_id: String,
    #[serde(default)]
    epoch: Option<String>,
    #[serde(default)]
    seq: Option<u64>,
}

fn open_active(dir: &Path) -> std::io::Result<(File, u64)> {
    let path = dir.join(ACTIVE);
    // A crash mid-write can leave a partial last line; cut it so the next line
    // starts clean. That batch was never acknowledged and will be resent.
    if let Ok(data) = std::fs::read(&path)
        && data.last().is_some_and(|b| *b != b'\n')
    {
        let keep = data.iter().rposition(|b| *b == b'\n').map_or(0, |i| i + 1);
        OpenOptions::new().write(true).open(&path)?.set_len(keep as u64)?;
        tracing::warn!(file = %path.display(), cut = data.len() - keep, "cut a torn last line");
    }
    let file = OpenOptions::new().create(true).append(true).open(&path)?;
    let size = file.metadata()?.len();
    Ok((file, size))
}

fn rotated(dir: &Path) -> std::io::Result<Vec<PathBuf>> {
    let mut files: Vec<PathBuf> = std::fs::read_dir(dir)?
        .filter_map(|e| e.ok().map(|e| e.path()))
        .filter(|p| {
            p.file_name()
                .and_then(|n| n.to_str())
                .is_some_and(|n| n.starts_with("records-") && n.ends_with(".jsonl"))
        })
        .collect();
    files.sort();
    Ok(files)
}

fn scan_marks(path: &Path, marks: &mut Marks) -> std::io::Result<()> {
    let Ok(file) = File::open(path) else { return Ok(()) };
    for line in BufReader::with_capacity(1 << 20, file).lines() {
        let line = line?;
        // A torn last line (crash mid-write) is not a persisted batch.
        let Ok(l) = serde_json::from_str::<MarkLine>(&line) else {
            continue;
        };
        let (Some(epoch), Some(seq)) = (l.epoch.and_then(|e| u64::from_str_radix(&e, 16).ok()), l.seq) else {
            continue;
        };
        let m = marks.entry(l.agent_id).or_insert((epoch, seq));
        if m.0 != epoch || seq > m.1 {
            *m = (epoch, seq);
        }
    }
    Ok(())
}

fn recover(dir: &Path) -> std::io::Result<Marks> {
    let mut marks: Marks = match std::fs::read(dir.join(MARKS)) {
        Ok(b) => serde_json::from_slice(&b).unwrap_or_default(),
        Err(_) => Marks::new(),
    };
    if let Some(newest) = rotated(dir)?.last() {
        scan_marks(newest, &mut marks)?;
    }
    scan_marks(&dir.join(ACTIVE), &mut marks)?;
    Ok(marks)
}

impl FileSink {
    /// Opens (creating) the sink directory and recovers its marks.
    pub fn open(dir: &Path, max_file_bytes: u64, max_files: usize) -> Result<Self, SinkError> {
        let io = |source| SinkError::Io {
            sink: format!("file {}", dir.display()),
            source,
        };
        keel_common::fsutil::create_dir(dir, 0o700).map_err(io)?;
        let recovered = recover(dir).map_err(io)?;
        let (file, size) = open_active(dir).map_err(io)?;
        Ok(Self {
            inner: Arc::new(Inner {
                dir: dir.to_path_buf(),
                max_file_bytes: max_file_bytes.max(1),
                max_files: max_files.max(1),
                active: Mutex::new(Active {
                    file,
                    size,
                    rotations: 0,
                    marks: recovered.clone(),
                }),
            }),
            recovered,
        })
    }

    /// The directory written to.
    pub fn dir(&self) -> &Path {
        &self.inner.dir
    }
}

fn encode(batch: &Batch<'_>) -> Vec<u8> {
    let mut out = Vec::with_capacity(batch.records.len() * 200);
    for r in batch.records {
        super::write_json(batch, r, &mut out);
        out.push(b'\n');
    }
    out
}

impl Inner {
    fn append(&self, bytes: &[u8], agent_id: &str, mark: Option<(u64, u64)>, now_ms: i64) -> std::io::Result<()> {
        let mut active = self.active.lock().unwrap_or_else(|p| p.into_inner());
        if active.size > 0 && active.size + bytes.len() as u64 > self.max_file_bytes {
            self.rotate(&mut active, now_ms)?;
        }
        active.file.write_all(bytes)?;
        active.size += bytes.len() as u64;
        if let Some(m) = mark {
            active.marks.insert(agent_id.to_owned(), m);
        }
        Ok(())
    }

    fn rotate(&self, active: &mut Active, now_ms: i64) -> std::io::Result<()> {
        active.rotations += 1;
        let rotated_path = self
            .dir
            .join(format!("records-{now_ms:013}-{:06}.jsonl", active.rotations));
        std::fs::rename(self.dir.join(ACTIVE), rotated_path)?;
        // Marks of everything written so far; the new active file adds to them.
        let json = serde_json::to_vec(&active.marks).map_err(std::io::Error::other)?;
        keel_common::fsutil::write_private(&self.dir.join(MARKS), &json)?;
        let (file, size) = open_active(&self.dir)?;
        active.file = file;
        active.size = size;
        let old = rotated(&self.dir)?;
        let keep = self.max_files.saturating_sub(1);
        let excess = old.len().saturating_sub(keep);
        for p in old.into_iter().take(excess) {
            if let Err(e) = std::fs::remove_file(&p) {
                tracing::warn!(file = %p.display(), error = %e, "cannot delete old record file");
            }
        }
        Ok(())
    }
}

impl Sink for FileSink {
    fn write<'a>(&'a self, batch: Batch<'a>) -> BoxFuture<'a, Result<(), SinkError>> {
        let inner = Arc::clone(&self.inner);
        let agent_id = batch.agent_id.to_owned();
        let records: Vec<Record> = batch.records.to_vec();
        let (now, epoch, seq) = (batch.server_time, batch.epoch, batch.seq);
        Box::pin(async move {
            let name = format!("file {}", inner.dir.display());
            // Encoding and writing are CPU and disk work: keep them off the runtime.
            let result = tokio::task::spawn_blocking(move || {
                let batch = Batch {
                    agent_id: &agent_id,
                    server_time: now,
                    records: &records,
                    epoch,
                    seq,
                };
                let bytes = encode(&batch);
                inner.append(&bytes, &agent_id, (seq > 0).then_some((epoch, seq)), now)
            })
            .await;
            match result {
                Ok(Ok(())) => Ok(()),
                Ok(Err(source)) => Err(SinkError::Io { sink: name, source }),
                Err(join) => Err(SinkError::Io {
                    sink: name,
                    source: std::io::Error::other(join),
                }),
            }
        })
    }

    fn recovered_marks(&self) -> Marks {
        self.recovered.clone()
    }
}

#[cfg(test)]
mod tests {
    use bytes::Bytes;

    use super::*;
    use crate::sink::Record;

    fn lines(dir: &Path) -> Vec<serde_json::Value> {
        let mut files: Vec<_> = std::fs::read_dir(dir)
            .unwrap()
            .map(|e| e.unwrap().path())
            .filter(|p| p.extension().is_some_and(|e| e == "jsonl"))
            .collect();
        files.sort();
        files
            .iter()
            .flat_map(|f| {
                std::fs::read_to_string(f)
                    .unwrap()
                    .lines()
                    .map(str::to_owned)
                    .collect::<Vec<_>>()
            })
            .map(|l| serde_json::from_str(&l).unwrap())
            .collect()
    }

    fn batch<'a>(agent_id: &'a str, records: &'a [Record], seq: u64) -> Batch<'a> {
        Batch {
            agent_id,
            server_time: 9,
            records,
            epoch: 0xabc,
            seq,
        }
    }

    #[tokio::test]
    async fn decodes_keel_types_and_base64s_the_rest() {
        let dir = tempfile::tempdir().unwrap();
        let sink = FileSink::open(dir.path(), 1 << 20, 4).unwrap();
        let records = [
            Record {
                data_type: 1000,
                timestamp: 5,
                data: keel_proto::payload::encode([("cpu", "0.5")]),
            },
            Record {
                data_type: 6001,
                timestamp: 6,
                data: Bytes::from_static(b"\x01\x02"),
            },
        ];
        sink.write(batch("a1", &records, 3)).await.unwrap();
        let l = lines(dir.path());
        assert_eq!(l.len(), 2);
        assert_eq!(l[0]["agent_id"], "a1");
        assert_eq!(l[0]["fields"]["cpu"], "0.5");
        assert_eq!((l[0]["server_time"].as_i64(), l[0]["seq"].as_u64()), (Some(9), Some(3)));
        assert_eq!(l[0]["epoch"], "0000000000000abc");
        assert_eq!(l[1]["data"], "AQI=");
        assert!(l[1].get("fields").is_none());
    }

    #[tokio::test]
    async fn rotates_keeps_max_files_and_recovers_marks() {
        let dir = tempfile::tempdir().unwrap();
        let sink = FileSink::open(dir.path(), 300, 3).unwrap();
        let records = [Record {
            data_type: 7000,
            timestamp: 1,
            data: Bytes::from(vec![b'x'; 100]),
        }];
        for seq in 1..=10 {
            let agent = if seq == 1 { "early" } else { "late" };
            sink.write(batch(agent, &records, seq)).await.unwrap();
        }
        let jsonl = std::fs::read_dir(dir.path())
            .unwrap()
            .filter(|e| e.as_ref().unwrap().path().extension().is_some_and(|x| x == "jsonl"))
            .count();
        assert_eq!(jsonl, 3);
        // A torn last line, as a crash mid-write leaves it.
        OpenOptions::new()
            .append(true)
            .open(dir.path().join(ACTIVE))
            .unwrap()
            .write_all(b"{\"agent_id\":\"late\",\"ep")
            .unwrap();
        let reopened = FileSink::open(dir.path(), 300, 3).unwrap();
        let marks = reopened.recovered_marks();
        assert_eq!(marks.get("late"), Some(&(0xabc, 10)));
        assert!(
            std::fs::read(dir.path().join(ACTIVE)).unwrap().ends_with(b"\n"),
            "the torn line is cut"
        );
        assert_eq!(
            marks.get("early"),
            Some(&(0xabc, 1)),
            "marks of rotated-away files survive in marks.json"
        );
    }
}
