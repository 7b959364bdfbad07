//! key-request's check of a provider's reply (a program's stdout or a socket's
//! answer): `reply::parse` must refuse, never panic, accept only what its checks
//! allow, and never put the key into an error message.
#![no_main]

use keel_plugin_key_request::reply::{self, MAX_KEY_BYTES, MAX_NAME_BYTES, ReplyError};
use keel_plugin_key_request::request::{By, Lookup};
use libfuzzer_sys::fuzz_target;
use serde_json::Value;

fuzz_target!(|data: &[u8]| {
    // The first byte picks the lookup the reply answers.
    let Some((&which, reply_bytes)) = data.split_first() else {
        return;
    };
    let lookup = match which % 3 {
        0 => Lookup::new(By::Id, "001"),
        1 => Lookup::new(By::Id, "12345678"),
        _ => Lookup::new(By::Ip, "10.1.2.3"),
    }
    .expect("a valid lookup");

    match reply::parse(reply_bytes, &lookup) {
        Ok(entry) => {
            assert!((3..=8).contains(&entry.id.len()) && entry.id.bytes().all(|b| b.is_ascii_digit()));
            assert!(!entry.name.is_empty() && entry.name.len() <= MAX_NAME_BYTES);
            if lookup.by == By::Id {
                assert_eq!(entry.id.trim_start_matches('0'), lookup.value.trim_start_matches('0'));
            }
            // The key is the reply's `data.key`, unchanged.
            let v: Value = serde_json::from_slice(reply_bytes).expect("an accepted reply is JSON");
            let key = v["data"]["key"].as_str().expect("an accepted reply has a key");
            assert!(!key.is_empty() && key.len() <= MAX_KEY_BYTES);
        }
        Err(e) => {
            let message = e.to_string();
            if let ReplyError::Refused { message: Some(m), .. } = &e {
                assert!(m.chars().all(|c| c == ' ' || c.is_ascii_graphic() || c == '.'));
            }
            // The key must not leak into the message: the message is the same with
            // another key of the same length in its place (printable keys only, which
            // pass or fail the key check alike).
            let Ok(mut v) = serde_json::from_slice::<Value>(reply_bytes) else {
                return;
            };
            let Some(key) = v["data"]["key"].as_str().map(str::to_owned) else {
                return;
            };
            if key.len() < 4 || !key.bytes().all(|b| b.is_ascii_graphic()) {
                return;
            }
            v["data"]["key"] = Value::String("Z".repeat(key.len()));
            let other = reply::parse(v.to_string().as_bytes(), &lookup)
                .err()
                .map(|e| e.to_string())
                .unwrap_or_default();
            if message.contains(&key) {
                assert!(other.contains(&key), "the key leaked into {message:?}");
            }
        }
    }
});
