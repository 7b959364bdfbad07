//! `keel-keyprovider-mysql` against real MariaDB: exec-mode replies, the socket
//! server's limits and shutdown, passwords that never show, and lookups through
//! the plugin by both modes.
#![allow(clippy::expect_used, clippy::unwrap_used)]

mod support;

use std::io::{Read, Write};
use std::net::TcpListener;
use std::os::unix::fs::{FileTypeExt, PermissionsExt};
use std::os::unix::net::UnixStream;
use std::path::Path;
use std::process::{Command, Output};
use std::time::{Duration, Instant};

use keel_tests::mariadb::{AgentRow, KeyDb, Provider, mariadb};
use serde_json::{Value, json};
use support::{DEADLINE, Plugin};

const PROVIDER: &str = env!("CARGO_BIN_EXE_keel-keyprovider-mysql");

fn rows() -> Vec<AgentRow> {
    vec![
        AgentRow::new("001", "web-1", "10.1.2.3", "key-of-web-1-9f8e7d"),
        AgentRow::new("002", "db-1", "fd00::2", "key-of-db-1-6c5b4a"),
        // Two agents behind one address: a lookup by it is ambiguous.
        AgentRow::new("003", "nat-a", "10.7.7.7", "key-of-nat-a-1111"),
        AgentRow::new("004", "nat-b", "10.7.7.7", "key-of-nat-b-2222"),
    ]
}

/// Runs the provider in exec mode with `args` after the database options.
fn exec(db: &KeyDb, args: &[&str]) -> Output {
    Command::new(PROVIDER)
        .args(db.provider_args())
        .args(args)
        .env_remove("KEEL_KR_DB_PASSWORD")
        .output()
        .unwrap()
}

/// The one JSON reply of a successful exec-mode run.
fn exec_reply(db: &KeyDb, args: &[&str]) -> Value {
    let out = exec(db, args);
    assert!(
        out.status.success(),
        "{args:?}: {}: {}",
        out.status,
        String::from_utf8_lossy(&out.stderr)
    );
    serde_json::from_slice(&out.stdout).unwrap_or_else(|e| panic!("{args:?}: not one JSON reply: {e}"))
}

/// Sends `request` on a new connection, as Wazuh does (no newline, no shutdown;
/// an empty request is a shutdown), and reads the reply to the end.
fn ask(sock: &Path, request: &[u8]) -> Value {
    let mut s = UnixStream::connect(sock).unwrap();
    s.set_read_timeout(Some(DEADLINE)).unwrap();
    if request.is_empty() {
        s.shutdown(std::net::Shutdown::Write).unwrap();
    }
    s.write_all(request).unwrap();
    let mut reply = Vec::new();
    s.read_to_end(&mut reply).unwrap();
    serde_json::from_slice(&reply).unwrap_or_else(|e| {
        panic!(
            "{:?}: not one JSON reply ({e}): {:?}",
            request,
            String::from_utf8_lossy(&reply)
        )
    })
}

#[test]
fn exec_mode_answers_as_wazuh_key_request_does() {
    let db = KeyDb::create(&rows());
    assert_eq!(
        exec_reply(&db, &["id", "001"]),
        json!({"error": 0, "data": {"id": "001", "name": "web-1", "ip": "10.1.2.3", "key": "key-of-web-1-9f8e7d"}})
    );
    assert_eq!(exec_reply(&db, &["ip", "fd00::2"])["data"]["name"], "db-1");
    assert_eq!(
        exec_reply(&db, &["id", "999"]),
        json!({"error": 4, "message": "No agent key found"})
    );
    let ambiguous = exec_reply(&db, &["ip", "10.7.7.7"]);
    assert_eq!(ambiguous["error"], 5, "{ambiguous}");
    assert!(ambiguous.get("data").is_none(), "no key of either agent: {ambiguous}");
}

#[test]
fn malformed_values_are_refused_before_the_database_is_reached() {
    // Nothing listens on this port: a reply other than error 1 would mean the
    // provider tried to connect.
    let closed = TcpListener::bind("127.0.0.1:0").unwrap();
    let port = closed.local_addr().unwrap().port().to_string();
    drop(closed);
    for (by, value, expect) in [
        ("id", "001' OR '1'='1", "invalid id \"001' OR '1'='1\""),
        ("id", "123456789", "invalid id \"123456789\""),
        (
            "ip",
            "10.1.2.3; DROP TABLE agent",
            "invalid ip \"10.1.2.3; DROP TABLE agent\"",
        ),
        ("ip", "", "invalid ip \"\""),
    ] {
        let out = Command::new(PROVIDER)
            .args(["--host", "127.0.0.1", "--port", &port, by, value])
            .output()
            .unwrap();
        assert!(out.status.success(), "{value:?}: {}", out.status);
        let reply: Value = serde_json::from_slice(&out.stdout).unwrap();
        assert_eq!(reply["error"], 1, "{value:?}: {reply}");
        let message = reply["message"].as_str().unwrap();
        assert!(message.contains(expect), "{value:?}: {message}");
    }
    // A well-formed value does try the database, and says which one failed.
    let out = Command::new(PROVIDER)
        .args(["--host", "127.0.0.1", "--port", &port, "id", "001"])
        .output()
        .unwrap();
    let reply: Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(reply["error"], 2, "{reply}");
    assert!(
        reply["message"].as_str().unwrap().starts_with("Database error"),
        "{reply}"
    );
}

