//! A plugin's stdout and stderr, in a size-rotated log in its directory:
//! `<name>.log`, then `<name>.log.1` … `<name>.log.<keep>`.

use std::fs::{File, OpenOptions};
use std::io::Write;
use std::path::{Path, PathBuf};

use tokio::io::{AsyncRead, AsyncReadExt};

/// Rotation limits.
const MAX_BYTES: u64 = 4 << 20;
const KEEP: usize = 2;

/// An appending log that rotates by size.
#[derive(Debug)]
pub struct RotatingLog {
    path: PathBuf,
    file: Option<File>,
    size: u64,
}

impl RotatingLog {
    /// Opens `<dir>/<name>.log`.
    pub fn open(dir: &Path, name: &str) -> Self {
        let path = dir.join(format!("{name}.log"));
        let file = OpenOptions::new().create(true).append(true).open(&path).ok();
        let size = file.as_ref().and_then(|f| f.metadata().ok()).map_or(0, |m| m.len());
        Self { path, file, size }
    }

    fn rotate(&mut self) {
        self.file = None;
        for i in (1..KEEP).rev() {
            let _ = std::fs::rename(self.numbered(i), self.numbered(i + 1));
        }
        let _ = std::fs::rename(&self.path, self.numbered(1));
        self.file = OpenOptions::new().create(true).append(true).open(&self.path).ok();
        self.size = 0;
    }

    fn numbered(&self, i: usize) -> PathBuf {
        let mut p = self.path.clone().into_os_string();
        p.push(format!(".{i}"));
        PathBuf::from(p)
    }

    /// Appends bytes, rotating first if they would pass the limit.
    pub fn write(&mut self, bytes: &[u8]) {
        if self.size + bytes.len() as u64 > MAX_BYTES && self.size > 0 {
            self.rotate();
        }
        if let Some(f) = &mut self.file
            && f.write_all(bytes).is_ok()
        {
            self.size += bytes.len() as u64;
        }
    }
}

/// Copies a plugin output stream into the log until it closes.
pub async fn pump(mut from: impl AsyncRead + Unpin, log: std::sync::Arc<std::sync::Mutex<RotatingLog>>) {
    let mut buf = vec![0u8; 16 << 10];
    loop {
        match from.read(&mut buf).await {
            Ok(0) | Err(_) => return,
            Ok(n) => log.lock().unwrap_or_else(|p| p.into_inner()).write(&buf[..n]),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rotates_and_keeps_two() {
        let dir = tempfile::tempdir().unwrap();
        let mut log = RotatingLog::open(dir.path(), "p");
        let chunk = vec![b'x'; (MAX_BYTES / 2 + 1) as usize];
        for _ in 0..7 {
            log.write(&chunk);
        }
        let mut names: Vec<String> = std::fs::read_dir(dir.path())
            .unwrap()
            .map(|e| e.unwrap().file_name().into_string().unwrap())
            .collect();
        names.sort();
        assert_eq!(names, ["p.log", "p.log.1", "p.log.2"]);
        assert!(std::fs::metadata(dir.path().join("p.log")).unwrap().len() <= MAX_BYTES);
    }
}
