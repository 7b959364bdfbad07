//! Envelopes too large for one task, gathered piece by piece
//! ([`crate::bundle::Piece`]) under `<state_dir>/uploads` until whole.
//!
//! Pieces must come in order, as the server sends them (each after the last one's
//! result). A half upload is only staging: nothing reaches the files directory
//! until the whole envelope hashes to its upload name and opens. At most
//! [`MAX_UPLOADS`] uploads are open at once (a new one drops the oldest), and
//! what a restarted plugin finds there is dropped, so a relay that stops halfway
//! leaves at most that much behind.

use std::collections::HashMap;
use std::fs::{File, OpenOptions};
use std::io::{Read, Write};
use std::os::unix::fs::OpenOptionsExt;
use std::path::{Path, PathBuf};
use std::sync::Mutex;

use sha2::{Digest, Sha256};

use crate::bundle::{MAX_ENVELOPE_BYTES, Piece};

/// Uploads gathered at once.
pub const MAX_UPLOADS: usize = 2;

#[derive(Debug)]
struct Open {
    file: File,
    next: u32,
    count: u32,
    bytes: usize,
    started: u64,
}

/// The uploads in progress.
#[derive(Debug)]
pub struct Uploads {
    dir: PathBuf,
    open: Mutex<HashMap<String, Open>>,
    started: Mutex<u64>,
}

impl Uploads {
    /// Opens `<state_dir>/uploads` (0700), dropping what an earlier run left.
    pub fn open(state_dir: &Path) -> std::io::Result<Uploads> {
        let dir = state_dir.join("uploads");
        if dir.exists() {
            std::fs::remove_dir_all(&dir)?;
        }
        keel_common::fsutil::create_dir(&dir, 0o700)?;
        Ok(Uploads {
            dir,
            open: Mutex::new(HashMap::new()),
            started: Mutex::new(0),
        })
    }

    /// Adds a piece; the whole envelope's JSON once the last has come and checked.
    pub fn add(&self, piece: &Piece) -> Result<Option<String>, String> {
        let mut open = self.open.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
        let name = &piece.upload;
        let path = self.dir.join(format!("{name}.part"));
        if piece.index == 0 {
            self.drop_upload(&mut open, name);
            while open.len() >= MAX_UPLOADS {
                let Some(oldest) = open.iter().min_by_key(|(_, o)| o.started).map(|(k, _)| k.clone()) else {
                    break;
                };
                tracing::warn!(upload = %oldest, "a half upload dropped for a new one");
                self.drop_upload(&mut open, &oldest);
            }
            let file = OpenOptions::new()
                .read(true)
                .write(true)
                .create_new(true)
                .mode(0o600)
                .custom_flags(nix::libc::O_NOFOLLOW)
                .open(&path)
                .map_err(|e| format!("upload {name}: {e}"))?;
            let mut started = self.started.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
            *started += 1;
            open.insert(
                name.clone(),
                Open {
                    file,
                    next: 0,
                    count: piece.count,
                    bytes: 0,
                    started: *started,
                },
            );
        }
        let Some(up) = open.get_mut(name) else {
            return Err(format!(
                "upload {name}: piece {} came before piece 0 (or the plugin restarted); it must be sent again from the start",
                piece.index
            ));
        };
        if piece.index != up.next || piece.count != up.count {
            let msg = format!(
                "upload {name}: piece {} of {} came where piece {} of {} was due; the upload is dropped",
                piece.index, piece.count, up.next, up.count
            );
            self.drop_upload(&mut open, name);
            return Err(msg);
        }
        if up.bytes + piece.data.len() > MAX_ENVELOPE_BYTES {
            self.drop_upload(&mut open, name);
            return Err(format!(
                "upload {name}: more than {MAX_ENVELOPE_BYTES} bytes; the upload is dropped"
            ));
        }
        if let Err(e) = up.file.write_all(piece.data.as_bytes()) {
            self.drop_upload(&mut open, name);
            return Err(format!("upload {name}: {e}"));
        }
        up.bytes += piece.data.len();
        up.next += 1;
        if up.next < up.count {
            return Ok(None);
        }
        let Some(mut done) = open.remove(name) else {
            return Err(format!("upload {name}: lost"));
        };
        let _ = std::fs::remove_file(&path);
        let mut json = String::with_capacity(done.bytes);
        use std::io::Seek;
        done.file
            .rewind()
            .and_then(|()| done.file.read_to_string(&mut json))
            .map_err(|e| format!("upload {name}: {e}"))?;
        if hex::encode(Sha256::digest(json.as_bytes())) != *name {
            return Err(format!(
                "upload {name}: the pieces put together do not hash to the upload's name; nothing was written"
            ));
        }
        Ok(Some(json))
    }