#[test]
fn usage_errors_name_the_problem_and_exit_2() {
    for (args, expect) in [
        (
            &["--table", "agent`; DROP TABLE agent", "id", "1"][..],
            "--table must be a plain identifier",
        ),
        (
            &["--threads", "0", "--serve", "/tmp/x.sock"],
            "--threads must be a number from 1 to 256",
        ),
        (&["name", "web-1"], "invalid value 'name'"),
        (&[], "give `id VALUE`, `ip VALUE` or --serve SOCKET"),
    ] {
        let out = Command::new(PROVIDER).args(args).output().unwrap();
        assert_eq!(out.status.code(), Some(2), "{args:?}");
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert!(stderr.contains(expect), "{args:?}: {stderr}");
        assert!(out.stdout.is_empty(), "{args:?}: a usage error is not a reply");
    }
}

#[test]
fn the_password_is_read_from_a_file_and_never_shown() {
    let dir = tempfile::tempdir().unwrap();
    let db = KeyDb::create(&rows());
    let password = "pw-Zq8-never-shown";
    let user = db.create_user(password);
    let file = dir.path().join("db-password");
    std::fs::write(&file, format!("{password}\n")).unwrap();
    let with = |password_file: &Path| {
        let mut args = db.provider_args();
        let at = args.iter().position(|a| a == "root").unwrap();
        args[at] = user.name().to_owned();
        Command::new(PROVIDER)
            .args(args)
            .arg("--password-file")
            .arg(password_file)
            .args(["id", "001"])
            .env("KEEL_LOG", "debug")
            .output()
            .unwrap()
    };
    let out = with(&file);
    let reply: Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(reply["data"]["name"], "web-1", "{reply}");

    // A wrong password is a database error naming the user, not the password.
    let wrong = dir.path().join("wrong-password");
    std::fs::write(&wrong, format!("{password}-but-wrong")).unwrap();
    let out = with(&wrong);
    let reply: Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(reply["error"], 2, "{reply}");
    let message = reply["message"].as_str().unwrap();
    assert!(
        message.contains("Access denied") && message.contains(user.name()),
        "{message}"
    );
    for shown in [&out.stdout, &out.stderr] {
        assert!(
            !String::from_utf8_lossy(shown).contains(password),
            "the password was shown"
        );
    }

    // A missing file is named; nothing from the file or the environment shows.
    let out = with(&dir.path().join("absent"));
    let reply: Value = serde_json::from_slice(&out.stdout).unwrap();
    let message = reply["message"].as_str().unwrap();
    assert!(
        message.contains("cannot read the password file") && message.contains("absent"),
        "{message}"
    );
}

#[test]
fn the_socket_server_answers_refuses_and_is_not_held_by_silent_clients() {
    let dir = tempfile::tempdir().unwrap();
    let db = KeyDb::create(&rows());
    let sock = dir.path().join("provider.sock");
    // One worker: a silent client holding it would stall every other lookup.
    let server = db.serve_using(Provider::Rust, &sock, 1);
    let meta = std::fs::symlink_metadata(&sock).unwrap();
    assert!(meta.file_type().is_socket());
    assert_eq!(
        meta.permissions().mode() & 0o777,
        0o600,
        "whoever connects can read every key"
    );

    let silent: Vec<UnixStream> = (0..16).map(|_| UnixStream::connect(&sock).unwrap()).collect();
    let start = Instant::now();
    for _ in 0..20 {
        assert_eq!(ask(&sock, b"id:001")["data"]["key"], "key-of-web-1-9f8e7d");
    }
    assert!(
        start.elapsed() < Duration::from_secs(5),
        "lookups waited for silent clients: {:?}",
        start.elapsed()
    );
    assert_eq!(ask(&sock, b" ip:fd00::2\n")["data"]["id"], "002");
    assert_eq!(ask(&sock, b"id:999")["error"], 4);

    for (request, expect) in [
        (&b"name:web-1"[..], "unknown lookup \"name\""),
        (b"id:001' OR '1'='1", "invalid id \"001' OR '1'='1\""),
        (b"001", "is not `id:VALUE` or `ip:VALUE`"),
        (b"", "empty request"),
        (b"id:\xff\xfe", "is not UTF-8 text"),
    ] {
        let reply = ask(&sock, request);
        assert_eq!(reply["error"], 1, "{reply}");
        assert!(reply["message"].as_str().unwrap().contains(expect), "{reply}");
    }
    // Too long: refused at once; the excess (up to 64 KiB) is drained, so the
    // connection ends cleanly with the reply rather than a reset.
    let reply = ask(&sock, &[b'1'; 50_000]);
    assert_eq!(reply, json!({"error": 1, "message": "request longer than 64 bytes"}));
    drop(silent);
    drop(server);
}

