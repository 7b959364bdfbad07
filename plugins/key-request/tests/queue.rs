//! The lookup queue through the real plugin: identical lookups in flight share one
//! provider call, and a full queue is refused at once.
#![allow(clippy::expect_used, clippy::unwrap_used)]

mod support;

use std::time::{Duration, Instant};

use serde_json::json;
use support::{Plugin, reply, script};

/// Twenty identical lookups while the first is still running: one program run,
/// twenty answers.
#[test]
fn identical_lookups_in_flight_share_one_provider_call() {
    let dir = tempfile::tempdir().unwrap();
    let calls = dir.path().join("calls");
    let provider = script(
        dir.path(),
        "slow",
        &format!(
            "echo \"$1 $2\" >> {}\nsleep 1\nprintf '%s' '{}'",
            calls.display(),
            reply("042", "slow-host", "10.4.2.1", "k")
        ),
    );
    let mut p = Plugin::start(&json!({"exec_path": provider, "threads": 4}));
    let lines: Vec<String> = (0..20)
        .map(|i| {
            json!({"data_type": 6000, "data": r#"{"by":"id","value":"042"}"#, "token": format!("t{i}")}).to_string()
        })
        .collect();
    p.send_lines(&lines);
    for i in 0..20 {
        let token = format!("t{i}");
        assert_eq!(p.result(&token)["status"], "succeeded");
        assert_eq!(p.record(6000, &token)["name"], "slow-host");
    }
    assert_eq!(p.records_of(6000).len(), 20);
    assert_eq!(
        std::fs::read_to_string(&calls).unwrap(),
        "id 042\n",
        "one provider call"
    );

    // Once answered, the same lookup runs again.
    p.lookup("id", "042", "later");
    assert_eq!(p.result("later")["status"], "succeeded");
    assert_eq!(std::fs::read_to_string(&calls).unwrap().lines().count(), 2);
}

#[test]
fn a_full_queue_is_refused_at_once() {
    let dir = tempfile::tempdir().unwrap();
    let provider = script(
        dir.path(),
        "slow",
        r#"sleep 2
printf '{"error":0,"data":{"id":"%s","name":"n","ip":"any","key":"k"}}' "$2""#,
    );
    let mut p = Plugin::start(&json!({"exec_path": provider, "threads": 1, "queue_size": 2}));
    let start = Instant::now();
    p.lookup("id", "101", "first");
    p.lookup("id", "102", "second");
    p.lookup("id", "103", "third");
    p.lookup("id", "101", "joins-first");
    assert_eq!(p.failure("third"), "queue full: 2 lookups waiting");
    assert_eq!(p.failure("joins-first"), "queue full: 2 lookups waiting");
    assert!(
        start.elapsed() < Duration::from_secs(1),
        "refused at once, not after a lookup"
    );
    assert!(p.records_of(5100).iter().all(|r| r["token"] != "first"));
    for token in ["first", "second"] {
        assert_eq!(p.result(token)["status"], "succeeded", "{token}");
    }
}
