//! The key never leaves the plugin: after lookups, proofs and failures of every
//! kind, nothing the plugin wrote (records, logs, stderr) contains a key.
#![allow(clippy::expect_used, clippy::unwrap_used)]

mod support;

use keel_tests::mariadb::{AgentRow, KeyDb};
use serde_json::json;
use support::{Plugin, proof_task, reply, script};

const KEYS: [&str; 3] = [
    "KEEL-SECRET-alpha-5e1f0c9b7d",
    "KEEL-SECRET-bravo-0a9d8c7b6e",
    "KEEL-SECRET-charlie-3c2b1a0f",
];

#[test]
fn the_key_appears_nowhere_in_what_the_plugin_writes() {
    let dir = tempfile::tempdir().unwrap();
    let db = KeyDb::create(&[
        AgentRow::new("001", "web-1", "10.1.2.3", KEYS[0]),
        AgentRow::new("002", "db-1", "any", KEYS[1]),
    ]);
    let sock = dir.path().join("provider.sock");
    let _server = db.serve(&sock);
    // Replies with the key in the wrong place, or a key with a problem.
    let body = format!(
        r#"case "$2" in
201) printf '%s' '{a}' ;;
202) printf '%s' '{b}' ;;
203) printf '%s' '{c}' ;;
204) printf '%s' '{{"error":3,"message":"no such agent"}}{k}' ;;
esac"#,
        a = reply("201", &format!("{} x", KEYS[2]), "any", "k"),
        b = reply("202", "n", "any", &format!("{}\u{7}", KEYS[2])),
        c = reply("203", "n", "any", &format!("{}{}", KEYS[2], "x".repeat(120))),
        k = KEYS[2],
    );
    let odd = script(dir.path(), "odd", &body);

    let mut all = String::new();
    let configs = [
        json!({"exec_path": db.exec_path(), "threads": 2, "timeout": 20}),
        json!({"socket": sock, "threads": 2, "timeout": 20}),
    ];
    for detail in configs {
        let mut p = Plugin::start(&detail);
        p.lookup("id", "001", "id");
        p.lookup("ip", "10.1.2.3", "ip");
        p.task(6001, &proof_task("id", "001", KEYS[0]), "proof-right");
        p.task(6001, &proof_task("id", "002", KEYS[0]), "proof-wrong");
        p.lookup("id", "404", "missing");
        assert_eq!(p.result("id")["status"], "succeeded");
        assert_eq!(p.result("ip")["status"], "succeeded");
        assert_eq!(p.record(6001, "proof-right")["verified"], "true");
        assert_eq!(p.record(6001, "proof-wrong")["verified"], "false");
        assert_eq!(p.result("missing")["status"], "failed");
        all.push_str(&p.all_output());
    }
    let mut p = Plugin::start(&json!({"exec_path": odd, "threads": 2}));
    for id in ["201", "202", "203", "204"] {
        p.lookup("id", id, id);
    }
    for id in ["201", "202", "203", "204"] {
        assert_eq!(p.result(id)["status"], "failed", "{id}");
    }
    // Stopping flushes everything it still had.
    p.close_stdin();
    assert!(p.wait_exit().success());
    all.push_str(&p.all_output());

    assert!(all.contains("\"data_type\":6000") && all.contains("key-request ready"));
    for key in KEYS {
        assert!(!all.contains(key), "{key} leaked:\n{all}");
        // Nor a recognisable part of it.
        assert!(!all.contains(&key[12..]), "part of {key} leaked:\n{all}");
    }
}