#[test]
fn the_socket_server_reconnects_when_the_database_drops_its_connections() {
    let dir = tempfile::tempdir().unwrap();
    let db = KeyDb::create(&rows());
    let sock = dir.path().join("provider.sock");
    let _server = db.serve_using(Provider::Rust, &sock, 2);
    assert_eq!(ask(&sock, b"id:001")["data"]["id"], "001");
    // What a restarted server, wait_timeout or a proxy does to idle connections.
    let query = format!(
        "SELECT id FROM information_schema.processlist WHERE db = '{}'",
        db.name()
    );
    let start = Instant::now();
    let ids = loop {
        let ids: Vec<String> = mariadb(&query).split_whitespace().map(str::to_owned).collect();
        if ids.len() == 2 {
            break ids;
        }
        assert!(start.elapsed() < DEADLINE, "one connection per worker: {ids:?}");
        std::thread::sleep(Duration::from_millis(20));
    };
    for id in ids {
        mariadb(&format!("KILL CONNECTION {id}"));
    }
    // Every worker's next lookup finds its connection dead, and answers from a new one.
    for _ in 0..6 {
        assert_eq!(ask(&sock, b"id:001")["data"]["name"], "web-1");
    }
}

#[test]
fn sigterm_stops_the_server_and_removes_its_socket() {
    let dir = tempfile::tempdir().unwrap();
    let db = KeyDb::create(&rows());
    let sock = dir.path().join("provider.sock");
    // A stale socket from a crashed run is replaced.
    let stale = std::os::unix::net::UnixListener::bind(&sock).unwrap();
    drop(stale);
    let mut server = db.serve_using(Provider::Rust, &sock, 2);
    assert_eq!(ask(&sock, b"id:001")["data"]["id"], "001");
    let status = server.terminate();
    assert!(status.success(), "{status}");
    assert!(!sock.exists(), "the socket file is left behind");
    drop(server);

    // Something that is not a socket is never removed.
    std::fs::write(&sock, "precious").unwrap();
    let out = Command::new(PROVIDER)
        .args(db.provider_args())
        .arg("--serve")
        .arg(&sock)
        .output()
        .unwrap();
    assert!(!out.status.success());
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        stderr.contains("exists and is not a socket; not removing it"),
        "{stderr}"
    );
    assert_eq!(std::fs::read_to_string(&sock).unwrap(), "precious");
}

#[test]
fn lookups_and_proofs_through_the_plugin_by_exec_and_socket() {
    let dir = tempfile::tempdir().unwrap();
    let db = KeyDb::create(&rows());
    let sock = dir.path().join("provider.sock");
    let _server = db.serve_using(Provider::Rust, &sock, 4);
    for detail in [
        json!({"exec_path": db.exec_path_for(Provider::Rust), "timeout": 20, "threads": 4}),
        json!({"socket": sock, "timeout": 20, "threads": 4}),
    ] {
        let mut p = Plugin::start(&detail);
        p.lookup("id", "001", "by-id");
        p.lookup("ip", "fd00::2", "by-ip");
        p.lookup("ip", "10.7.7.7", "ambiguous");
        p.task(6001, &support::proof_task("id", "001", "key-of-web-1-9f8e7d"), "proof");
        assert_eq!(
            p.record(6000, "by-id"),
            json!({"token": "by-id", "id": "001", "name": "web-1", "ip": "10.1.2.3"}),
            "{detail}"
        );
        assert_eq!(p.record(6000, "by-ip")["name"], "db-1", "{detail}");
        assert_eq!(p.record(6001, "proof")["verified"], "true", "{detail}");
        let failure = p.failure("ambiguous");
        assert!(failure.starts_with("lookup failed: error 5"), "{detail}: {failure}");
        assert!(!p.all_output().contains("key-of-"), "{detail}: a key left the plugin");
    }
}
