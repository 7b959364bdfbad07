//! file-delivery's envelope: the JSON of a 6200/6202 task, which reaches the host
//! from the server and is parsed before anything is trusted. `Envelope::parse`
//! must refuse, never panic; what it accepts must satisfy the checks it documents
//! and survive a round trip; `open` (signature, HPKE, digest) must refuse a
//! changed envelope without panicking. `parse_mode` and `ed25519_public` (the
//! host's configuration) get the raw input too.
#![no_main]

use keel_plugin_file_delivery::envelope::{self, Envelope, HostKey, Keeper, MAX_READERS, MODE_ALLOWED, Op};
use libfuzzer_sys::fuzz_target;

/// The keeper and host of the seed corpus (fuzz/corpus/envelope), so that mutated
/// seeds reach the signature check and decryption.
const KEEPER_SEED: [u8; 32] = [7; 32];
const HOST_SECRET: [u8; 32] = [9; 32];

fuzz_target!(|data: &[u8]| {
    let text = String::from_utf8_lossy(data);

    if let Ok(bits) = envelope::parse_mode(&text) {
        assert!(bits & !MODE_ALLOWED == 0, "mode {text:?} gave {bits:o}");
        assert!(bits & 0o600 != 0, "mode {text:?} gave {bits:o}");
    }
    if let Ok(key) = keel_common::keys::ed25519_public(&text) {
        assert!(text.trim().eq_ignore_ascii_case(&hex_of(&key.to_bytes())));
    }

    let Ok(env) = Envelope::parse(&text) else { return };
    assert!(!env.name.is_empty() && !env.name.starts_with('/'));
    assert!(env.name.split('/').all(|c| !c.is_empty() && !c.starts_with('.')));
    assert!(env.version > 0);
    match env.op {
        Op::Deliver => {
            envelope::parse_mode(&env.mode).expect("an accepted delivery has a valid mode");
            assert!(env.readers.len() <= MAX_READERS);
            assert!(!env.enc.is_empty() && !env.ciphertext.is_empty());
        }
        Op::Remove => assert!(env.mode.is_empty() && env.readers.is_empty() && env.ciphertext.is_empty()),
    }
    // What the plugin stores and reads back parses the same.
    let json = serde_json::to_string(&env).expect("an envelope serializes");
    let again = Envelope::parse(&json).expect("a serialized accepted envelope parses");
    assert_eq!(json, serde_json::to_string(&again).expect("an envelope serializes"));

    let keeper = Keeper::from_seed(&KEEPER_SEED);
    let trusted = [keel_common::keys::ed25519_public(&keeper.public_hex()).expect("the keeper's own key parses")];
    let host = HostKey::from_secret(&HOST_SECRET).expect("a 32-byte X25519 secret");
    if let Ok(opened) = env.open(&trusted, &host) {
        let _ = opened;
        assert_eq!(env.keeper.to_ascii_lowercase(), keeper.public_hex());
    }
});

fn hex_of(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}
