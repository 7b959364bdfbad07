//! Lookups and key proofs through the real plugin, against real MariaDB through the
//! shipped provider, by exec and by socket.
#![allow(clippy::expect_used, clippy::unwrap_used)]

mod support;

use std::io::Write;
use std::process::{Command, Stdio};

use keel_tests::mariadb::{AgentRow, KeyDb};
use serde_json::{Value, json};
use support::{Plugin, proof_task};

fn rows() -> Vec<AgentRow> {
    vec![
        AgentRow::new("001", "web-1", "10.1.2.3", "key-of-web-1-9f8e7d"),
        AgentRow::new("002", "db-1", "10.1.2.4", "key-of-db-1-6c5b4a"),
        AgentRow::new("003", "any-host", "any", "key-of-any-host-3a2b"),
    ]
}

/// The 6000 record for `token` has exactly the agent's ID, name and IP.
fn assert_found(p: &Plugin, token: &str, row: &AgentRow) {
    let record = p.record(6000, token);
    assert_eq!(
        record,
        json!({"token": token, "id": row.id, "name": row.name, "ip": row.ip}),
        "nothing derived from the key is in the record"
    );
    let result = p.result(token);
    assert_eq!(result["status"], "succeeded", "{result}");
}

fn lookups_by_id_and_ip(mut p: Plugin) {
    let rows = rows();
    p.lookup("id", "001", "by-id");
    p.lookup("ip", "10.1.2.4", "by-ip");
    p.lookup("id", "003", "any-ip");
    assert_found(&p, "by-id", &rows[0]);
    assert_found(&p, "by-ip", &rows[1]);
    assert_found(&p, "any-ip", &rows[2]);
}

#[test]
fn exec_lookup_by_id_and_ip() {
    let db = KeyDb::create(&rows());
    lookups_by_id_and_ip(Plugin::start(&json!({"exec_path": db.exec_path(), "timeout": 20})));
}

#[test]
fn socket_lookup_by_id_and_ip() {
    let dir = tempfile::tempdir().unwrap();
    let db = KeyDb::create(&rows());
    let sock = dir.path().join("provider.sock");
    let _server = db.serve(&sock);
    lookups_by_id_and_ip(Plugin::start(&json!({"socket": sock, "timeout": 20, "threads": 4})));
}

#[test]
fn key_proofs_verify_only_with_the_right_key() {
    let dir = tempfile::tempdir().unwrap();
    let db = KeyDb::create(&rows());
    let sock = dir.path().join("provider.sock");
    let _server = db.serve(&sock);
    let mut p = Plugin::start(&json!({"socket": sock, "exec_path": db.exec_path(), "timeout": 20}));
    p.task(6001, &proof_task("id", "001", "key-of-web-1-9f8e7d"), "right");
    p.task(6001, &proof_task("ip", "10.1.2.4", "key-of-db-1-6c5b4a"), "right-by-ip");
    p.task(6001, &proof_task("id", "001", "key-of-web-1-9f8e7e"), "wrong");
    p.task(6001, &proof_task("id", "002", "key-of-web-1-9f8e7d"), "another-agents");
    let expect = [
        ("right", "001", "web-1", "10.1.2.3", "true"),
        ("right-by-ip", "002", "db-1", "10.1.2.4", "true"),
        ("wrong", "001", "web-1", "10.1.2.3", "false"),
        ("another-agents", "002", "db-1", "10.1.2.4", "false"),
    ];
    for (token, id, name, ip, verified) in expect {
        let record = p.record(6001, token);
        assert_eq!(
            record,
            json!({"token": token, "id": id, "name": name, "ip": ip, "verified": verified})
        );
        assert_eq!(p.result(token)["status"], "succeeded");
    }
}

#[test]
fn socket_unavailable_at_start_up_falls_back_to_exec() {
    let dir = tempfile::tempdir().unwrap();
    let db = KeyDb::create(&rows());
    let missing = dir.path().join("not-there.sock");
    let mut p = Plugin::start(&json!({"socket": missing, "exec_path": db.exec_path(), "timeout": 20}));
    let warning = p.log("the fallback warning", |f| f["level"] == "warn");
    assert!(
        warning["msg"].as_str().unwrap().contains("using exec_path"),
        "{warning}"
    );
    p.lookup("id", "002", "via-exec");
    assert_found(&p, "via-exec", &rows()[1]);
}

#[test]
fn debug_mode_answers_a_task_from_stdin_on_stdout() {
    let db = KeyDb::create(&rows());
    let mut child = Command::new(env!("CARGO_BIN_EXE_key-request"))
        .env("KEEL_PLUGIN_DEBUG", "1")
        .env("DETAIL", json!({"exec_path": db.exec_path()}).to_string())
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let line = json!({"data_type": 6000, "data": r#"{"by":"id","value":"001"}"#, "token": "t1"});
    child
        .stdin
        .take()
        .unwrap()
        .write_all(format!("{line}\n").as_bytes())
        .unwrap();
    // stdin is closed now: the plugin answers what it has, then exits.
    let out = child.wait_with_output().unwrap();
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let records: Vec<Value> = String::from_utf8(out.stdout)
        .unwrap()
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    let found = records
        .iter()
        .find(|r| r["data_type"] == 6000)
        .expect("a 6000 record on stdout");
    assert_eq!(found["fields"]["name"], "web-1");
    assert!(found["timestamp"].as_i64().unwrap() > 0);
    assert!(
        records
            .iter()
            .any(|r| r["data_type"] == 5100 && r["fields"]["token"] == "t1" && r["fields"]["status"] == "succeeded")
    );
}
