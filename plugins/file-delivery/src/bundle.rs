//! How a keeper's envelopes travel to one host: as few tasks as the task size
//! allows.
//!
//! The data of a 6200 task is one of:
//! - an [`Envelope`] (one file);
//! - a bundle, `{"bundle": [envelope, …]}`: every change for the host that fits in
//!   [`MAX_PART_BYTES`], each envelope sealed and signed on its own, applied in
//!   order, each file atomically;
//! - a piece, `{"piece": {"upload": "<hex>", "index": i, "count": n, "data": "…"}}`:
//!   a slice of one envelope too large for a task. `upload` is the SHA-256 of the
//!   whole envelope's JSON; the host appends the pieces in order, and only once
//!   the last has come, the whole hashes to `upload`, and the envelope opens (its
//!   signature, its AEAD) does it write the file.
//!
//! A part is at most [`MAX_PART_BYTES`] (`keel_proto::data_type::FILE_PART_MAX_BYTES`).

use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};

use crate::envelope::{Envelope, EnvelopeError, MAX_FILE_BYTES};

/// The largest task data a part has.
pub use keel_proto::data_type::FILE_PART_MAX_BYTES as MAX_PART_BYTES;
/// The most envelopes one bundle carries.
pub const MAX_BUNDLE: usize = 256;
/// What wrapping a piece's slice adds, at most (key names, upload, numbers).
const PIECE_OVERHEAD: usize = 256;
/// The largest envelope a host takes in pieces: a file of [`MAX_FILE_BYTES`] in
/// base64, with its header.
pub const MAX_ENVELOPE_BYTES: usize = MAX_FILE_BYTES / 3 * 4 + 64 * 1024;
/// The most pieces an upload has.
pub const MAX_PIECES: u32 = MAX_ENVELOPE_BYTES.div_ceil(MAX_PART_BYTES - PIECE_OVERHEAD) as u32;

/// A slice of one envelope too large for a task.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Piece {
    /// SHA-256 of the whole envelope's JSON, hex: names the upload and checks it.
    pub upload: String,
    /// This piece's place, from 0.
    pub index: u32,
    /// How many pieces the upload has.
    pub count: u32,
    /// The slice of the envelope's JSON.
    pub data: String,
}

/// A 6200 task's data, parsed.
#[derive(Debug)]
pub enum Part {
    /// One envelope.
    One(Box<Envelope>),
    /// Several, applied in order.
    Bundle(Vec<Envelope>),
    /// A slice of one envelope.
    Piece(Piece),
}

/// What a part is refused for.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum PartError {
    /// Larger than a part may be.
    #[error("the task data is {0} bytes; a part is at most {MAX_PART_BYTES}")]
    TooLarge(usize),
    /// A bundle of too many envelopes.
    #[error("a bundle of {0} envelopes; at most {MAX_BUNDLE}")]
    TooMany(usize),
    /// An envelope of the bundle, by its place.
    #[error("bundle envelope {index}: {error}")]
    InBundle {
        /// Its place in the bundle, from 0.
        index: usize,
        /// What is wrong with it.
        error: EnvelopeError,
    },
    /// An envelope alone.
    #[error(transparent)]
    Envelope(#[from] EnvelopeError),
    /// A piece's fields.
    #[error("piece: {0}")]
    Piece(String),
}

#[derive(Deserialize)]
#[serde(rename_all = "snake_case", deny_unknown_fields)]
enum Wrapped {
    Bundle(Vec<serde_json::Value>),
    Piece(Piece),
}

