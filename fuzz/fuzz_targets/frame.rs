//! `keel_proto::frame`: the agent's parser of plugin → agent frames, which reads
//! whatever a plugin writes to fd 4. It must refuse, never panic, and what it
//! accepts must describe the input.
#![no_main]

use bytes::Bytes;
use keel_proto::frame::{self, DEFAULT_MAX_FRAME, FrameError};
use keel_proto::grpc::{Payload, Record};
use libfuzzer_sys::fuzz_target;
use prost::Message;

fuzz_target!(|data: &[u8]| {
    if let Some(header) = data.first_chunk::<4>() {
        let declared = u32::from_le_bytes(*header) as usize;
        match frame::frame_len(*header, DEFAULT_MAX_FRAME) {
            Ok(len) => assert!(len == declared && len <= DEFAULT_MAX_FRAME),
            Err(FrameError::TooLarge { len, max }) => assert!(len == declared && len > max),
            Err(e) => panic!("frame_len gave {e:?}"),
        }
    }

    let input = Bytes::copy_from_slice(data);
    let range = input.as_ptr_range();
    match frame::parse_record(input.clone()) {
        Ok(record) => {
            let p = record.payload.as_ptr_range();
            if !record.payload.is_empty() && range.contains(&p.start) {
                // A single field 3: a zero-copy slice, which must end inside the frame.
                assert!(p.end <= range.end, "payload slice runs past the frame");
            }
            // Repeated field 3s are merged: never more bytes than the frame has.
            assert!(record.payload.len() <= data.len(), "payload longer than the frame");
            // Where prost also accepts the frame, both read the same record; a merged
            // payload decodes as prost's merge of the repeated message.
            if let Ok(decoded) = Record::decode(data) {
                assert_eq!(decoded.data_type, record.data_type);
                assert_eq!(decoded.timestamp, record.timestamp);
                assert_eq!(decoded.seq, record.seq);
                let payload = Payload::decode(&record.payload[..]).expect("prost accepted this payload in the frame");
                assert_eq!(payload, decoded.data.unwrap_or_default());
            }
        }
        Err(FrameError::Malformed { offset, .. }) => assert!(offset <= data.len(), "offset {offset} past the frame"),
        Err(e) => panic!("parse_record gave {e:?}, which only frame_len may give"),
    }
});