    fn drop_upload(&self, open: &mut HashMap<String, Open>, name: &str) {
        if open.remove(name).is_some() {
            let _ = std::fs::remove_file(self.dir.join(format!("{name}.part")));
        }
    }

    /// How many uploads are in progress.
    pub fn in_progress(&self) -> usize {
        self.open
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .len()
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;
    use crate::bundle::upload_of;

    fn pieces(json: &str, size: usize) -> Vec<Piece> {
        let upload = upload_of(json);
        let chunks: Vec<&[u8]> = json.as_bytes().chunks(size).collect();
        let count = chunks.len() as u32;
        chunks
            .into_iter()
            .enumerate()
            .map(|(i, c)| Piece {
                upload: upload.clone(),
                index: i as u32,
                count,
                data: String::from_utf8(c.to_vec()).unwrap(),
            })
            .collect()
    }

    #[test]
    fn pieces_in_order_make_the_whole_and_anything_else_is_dropped() {
        let dir = tempfile::tempdir().unwrap();
        let up = Uploads::open(dir.path()).unwrap();
        let json = "{\"v\":1}".repeat(1000);
        let ps = pieces(&json, 1000);
        for p in &ps[..ps.len() - 1] {
            assert_eq!(up.add(p).unwrap(), None);
        }
        assert_eq!(up.add(ps.last().unwrap()).unwrap().as_deref(), Some(json.as_str()));
        assert_eq!(up.in_progress(), 0);
        assert_eq!(std::fs::read_dir(dir.path().join("uploads")).unwrap().count(), 0);

        // Out of order: refused and dropped, so a later piece finds nothing.
        up.add(&ps[0]).unwrap();
        let e = up.add(&ps[2]).unwrap_err();
        assert!(e.contains("piece 2 of 7 came where piece 1 of 7 was due"), "{e}");
        let e = up.add(&ps[1]).unwrap_err();
        assert!(e.contains("came before piece 0"), "{e}");

        // A piece changed on the way: the whole does not hash to the name.
        let mut bad = ps.clone();
        bad[3].data = bad[3].data.replace('1', "2");
        for p in &bad[..6] {
            up.add(p).unwrap();
        }
        let e = up.add(&bad[6]).unwrap_err();
        assert!(e.contains("do not hash to the upload's name"), "{e}");

        // At most MAX_UPLOADS at once: a third start drops the oldest.
        let others: Vec<Vec<Piece>> = (0..3).map(|i| pieces(&format!("{i}").repeat(3000), 1000)).collect();
        for o in &others {
            up.add(&o[0]).unwrap();
        }
        assert_eq!(up.in_progress(), MAX_UPLOADS);
        assert!(up.add(&others[0][1]).unwrap_err().contains("came before piece 0"));
        up.add(&others[2][1]).unwrap();

        // A restart drops what was left.
        drop(up);
        let up = Uploads::open(dir.path()).unwrap();
        assert_eq!(std::fs::read_dir(dir.path().join("uploads")).unwrap().count(), 0);
        assert!(up.add(&others[2][2]).is_err());
    }
}