impl Part {
    /// Parses a 6200 task's data, checking every envelope's syntax.
    pub fn parse(data: &str) -> Result<Part, PartError> {
        if data.len() > MAX_PART_BYTES {
            return Err(PartError::TooLarge(data.len()));
        }
        let head = data.trim_start();
        if !(head.starts_with("{\"bundle\"") || head.starts_with("{\"piece\"")) {
            return Ok(Part::One(Box::new(Envelope::parse(data)?)));
        }
        let wrapped: Wrapped =
            serde_json::from_str(data).map_err(|e| PartError::Envelope(EnvelopeError::Json(e.to_string())))?;
        match wrapped {
            Wrapped::Bundle(items) if items.len() > MAX_BUNDLE => Err(PartError::TooMany(items.len())),
            Wrapped::Bundle(items) => items
                .into_iter()
                .enumerate()
                .map(|(index, v)| Envelope::parse(&v.to_string()).map_err(|error| PartError::InBundle { index, error }))
                .collect::<Result<Vec<_>, _>>()
                .map(Part::Bundle),
            Wrapped::Piece(p) => {
                check_upload(&p.upload).map_err(PartError::Piece)?;
                if p.count == 0 || p.count > MAX_PIECES || p.index >= p.count {
                    return Err(PartError::Piece(format!(
                        "piece {} of {} is out of range (an upload has 1 to {MAX_PIECES} pieces)",
                        p.index, p.count
                    )));
                }
                Ok(Part::Piece(p))
            }
        }
    }
}

/// Checks an upload's name: a SHA-256 in lower-case hex.
pub fn check_upload(upload: &str) -> Result<(), String> {
    if upload.len() == 64 && upload.bytes().all(|b| matches!(b, b'0'..=b'9' | b'a'..=b'f')) {
        Ok(())
    } else {
        Err(format!("upload {upload:?} is not a lower-case hex SHA-256"))
    }
}

/// The upload name of an envelope's JSON.
pub fn upload_of(json: &str) -> String {
    hex::encode(Sha256::digest(json.as_bytes()))
}

/// Packs one host's envelopes (each as its JSON) into task data: bundles of
/// whole envelopes up to [`MAX_PART_BYTES`] and [`MAX_BUNDLE`] envelopes, in the
/// order given, and an envelope too large for one part alone as pieces.
pub fn pack(envelopes: &[String]) -> Vec<String> {
    const OPEN: &str = "{\"bundle\":[";
    const CLOSE: &str = "]}";
    let mut parts = Vec::new();
    let mut bundle = String::new();
    let mut in_bundle = 0;
    let close = |bundle: &mut String, parts: &mut Vec<String>| {
        if !bundle.is_empty() {
            bundle.push_str(CLOSE);
            parts.push(std::mem::take(bundle));
        }
    };
    for env in envelopes {
        if OPEN.len() + env.len() + CLOSE.len() > MAX_PART_BYTES {
            close(&mut bundle, &mut parts);
            in_bundle = 0;
            parts.extend(pieces(env));
            continue;
        }
        if !bundle.is_empty()
            && (bundle.len() + 1 + env.len() + CLOSE.len() > MAX_PART_BYTES || in_bundle == MAX_BUNDLE)
        {
            close(&mut bundle, &mut parts);
            in_bundle = 0;
        }
        in_bundle += 1;
        bundle.push_str(if bundle.is_empty() { OPEN } else { "," });
        bundle.push_str(env);
    }
    close(&mut bundle, &mut parts);
    parts
}

