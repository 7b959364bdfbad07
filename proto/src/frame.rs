//! The plugin pipe protocol: every frame is a 4-byte little-endian length and
//! that many bytes of protobuf.
//!
//! Plugin → agent frames are `Record { int32 data_type = 1; int64 timestamp = 2;
//! Payload data = 3; uint64 seq = 100; }`. The agent never decodes the `Payload`:
//! [`parse_record`] walks the record's top-level fields, takes `data_type`,
//! `timestamp` and `seq` (the SDK's record number), and
//! returns the payload as a zero-copy slice of the frame. Fields may come in any
//! order, zero values may be absent (protobuf omits them), and unknown fields are
//! skipped; anything that is not well-formed protobuf is refused.
//!
//! Agent → plugin frames are `Task`s, encoded with prost.

use bytes::{BufMut, Bytes, BytesMut};
use prost::Message;

use crate::grpc::{Record, Task};

/// Default largest frame, in bytes.
pub const DEFAULT_MAX_FRAME: usize = 4 << 20;

/// A record as the agent forwards it: the payload bytes untouched.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RawRecord {
    /// Field 1.
    pub data_type: i32,
    /// Field 2; 0 when absent.
    pub timestamp: i64,
    /// The bytes of field 3 (an encoded `Payload`), as the plugin wrote them.
    pub payload: Bytes,
    /// Field 100, the record's number in this run of the plugin; 0 when absent.
    pub seq: u64,
}

/// Why a frame was refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum FrameError {
    /// The length prefix exceeds the limit.
    #[error("frame of {len} bytes exceeds the {max}-byte limit")]
    TooLarge {
        /// Declared length.
        len: usize,
        /// The limit.
        max: usize,
    },
    /// The stream ended inside a frame.
    #[error("stream ended {missing} bytes short of the frame its length prefix announced")]
    Truncated {
        /// Bytes missing.
        missing: usize,
    },
    /// The record's type is the agent's own ([`crate::data_type::from_plugin`]).
    #[error("data_type {0} is the agent's own; a plugin may not send it")]
    Reserved(i32),
    /// The frame is not a well-formed `Record`.
    #[error("malformed record at byte {offset}: {reason}")]
    Malformed {
        /// Offset in the frame.
        offset: usize,
        /// What is wrong.
        reason: &'static str,
    },
}

fn malformed(offset: usize, reason: &'static str) -> FrameError {
    FrameError::Malformed { offset, reason }
}

fn varint(buf: &[u8], pos: &mut usize) -> Result<u64, FrameError> {
    let start = *pos;
    let mut value: u64 = 0;
    for shift in (0..64).step_by(7) {
        let Some(&b) = buf.get(*pos) else {
            return Err(malformed(start, "truncated varint"));
        };
        *pos += 1;
        value |= u64::from(b & 0x7f) << shift;
        if b < 0x80 {
            return Ok(value);
        }
    }
    Err(malformed(start, "varint longer than 10 bytes"))
}

/// Parses a `Record` frame body without decoding its payload.
pub fn parse_record(frame: Bytes) -> Result<RawRecord, FrameError> {
    let buf = &frame[..];
    let mut pos = 0;
    let mut data_type = 0i32;
    let mut timestamp = 0i64;
    let mut seq = 0u64;
    let mut payload: Option<(usize, usize)> = None;
    let mut extra_payload: Vec<(usize, usize)> = Vec::new();
    while pos < buf.len() {
        let key_at = pos;
        let key = varint(buf, &mut pos)?;
        let field = key >> 3;
        if field == 0 {
            return Err(malformed(key_at, "field number 0"));
        }
        match key & 7 {
            0 => {
                let v = varint(buf, &mut pos)?;
                // int32/int64 are two's complement in a varint: truncation is the decoding.
                match field {
                    1 => data_type = v as i32,
                    2 => timestamp = v as i64,
                    100 => seq = v,
                    _ => {}
                }
            }
            1 => {
                pos = pos
                    .checked_add(8)
                    .filter(|p| *p <= buf.len())
                    .ok_or(malformed(key_at, "truncated fixed64"))?;
            }
            2 => {
                let len = varint(buf, &mut pos)?;
                let len = usize::try_from(len).map_err(|_| malformed(key_at, "length overflow"))?;
                let end = pos
                    .checked_add(len)
                    .filter(|e| *e <= buf.len())
                    .ok_or(malformed(key_at, "length past the frame"))?;
                if field == 3 {
                    // Repeated occurrences of an embedded message merge; keep them all.
                    match payload {
                        None => payload = Some((pos, end)),
                        Some(_) => extra_payload.push((pos, end)),
                    }
                }
                pos = end;
            }
            5 => {
                pos = pos
                    .checked_add(4)
                    .filter(|p| *p <= buf.len())
                    .ok_or(malformed(key_at, "truncated fixed32"))?;
            }
            _ => return Err(malformed(key_at, "invalid or group wire type")),
        }
    }
    let payload = match (payload, extra_payload.is_empty()) {
        (None, _) => Bytes::new(),
        (Some((s, e)), true) => frame.slice(s..e),
        (Some(first), false) => {
            let mut merged = BytesMut::new();
            for (s, e) in std::iter::once(first).chain(extra_payload) {
                merged.extend_from_slice(&buf[s..e]);
            }
            merged.freeze()
        }
    };
    Ok(RawRecord {
        data_type,
        timestamp,
        payload,
        seq,
    })
}

