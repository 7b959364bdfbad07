//! `Payload { map<string,string> fields = 1; }` as bytes.

use std::collections::HashMap;

use bytes::Bytes;
use prost::Message;

use crate::grpc::Payload;

/// A `Payload` that could not be decoded.
#[derive(Debug, thiserror::Error)]
pub enum DecodeError {
    /// As prost refused it.
    #[error("payload is not a valid grpc.Payload: {0}")]
    Prost(#[from] prost::DecodeError),
    /// As the borrowing reader refused it: what was wrong, and in which field.
    #[error("payload is not a valid grpc.Payload: {what} ({field})")]
    Field {
        /// What was wrong.
        what: &'static str,
        /// The field, as `Message.field`.
        field: &'static str,
    },
}

/// Encodes fields as `Payload` bytes.
pub fn encode<K, V>(fields: impl IntoIterator<Item = (K, V)>) -> Bytes
where
    K: Into<String>,
    V: Into<String>,
{
    let payload = Payload {
        fields: fields.into_iter().map(|(k, v)| (k.into(), v.into())).collect(),
    };
    Bytes::from(payload.encode_to_vec())
}

/// Decodes `Payload` bytes into their fields.
pub fn decode(bytes: &[u8]) -> Result<HashMap<String, String>, DecodeError> {
    Ok(Payload::decode(bytes)?.fields)
}

/// The fields of `Payload` bytes, borrowed from them: one allocation (the list)
/// instead of two strings per field and a map. Sorted by key; where a key repeats,
/// the last value counts, as when decoded into a map.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct Fields<'a>(Vec<(&'a str, &'a str)>);

impl<'a> Fields<'a> {
    /// The value of `key`, if present.
    pub fn get(&self, key: &str) -> Option<&'a str> {
        self.0
            .binary_search_by(|(k, _)| (*k).cmp(key))
            .ok()
            .map(|i| self.0[i].1)
    }

    /// The fields in key order.
    pub fn iter(&self) -> impl ExactSizeIterator<Item = (&'a str, &'a str)> + '_ {
        self.0.iter().copied()
    }

    /// How many fields there are.
    pub fn len(&self) -> usize {
        self.0.len()
    }

    /// Whether there are none.
    pub fn is_empty(&self) -> bool {
        self.0.is_empty()
    }
}

/// Reads `Payload` bytes without copying: what `decode` accepts, the same fields
/// (unknown fields skipped, strings checked for UTF-8), and the same refusals.
pub fn fields(bytes: &[u8]) -> Result<Fields<'_>, DecodeError> {
    use prost::encoding::{DecodeContext, decode_key, skip_field};

    let mut buf = bytes;
    let mut list = Vec::new();
    while !buf.is_empty() {
        let (tag, wire_type) = decode_key(&mut buf)?;
        if tag != 1 {
            skip_field(wire_type, tag, &mut buf, DecodeContext::default())?;
            continue;
        }
        let mut entry = delimited(wire_type, &mut buf, "Payload.fields")?;
        let (mut key, mut value) = ("", "");
        while !entry.is_empty() {
            let (tag, wire_type) = decode_key(&mut entry)?;
            match tag {
                1 => key = string(wire_type, &mut entry, "Payload.FieldsEntry.key")?,
                2 => value = string(wire_type, &mut entry, "Payload.FieldsEntry.value")?,
                _ => skip_field(wire_type, tag, &mut entry, DecodeContext::default())?,
            }
        }
        list.push((key, value));
    }
    // Stable: among equal keys the last one stays last, and is the one kept.
    list.sort_by(|a, b| a.0.cmp(b.0));
    let mut kept: Vec<(&str, &str)> = Vec::with_capacity(list.len());
    for (k, v) in list {
        match kept.last_mut() {
            Some(last) if last.0 == k => last.1 = v,
            _ => kept.push((k, v)),
        }
    }
    Ok(Fields(kept))
}

/// The next length-delimited field's bytes, taken off `buf`.
fn delimited<'a>(
    wire_type: prost::encoding::WireType,
    buf: &mut &'a [u8],
    field: &'static str,
) -> Result<&'a [u8], DecodeError> {
    if wire_type != prost::encoding::WireType::LengthDelimited {
        return Err(DecodeError::Field {
            what: "invalid wire type (expected length-delimited)",
            field,
        });
    }
    let len = prost::encoding::decode_varint(buf)?;
    let Some(len) = usize::try_from(len).ok().filter(|l| *l <= buf.len()) else {
        return Err(DecodeError::Field {
            what: "length beyond the end of the buffer",
            field,
        });
    };
    let (taken, rest) = buf.split_at(len);
    *buf = rest;
    Ok(taken)
}