/// Cuts one envelope's JSON into pieces.
fn pieces(env: &str) -> Vec<String> {
    let upload = upload_of(env);
    let size = MAX_PART_BYTES - PIECE_OVERHEAD;
    // The JSON is ASCII (names, hex and base64), so any byte offset is a boundary.
    let slices: Vec<&str> = env
        .as_bytes()
        .chunks(size)
        .map(|c| std::str::from_utf8(c).unwrap_or_default())
        .collect();
    let count = u32::try_from(slices.len()).unwrap_or(u32::MAX);
    slices
        .into_iter()
        .enumerate()
        .map(|(i, data)| {
            let piece = Piece {
                upload: upload.clone(),
                index: u32::try_from(i).unwrap_or(u32::MAX),
                count,
                data: data.to_owned(),
            };
            serde_json::json!({ "piece": piece }).to_string()
        })
        .collect()
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;
    use crate::envelope::{FileSpec, Keeper};

    fn sealed(keeper: &Keeper, host: &str, name: &str, size: usize) -> String {
        let spec = FileSpec {
            name: name.into(),
            mode: "0600".into(),
            readers: vec![],
        };
        serde_json::to_string(&keeper.seal(host, &spec, &vec![b'x'; size], 7).unwrap()).unwrap()
    }

    #[test]
    fn small_envelopes_share_parts_and_large_ones_come_in_pieces() {
        let keeper = Keeper::from_seed(&[1; 32]);
        let host = "ab".repeat(32);
        let mut envs: Vec<String> = (0..100)
            .map(|i| sealed(&keeper, &host, &format!("f{i}"), 4096))
            .collect();
        let parts = pack(&envs);
        assert_eq!(parts.len(), 2, "100 × 4 KiB in two parts of at most 512 KiB");
        let mut names = Vec::new();
        for p in &parts {
            assert!(p.len() <= MAX_PART_BYTES);
            match Part::parse(p).unwrap() {
                Part::Bundle(b) => names.extend(b.into_iter().map(|e| e.name)),
                other => panic!("{other:?}"),
            }
        }
        assert_eq!(names, (0..100).map(|i| format!("f{i}")).collect::<Vec<_>>(), "in order");

        envs.insert(1, sealed(&keeper, &host, "big", 2 << 20));
        let parts = pack(&envs);
        let pieces: Vec<Piece> = parts
            .iter()
            .filter_map(|p| match Part::parse(p).unwrap() {
                Part::Piece(p) => Some(p),
                _ => None,
            })
            .collect();
        assert_eq!(pieces.len(), 6, "2 MiB in base64 over 512 KiB pieces");
        let whole: String = pieces.iter().map(|p| p.data.as_str()).collect();
        assert_eq!(whole, envs[1]);
        assert!(pieces.iter().all(|p| p.upload == upload_of(&envs[1]) && p.count == 6));
        assert!(matches!(Part::parse(&parts[0]).unwrap(), Part::Bundle(b) if b.len() == 1));
        assert_eq!(MAX_PIECES, 43, "a 16 MiB file in base64 with its header");
    }

    #[test]
    fn a_bundle_has_at_most_max_bundle_envelopes() {
        let keeper = Keeper::from_seed(&[1; 32]);
        let host = "ab".repeat(32);
        let envs: Vec<String> = (0..MAX_BUNDLE + 1)
            .map(|i| sealed(&keeper, &host, &format!("f{i}"), 1))
            .collect();
        let parts = pack(&envs);
        assert_eq!(parts.len(), 2);
        assert!(matches!(Part::parse(&parts[0]).unwrap(), Part::Bundle(b) if b.len() == MAX_BUNDLE));
        let over = format!("{{\"bundle\":[{}]}}", envs.join(","));
        let e = Part::parse(&over).unwrap_err().to_string();
        assert_eq!(e, "a bundle of 257 envelopes; at most 256");
    }

    #[test]
    fn bad_parts_are_refused_naming_what_is_wrong() {
        let keeper = Keeper::from_seed(&[1; 32]);
        let good = sealed(&keeper, &"ab".repeat(32), "ok", 10);
        let e = Part::parse(&format!("{{\"bundle\":[{good},{{\"v\":1}}]}}")).unwrap_err();
        assert!(
            e.to_string()
                .starts_with("bundle envelope 1: not a file-delivery envelope"),
            "{e}"
        );
        let e = Part::parse(&" ".repeat(MAX_PART_BYTES + 1)).unwrap_err();
        assert_eq!(e, PartError::TooLarge(MAX_PART_BYTES + 1));
        let piece = |upload: &str, index: u32, count: u32| {
            serde_json::json!({"piece": {"upload": upload, "index": index, "count": count, "data": "x"}}).to_string()
        };
        let up = "0".repeat(64);
        assert!(matches!(Part::parse(&piece(&up, 0, 1)).unwrap(), Part::Piece(_)));
        let e = Part::parse(&piece(&up, 2, 2)).unwrap_err().to_string();
        assert!(e.contains("piece 2 of 2 is out of range"), "{e}");
        let e = Part::parse(&piece(&up, 0, MAX_PIECES + 1)).unwrap_err().to_string();
        assert!(e.contains("out of range"), "{e}");
        let e = Part::parse(&piece("../../x", 0, 1)).unwrap_err().to_string();
        assert!(e.contains("not a lower-case hex SHA-256"), "{e}");
        let e = Part::parse("{\"piece\":{\"upload\":1}}").unwrap_err().to_string();
        assert!(e.starts_with("not a file-delivery envelope"), "{e}");
    }
}
