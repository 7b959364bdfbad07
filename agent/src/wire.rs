//! Encoding batches straight into `PackagedData` bytes, part of the transport
//! edge (with `transport`, the only modules that see prost).
//!
//! Protobuf fields may come in any order, so a batch is built incrementally: each
//! record is appended as a field-1 `EncodedRecord` as it arrives, then the header
//! fields, and the spool appends `seq` and `epoch` last. The payload bytes are
//! copied once, into the batch.

use bytes::BytesMut;
use keel_proto::grpc::{EncodedRecord, PackagedData};
use prost::Message;

use crate::outbox::Record;
use crate::tasks::PRODUCT;
use crate::transport::Header;

/// Appends `record` as `PackagedData.records` (field 1).
pub fn put_record(buf: &mut BytesMut, record: &Record) {
    let r = EncodedRecord {
        data_type: record.data_type,
        timestamp: record.timestamp,
        data: record.data.clone(),
    };
    prost::encoding::message::encode(1, &r, buf);
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
    };
    // Encoding into a BytesMut grows it as needed and cannot fail.
    let _ = h.encode(buf);
}

/// The encoded size of `record` inside a batch.
pub fn record_len(record: &Record) -> usize {
    let r = EncodedRecord {
        data_type: record.data_type,
        timestamp: record.timestamp,
        data: record.data.clone(),
    };
    let len = r.encoded_len();
    1 + prost::encoding::encoded_len_varint(len as u64) + len
}

#[cfg(test)]
mod tests {
    use bytes::Bytes;

    use super::*;

    #[test]
    fn incremental_encoding_is_a_valid_packaged_data() {
        let mut buf = BytesMut::new();
        let r1 = Record {
            data_type: 6001,
            timestamp: 7,
            data: Bytes::from_static(b"\x0a\x00"),
        };
        let r2 = Record {
            data_type: 1000,
            timestamp: 0,
            data: Bytes::new(),
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
        let pd = PackagedData::decode(buf.freeze()).unwrap();
        assert_eq!(pd.records.len(), 2);
        assert_eq!(pd.records[0].data, Bytes::from_static(b"\x0a\x00"));
        assert_eq!((pd.agent_id.as_str(), pd.product.as_str()), ("a1", "keel-agent"));
    }
}
