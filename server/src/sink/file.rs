//! The embedded default sink: JSON lines in rotating files.
//!
//! `records.jsonl` is the active file. When a write would take it past
//! `max_file_bytes` it is renamed to `records-<unix ms>-<n>.jsonl` and a new one is
//! started; only the newest `max_files - 1` rotated files are kept.
//!
//! Each line holds `agent_id`, `data_type`, `timestamp`, `server_time`, and either
//! `fields` (Keel's own record types, decoded) or `data` (base64 of the payload).

use std::collections::HashMap;
use std::fs::{File, OpenOptions};
use std::io::Write;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};

use base64::Engine;
use futures::future::BoxFuture;
use keel_proto::{data_type, payload};
use serde::Serialize;

use super::{Batch, Sink, SinkError};

const ACTIVE: &str = "records.jsonl";

/// Rotating JSON-lines files in one directory.
#[derive(Debug, Clone)]
pub struct FileSink {
    inner: Arc<Inner>,
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
}

#[derive(Serialize)]
struct Line<'a> {
    agent_id: &'a str,
    data_type: i32,
    timestamp: i64,
    server_time: i64,
    #[serde(skip_serializing_if = "Option::is_none")]
    fields: Option<HashMap<String, String>>,
    #[serde(skip_serializing_if = "Option::is_none")]
    data: Option<String>,
}

fn open_active(dir: &Path) -> std::io::Result<(File, u64)> {
    let file = OpenOptions::new().create(true).append(true).open(dir.join(ACTIVE))?;
    let size = file.metadata()?.len();
    Ok((file, size))
}

impl FileSink {
    /// Opens (creating) the sink directory.
    pub fn open(dir: &Path, max_file_bytes: u64, max_files: usize) -> Result<Self, SinkError> {
        let io = |source| SinkError::Io {
            sink: format!("file {}", dir.display()),
            source,
        };
        std::fs::create_dir_all(dir).map_err(io)?;
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
                }),
            }),
        })
    }

    /// The directory written to.
    pub fn dir(&self) -> &Path {
        &self.inner.dir
    }
}

fn encode(batch: &Batch<'_>) -> Vec<u8> {
    let mut out = Vec::with_capacity(batch.records.len() * 160);
    for r in batch.records {
        let decoded = if data_type::is_keel_payload(r.data_type) {
            payload::decode(&r.data).ok()
        } else {
            None
        };
        let data = match decoded {
            Some(_) => None,
            None => Some(base64::engine::general_purpose::STANDARD.encode(&r.data)),
        };
        let line = Line {
            agent_id: batch.agent_id,
            data_type: r.data_type,
            timestamp: r.timestamp,
            server_time: batch.server_time,
            fields: decoded,
            data,
        };
        // Serialising plain strings and integers into a Vec cannot fail.
        if serde_json::to_writer(&mut out, &line).is_ok() {
            out.push(b'\n');
        }
    }
    out
}

impl Inner {
    fn append(&self, bytes: &[u8], now_ms: i64) -> std::io::Result<()> {
        let mut active = self.active.lock().unwrap_or_else(|p| p.into_inner());
        if active.size > 0 && active.size + bytes.len() as u64 > self.max_file_bytes {
            self.rotate(&mut active, now_ms)?;
        }
        active.file.write_all(bytes)?;
        active.file.flush()?;
        active.size += bytes.len() as u64;
        Ok(())
    }

    fn rotate(&self, active: &mut Active, now_ms: i64) -> std::io::Result<()> {
        active.rotations += 1;
        let rotated = self
            .dir
            .join(format!("records-{now_ms:013}-{:06}.jsonl", active.rotations));
        std::fs::rename(self.dir.join(ACTIVE), rotated)?;
        let (file, size) = open_active(&self.dir)?;
        active.file = file;
        active.size = size;
        let mut old: Vec<PathBuf> = std::fs::read_dir(&self.dir)?
            .filter_map(|e| e.ok().map(|e| e.path()))
            .filter(|p| {
                p.file_name()
                    .and_then(|n| n.to_str())
                    .is_some_and(|n| n.starts_with("records-") && n.ends_with(".jsonl"))
            })
            .collect();
        old.sort();
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
        let records = batch.records.to_vec();
        let now = batch.server_time;
        Box::pin(async move {
            let name = format!("file {}", inner.dir.display());
            // Encoding and writing are CPU and disk work: keep them off the runtime.
            let result = tokio::task::spawn_blocking(move || {
                let bytes = encode(&Batch {
                    agent_id: &agent_id,
                    server_time: now,
                    records: &records,
                });
                inner.append(&bytes, now)
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
}

#[cfg(test)]
mod tests {
    use bytes::Bytes;

    use super::*;
    use crate::sink::Record;

    fn lines(dir: &Path) -> Vec<serde_json::Value> {
        let mut files: Vec<_> = std::fs::read_dir(dir).unwrap().map(|e| e.unwrap().path()).collect();
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

    #[tokio::test]
    async fn decodes_keel_types_and_base64s_the_rest() {
        let dir = tempfile::tempdir().unwrap();
        let sink = FileSink::open(dir.path(), 1 << 20, 4).unwrap();
        let records = [
            Record {
                data_type: 1000,
                timestamp: 5,
                data: payload::encode([("cpu", "0.5")]),
            },
            Record {
                data_type: 6001,
                timestamp: 6,
                data: Bytes::from_static(b"\x01\x02"),
            },
        ];
        sink.write(Batch {
            agent_id: "a1",
            server_time: 9,
            records: &records,
        })
        .await
        .unwrap();
        let l = lines(dir.path());
        assert_eq!(l.len(), 2);
        assert_eq!(l[0]["agent_id"], "a1");
        assert_eq!(l[0]["fields"]["cpu"], "0.5");
        assert_eq!(l[0]["server_time"], 9);
        assert_eq!(l[1]["data"], "AQI=");
        assert!(l[1].get("fields").is_none());
    }

    #[tokio::test]
    async fn rotates_and_keeps_max_files() {
        let dir = tempfile::tempdir().unwrap();
        let sink = FileSink::open(dir.path(), 300, 3).unwrap();
        let records = [Record {
            data_type: 7000,
            timestamp: 1,
            data: Bytes::from(vec![b'x'; 100]),
        }];
        for i in 0..10 {
            sink.write(Batch {
                agent_id: "a",
                server_time: i,
                records: &records,
            })
            .await
            .unwrap();
        }
        let files = std::fs::read_dir(dir.path()).unwrap().count();
        assert_eq!(files, 3);
        // Every kept line is whole.
        assert!(!lines(dir.path()).is_empty());
    }
}