/// Encodes a frame: length prefix and message.
pub fn encode<M: Message>(msg: &M) -> Bytes {
    let len = msg.encoded_len();
    let mut out = BytesMut::with_capacity(4 + len);
    out.put_u32_le(len as u32);
    // Encoding into a buffer with enough capacity cannot fail.
    let _ = msg.encode(&mut out);
    out.freeze()
}

/// Encodes a task frame, agent → plugin.
pub fn encode_task(task: &Task) -> Bytes {
    encode(task)
}

/// Encodes a record frame, plugin → agent.
pub fn encode_record(record: &Record) -> Bytes {
    encode(record)
}

/// Reads the length prefix of the next frame from `header`, checking it against `max`.
pub fn frame_len(header: [u8; 4], max: usize) -> Result<usize, FrameError> {
    let len = u32::from_le_bytes(header) as usize;
    if len > max {
        return Err(FrameError::TooLarge { len, max });
    }
    Ok(len)
}

#[cfg(test)]
mod tests {
    use std::collections::HashMap;

    use super::*;
    use crate::grpc::Payload;

    fn record(data_type: i32, timestamp: i64, fields: &[(&str, &str)]) -> Record {
        let fields: HashMap<String, String> = fields.iter().map(|(k, v)| ((*k).into(), (*v).into())).collect();
        Record {
            data_type,
            timestamp,
            data: Some(Payload { fields }),
            seq: 0,
        }
    }

    #[test]
    fn round_trips_prost_records_without_touching_the_payload() {
        let r = record(6001, 1_700_000_000, &[("a", "b"), ("c", "d")]);
        let frame = encode_record(&r);
        let body = frame.slice(4..);
        let raw = parse_record(body).unwrap();
        assert_eq!(raw.data_type, 6001);
        assert_eq!(raw.timestamp, 1_700_000_000);
        assert_eq!(raw.payload, Bytes::from(r.data.unwrap().encode_to_vec()));
        assert_eq!(raw.seq, 0);
    }

    #[test]
    fn the_record_number_is_read_and_kept_out_of_the_payload() {
        let r = Record {
            seq: 300,
            ..record(6001, 1, &[("a", "b")])
        };
        let raw = parse_record(encode_record(&r).slice(4..)).unwrap();
        assert_eq!(raw.seq, 300);
        assert_eq!(raw.payload, Bytes::from(r.data.unwrap().encode_to_vec()));
    }

    #[test]
    fn any_order_missing_timestamp_and_unknown_fields() {
        // payload first, then an unknown fixed64 field 9, a varint field 15, data_type; no timestamp.
        let payload = [0x0a, 0x06, 0x0a, 0x01, b'k', 0x12, 0x01, b'v'];
        let mut body = vec![0x1a, payload.len() as u8];
        body.extend_from_slice(&payload);
        body.extend_from_slice(&[0x49, 1, 2, 3, 4, 5, 6, 7, 8]); // field 9, wire type 1
        body.extend_from_slice(&[0x78, 0x96, 0x01]); // field 15, varint 150
        body.extend_from_slice(&[0x08, 0xe8, 0x07]); // data_type 1000
        let raw = parse_record(Bytes::from(body)).unwrap();
        assert_eq!((raw.data_type, raw.timestamp), (1000, 0));
        assert_eq!(&raw.payload[..], &payload[..]);
    }

    #[test]
    fn garbage_is_refused() {
        for bad in [
            &[0x08][..],
            &[0x1a, 0x05, 1, 2],
            &[0x0b, 0x00],
            &[0x00, 0x01],
            &[0xff; 11],
            &[0x09, 1, 2],
        ] {
            assert!(
                matches!(
                    parse_record(Bytes::copy_from_slice(bad)),
                    Err(FrameError::Malformed { .. })
                ),
                "{bad:?}"
            );
        }
    }

    #[test]
    fn length_limit() {
        assert_eq!(frame_len(16u32.to_le_bytes(), 16), Ok(16));
        assert_eq!(
            frame_len(u32::MAX.to_le_bytes(), 16),
            Err(FrameError::TooLarge {
                len: u32::MAX as usize,
                max: 16
            })
        );
    }

    #[test]
    fn negative_data_type_decodes_like_protobuf() {
        let r = Record {
            data_type: -5,
            timestamp: -1,
            data: None,
            seq: 0,
        };
        let raw = parse_record(encode_record(&r).slice(4..)).unwrap();
        assert_eq!((raw.data_type, raw.timestamp), (-5, -1));
        assert!(raw.payload.is_empty());
    }
}
