//! The protobuf messages that cross the network: `PackagedData` (agent → server,
//! decoded by the server's stream) and `Command` (server → agent), and the
//! `Payload` bytes the server reads for its own records. Decoding must refuse,
//! never panic; what decodes must encode and decode again to the same message.
#![no_main]

use bytes::Bytes;
use keel_proto::grpc::{Command, PackagedData};
use libfuzzer_sys::fuzz_target;
use prost::Message;

fuzz_target!(|data: &[u8]| {
    // As tonic hands the server a message: owned `Bytes` (EncodedRecord.data is
    // a zero-copy `Bytes` field).
    if let Ok(pd) = PackagedData::decode(Bytes::copy_from_slice(data)) {
        let again = PackagedData::decode(pd.encode_to_vec().as_slice()).expect("re-encoded PackagedData decodes");
        assert_eq!(pd, again);
        for r in &pd.records {
            assert!(r.data.len() <= data.len());
            // The server decodes the payload of the records it reads itself.
            let _ = keel_proto::payload::decode(&r.data);
        }
    }
    if let Ok(cmd) = Command::decode(data) {
        let again = Command::decode(cmd.encode_to_vec().as_slice()).expect("re-encoded Command decodes");
        assert_eq!(cmd, again);
    }
    if let Ok(fields) = keel_proto::payload::decode(data) {
        let again = keel_proto::payload::decode(&keel_proto::payload::encode(fields.clone()))
            .expect("re-encoded Payload decodes");
        assert_eq!(fields, again);
    }
});