fn string<'a>(
    wire_type: prost::encoding::WireType,
    buf: &mut &'a [u8],
    field: &'static str,
) -> Result<&'a str, DecodeError> {
    let bytes = delimited(wire_type, buf, field)?;
    std::str::from_utf8(bytes).map_err(|_| DecodeError::Field {
        what: "string is not UTF-8",
        field,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn round_trip() {
        let bytes = encode([("token", "t1"), ("status", "succeeded")]);
        let fields = decode(&bytes).unwrap();
        assert_eq!(fields.get("token").map(String::as_str), Some("t1"));
        assert_eq!(fields.len(), 2);
    }

    #[test]
    fn elkeid_bytes_decode() {
        // Payload{fields:{"a":"b"}} as Elkeid's Go code emits it:
        // field 1, LEN 6: map entry {1:"a", 2:"b"}.
        let bytes = [0x0a, 0x06, 0x0a, 0x01, b'a', 0x12, 0x01, b'b'];
        let fields = decode(&bytes).unwrap();
        assert_eq!(fields.get("a").map(String::as_str), Some("b"));
    }

    #[test]
    fn garbage_is_an_error() {
        assert!(decode(&[0xff, 0xff, 0xff]).is_err());
        assert!(fields(&[0xff, 0xff, 0xff]).is_err());
    }

    #[test]
    fn borrowed_fields_are_sorted_and_the_last_repeat_counts() {
        // {1:"b"→"2"}, {1:"a"→"1"}, {1:"b"→"3"}, and an unknown field 7 (varint).
        let mut bytes = Vec::new();
        for (k, v) in [("b", "2"), ("a", "1"), ("b", "3")] {
            bytes.extend_from_slice(&[0x0a, 6, 0x0a, 1, k.as_bytes()[0], 0x12, 1, v.as_bytes()[0]]);
        }
        bytes.extend_from_slice(&[0x38, 0x05]);
        let f = fields(&bytes).unwrap();
        assert_eq!(f.iter().collect::<Vec<_>>(), vec![("a", "1"), ("b", "3")]);
        assert_eq!(f.get("b"), Some("3"));
        assert_eq!(f.get("c"), None);
        assert_eq!(decode(&bytes).unwrap()["b"], "3");
    }

    /// A small deterministic generator (xorshift), so the comparison below runs
    /// the same inputs every time.
    struct Rng(u64);
    impl Rng {
        fn next(&mut self) -> u64 {
            self.0 ^= self.0 << 13;
            self.0 ^= self.0 >> 7;
            self.0 ^= self.0 << 17;
            self.0
        }
        fn below(&mut self, n: u64) -> usize {
            usize::try_from(self.next() % n).unwrap()
        }
    }

    #[test]
    fn borrowed_and_owned_decoding_agree_on_mutated_payloads() {
        let mut rng = Rng(0x9e37_79b9_7f4a_7c15);
        let keys = ["hostname", "cpu", "plugins", "", "é", "k"];
        let (mut refused, mut accepted) = (0, 0);
        for _ in 0..20_000 {
            let n = rng.below(5);
            let picked: Vec<(String, String)> = (0..n)
                .map(|_| (keys[rng.below(6)].to_owned(), format!("v{}", rng.next() % 1000)))
                .collect();
            let mut bytes = encode(picked).to_vec();
            for _ in 0..rng.below(4) {
                match rng.below(3) {
                    0 if !bytes.is_empty() => {
                        let i = rng.below(bytes.len() as u64);
                        bytes[i] = u8::try_from(rng.next() & 0xff).unwrap();
                    }
                    1 if !bytes.is_empty() => {
                        let cut = rng.below(bytes.len() as u64);
                        bytes.truncate(cut);
                    }
                    _ => bytes.push(u8::try_from(rng.next() & 0xff).unwrap()),
                }
            }
            match (decode(&bytes), fields(&bytes)) {
                (Ok(owned), Ok(borrowed)) => {
                    accepted += 1;
                    assert_eq!(owned.len(), borrowed.len(), "{bytes:02x?}");
                    for (k, v) in borrowed.iter() {
                        assert_eq!(owned.get(k).map(String::as_str), Some(v), "{bytes:02x?}");
                    }
                }
                (Err(_), Err(_)) => refused += 1,
                (owned, borrowed) => panic!("{bytes:02x?}: owned {owned:?}, borrowed {borrowed:?}"),
            }
        }
        // Both kinds of input were tried.
        assert!(
            refused > 1000 && accepted > 1000,
            "refused {refused}, accepted {accepted}"
        );
    }
}
