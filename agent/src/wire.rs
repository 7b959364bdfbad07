//! Encoding batches straight into `PackagedData` bytes, part of the transport
//! edge (with `transport`, the only modules that see prost).
//!
//! Protobuf fields may come in any order, so a batch is built incrementally: each
//! record is appended as a field-1 `EncodedRecord` as it arrives, then the header
//! fields, and the spool appends `seq` and `epoch` last ([`put_mark`]). The payload bytes are
//! copied once, into the batch.

use bytes::BytesMut;
use keel_proto::grpc::PackagedData;
use prost::Message;
use prost::encoding::{WireType, encode_key, encode_varint, encoded_len_varint, int32, int64, key_len, uint32, uint64};

use crate::record::{Header, PRODUCT, Record};

/// Appends `record` as `PackagedData.records` (field 1): an `EncodedRecord`, with
/// its source (fields 100–102) when a plugin wrote it.
pub fn put_record(buf: &mut BytesMut, record: &Record) {
    encode_key(1, WireType::LengthDelimited, buf);
    encode_varint(body_len(record) as u64, buf);
    int32::encode(1, &record.data_type, buf);
    int64::encode(2, &record.timestamp, buf);
    if !record.data.is_empty() {
        encode_key(3, WireType::LengthDelimited, buf);
        encode_varint(record.data.len() as u64, buf);
        buf.extend_from_slice(&record.data);
    }
    if let Some(s) = &record.source {
        encode_key(100, WireType::LengthDelimited, buf);
        encode_varint(s.plugin.len() as u64, buf);
        buf.extend_from_slice(s.plugin.as_bytes());
        uint32::encode(101, &s.instance, buf);
        uint64::encode(102, &s.seq, buf);
    }
}

/// The encoded size of the `EncodedRecord` of `record`, without its key and length.
fn body_len(record: &Record) -> usize {
    let data = if record.data.is_empty() {
        0
    } else {
        1 + encoded_len_varint(record.data.len() as u64) + record.data.len()
    };
    let source = record.source.as_ref().map_or(0, |s| {
        key_len(100)
            + encoded_len_varint(s.plugin.len() as u64)
            + s.plugin.len()
            + uint32::encoded_len(101, &s.instance)
            + uint64::encoded_len(102, &s.seq)
    });
    int32::encoded_len(1, &record.data_type) + int64::encoded_len(2, &record.timestamp) + data + source
}

/// Appends the header fields (2–9).
pub fn put_header(buf: &mut BytesMut, header: &Header) {
    let h = PackagedData {
        records: Vec::new(),
        agent_id: header.agent_id.clone(),
        intranet_ipv4: header.addresses.intranet_ipv4.clone(),
        extranet_ipv4: header.addresses.extranet_ipv4.clone(),
        intranet_ipv6: header.addresses.intranet_ipv6.clone(),
        extranet_ipv6: header.addresses.extranet_ipv6.clone(),
        hostname: header.hostname.clone(),
        version: keel_common::VERSION.to_owned(),
        product: PRODUCT.to_owned(),
        seq: 0,
        epoch: 0,
        acked: 0,
    };
    // Encoding into a BytesMut grows it as needed and cannot fail.
    let _ = h.encode(buf);
}

/// Appends the batch's place in the spool, `seq` and `epoch`: the spool does so
/// last, when it stores the batch.
pub fn put_mark(buf: &mut BytesMut, seq: u64, epoch: u64) {
    let mark = PackagedData {
        seq,
        epoch,
        ..Default::default()
    };
    // Encoding into a BytesMut grows it as needed and cannot fail.
    let _ = mark.encode(buf);
}

/// The encoded size of `record` inside a batch.
pub fn record_len(record: &Record) -> usize {
    let len = body_len(record);
    1 + encoded_len_varint(len as u64) + len
}

#[cfg(test)]
mod tests {
    use bytes::Bytes;

    use super::*;
    use crate::record::Source;

    #[test]
    fn incremental_encoding_is_a_valid_packaged_data() {
        let mut buf = BytesMut::new();
        let r1 = Record {
            data_type: 6001,
            timestamp: 7,
            data: Bytes::from_static(b"\x0a\x00"),
            source: Some(Source {
                plugin: "p1".into(),
                instance: 9,
                seq: 300,
            }),
        };
        let r2 = Record {
            data_type: 1000,
            timestamp: 0,
            data: Bytes::new(),
            source: None,
        };
        put_record(&mut buf, &r1);
        put_record(&mut buf, &r2);
        assert_eq!(buf.len(), record_len(&r1) + record_len(&r2));
        let header = Header {
            agent_id: "a1".into(),
            hostname: "h".into(),
            ..Default::default()
        };
        put_header(&mut buf, &header);
        put_mark(&mut buf, 6, 1 << 40);
        let pd = PackagedData::decode(buf.freeze()).unwrap();
        assert_eq!((pd.seq, pd.epoch), (6, 1 << 40));
        assert_eq!(pd.records.len(), 2);
        assert_eq!(pd.records[0].data, Bytes::from_static(b"\x0a\x00"));
        let r = &pd.records[0];
        assert_eq!((r.data_type, r.timestamp), (6001, 7));
        assert_eq!((r.plugin.as_str(), r.instance, r.seq), ("p1", 9, 300));
        let r = &pd.records[1];
        assert_eq!((r.data_type, r.plugin.as_str(), r.seq), (1000, "", 0));
        assert_eq!((pd.agent_id.as_str(), pd.product.as_str()), ("a1", "keel-agent"));
        assert_eq!(pd.acked, 0);
    }
}
