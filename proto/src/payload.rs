//! `Payload { map<string,string> fields = 1; }` as bytes.

use std::collections::HashMap;

use bytes::Bytes;
use prost::Message;

use crate::grpc::Payload;

/// A `Payload` that could not be decoded.
#[derive(Debug, thiserror::Error)]
#[error("payload is not a valid grpc.Payload: {0}")]
pub struct DecodeError(#[from] prost::DecodeError);

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
    }
}
