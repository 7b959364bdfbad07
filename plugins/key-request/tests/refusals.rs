//! Everything the plugin refuses, each with a precise 5100: provider errors,
//! malformed replies, hanging and flooding programs, a silent socket, injection
//! attempts, malformed tasks and invalid configuration.
#![allow(clippy::expect_used, clippy::unwrap_used)]

mod support;

use std::os::unix::net::UnixListener;
use std::path::Path;
use std::time::{Duration, Instant};

use keel_tests::mariadb::{AgentRow, KeyDb};
use serde_json::json;
use support::{DEADLINE, Plugin, reply, script};

fn rows() -> Vec<AgentRow> {
    vec![AgentRow::new("001", "web-1", "10.1.2.3", "key-of-web-1-9f8e7d")]
}

#[test]
fn no_agent_key_found_is_reported_by_exec_and_socket() {
    let dir = tempfile::tempdir().unwrap();
    let db = KeyDb::create(&rows());
    let sock = dir.path().join("provider.sock");
    let _server = db.serve(&sock);
    for detail in [
        json!({"exec_path": db.exec_path(), "timeout": 20}),
        json!({"socket": sock, "timeout": 20}),
    ] {
        let mut p = Plugin::start(&detail);
        p.lookup("id", "999", "missing-id");
        p.lookup("ip", "10.9.9.9", "missing-ip");
        for token in ["missing-id", "missing-ip"] {
            assert_eq!(
                p.failure(token),
                "lookup failed: error 4: No agent key found",
                "{detail}"
            );
        }
        assert!(p.records_of(6000).is_empty());
    }
}

#[test]
fn malformed_replies_are_refused_precisely() {
    let dir = tempfile::tempdir().unwrap();
    let long_name = "n".repeat(129);
    // One program, a different malformation for each ID asked.
    let body = format!(
        r#"case "$2" in
101) printf 'not json' ;;
102) printf '%s' '{a}' ;;
103) printf '%s' '{b}' ;;
104) printf '%s' '{e}' ;;
105) printf '%s' '{{"error":0,"data":{{"id":"105","name":"n","ip":"any"}}}}' ;;
106) printf '%s' '{c} trailing junk' ;;
107) printf '%s' '{{"error":"0","data":{{}}}}' ;;
108) printf '%s' '{d}' ;;
esac"#,
        a = reply("1a2", "n", "any", "k"),
        b = reply("103", &long_name, "any", "k"),
        c = reply("106", "n", "any", "k"),
        d = reply("108", "n", "10.0.0.0/33", "k"),
        e = reply("104", "n", "any", "ab\u{1}cd"),
    );
    let provider = script(dir.path(), "malformed", &body);
    let mut p = Plugin::start(&json!({"exec_path": provider, "timeout": 10, "threads": 4}));
    let want = [
        (
            "101",
            "invalid provider reply: not one JSON value: expected ident at line 1 column 2",
        ),
        ("102", "invalid provider reply: `data.id` must be 3 to 8 ASCII digits"),
        ("103", "invalid provider reply: `data.name` is 129 bytes, more than 128"),
        (
            "104",
            "invalid provider reply: `data.key` has a control character at byte 2",
        ),
        ("105", "invalid provider reply: `data.key` is missing"),
        (
            "106",
            "invalid provider reply: not one JSON value: trailing characters at line 1 column",
        ),
        ("107", "invalid provider reply: `error` must be an integer"),
        (
            "108",
            "invalid provider reply: `data.ip` has an invalid prefix length: it must be 0 to 32",
        ),
    ];
    for (id, _) in want {
        p.lookup("id", id, id);
    }
    for (id, msg) in want {
        let got = p.failure(id);
        assert!(got.starts_with(msg), "for {id}: {got:?}, wanted {msg:?}");
    }
}

/// The processes of group `pgid` that are still alive (zombies waiting for init
/// to reap them do not count).
fn live_members(pgid: i32) -> Vec<String> {
    let mut live = Vec::new();
    for entry in std::fs::read_dir("/proc").unwrap().flatten() {
        let Ok(stat) = std::fs::read_to_string(entry.path().join("stat")) else {
            continue;
        };
        let Some((_, rest)) = stat.rsplit_once(") ") else {
            continue;
        };
        let f: Vec<&str> = rest.split_whitespace().collect();
        // state, ppid, pgrp
        if f.get(2).and_then(|g| g.parse::<i32>().ok()) == Some(pgid) && f[0] != "Z" {
            live.push(stat.clone());
        }
    }
    live
}

fn wait_for_file(path: &Path) -> String {
    let start = Instant::now();
    loop {
        if let Ok(text) = std::fs::read_to_string(path)
            && text.ends_with('\n')
        {
            return text;
        }
        assert!(start.elapsed() < DEADLINE, "{} never appeared", path.display());
        std::thread::sleep(Duration::from_millis(20));
    }
}

#[test]
fn a_hanging_program_is_killed_with_its_process_group() {
    let dir = tempfile::tempdir().unwrap();
    let pidfile = dir.path().join("pids");
    // The program and a child of its own, both hanging.
    let provider = script(
        dir.path(),
        "hang",
        &format!("sleep 300 &\necho \"$$ $!\" > {}\nsleep 300", pidfile.display()),
    );
    let mut p = Plugin::start(&json!({"exec_path": provider, "timeout": 1}));
    let start = Instant::now();
    p.lookup("id", "001", "hang");
    let msg = p.failure("hang");
    let took = start.elapsed();
    assert_eq!(msg, format!("exec {}: timed out after 1 s", provider.display()));
    assert!(
        took >= Duration::from_secs(1) && took < Duration::from_secs(5),
        "{took:?}"
    );
    let pids = wait_for_file(&pidfile);
    let pgid: i32 = pids.split_whitespace().next().unwrap().parse().unwrap();
    let start = Instant::now();
    loop {
        let live = live_members(pgid);
        if live.is_empty() {
            break;
        }
        assert!(start.elapsed() < DEADLINE, "process group {pgid} lives on: {live:?}");
        std::thread::sleep(Duration::from_millis(50));
    }
    assert!(p.is_running());
}

#[test]
fn stopping_answers_waiting_tasks_and_kills_running_programs() {
    let dir = tempfile::tempdir().unwrap();
    let pidfile = dir.path().join("pids");
    let provider = script(
        dir.path(),
        "hang",
        &format!("echo \"$$\" > {}\nsleep 300", pidfile.display()),
    );
    let mut p = Plugin::start(&json!({"exec_path": provider, "timeout": 600}));
    p.lookup("id", "001", "running");
    let pgid: i32 = wait_for_file(&pidfile).trim().parse().unwrap();
    let pid = nix::unistd::Pid::from_raw(i32::try_from(p.pid()).unwrap());
    nix::sys::signal::kill(pid, nix::sys::signal::Signal::SIGTERM).unwrap();
    assert_eq!(p.failure("running"), "key-request is stopping");
    assert!(p.wait_exit().success(), "SIGTERM is a clean stop");
    let start = Instant::now();
    while !live_members(pgid).is_empty() {
        assert!(start.elapsed() < DEADLINE, "the provider outlived the plugin");
        std::thread::sleep(Duration::from_millis(50));
    }
}

#[test]
fn ten_megabytes_of_output_are_refused() {
    let dir = tempfile::tempdir().unwrap();
    let provider = script(dir.path(), "flood", "yes 0123456789abcdef | head -c 10000000");
    let mut p = Plugin::start(&json!({"exec_path": provider, "timeout": 10}));
    p.lookup("id", "001", "flood");
    assert_eq!(
        p.failure("flood"),
        format!("exec {}: output larger than 65536 bytes", provider.display())
    );
}

#[test]
fn a_failing_program_is_reported_with_its_status() {
    let dir = tempfile::tempdir().unwrap();
    let provider = script(dir.path(), "fail", "echo 'secret stderr' >&2; exit 3");
    let mut p = Plugin::start(&json!({"exec_path": provider, "timeout": 10}));
    p.lookup("id", "001", "fail");
    assert_eq!(
        p.failure("fail"),
        format!("exec {}: provider exited with status 3", provider.display())
    );
    assert!(
        !p.all_output().contains("secret stderr"),
        "the program's stderr is discarded"
    );
}

#[test]
fn a_socket_that_never_answers_times_out() {
    let dir = tempfile::tempdir().unwrap();
    let sock = dir.path().join("silent.sock");
    let listener = UnixListener::bind(&sock).unwrap();
    std::thread::spawn(move || {
        let mut held = Vec::new();
        for conn in listener.incoming() {
            held.push(conn);
        }
    });
    let mut p = Plugin::start(&json!({"socket": sock, "timeout": 1}));
    let start = Instant::now();
    p.lookup("ip", "10.1.2.3", "silent");
    assert_eq!(
        p.failure("silent"),
        format!("socket {}: timed out after 1 s", sock.display())
    );
    assert!(start.elapsed() < Duration::from_secs(5));
}

#[test]
fn injection_is_refused_before_any_program_runs() {
    let dir = tempfile::tempdir().unwrap();
    let marker = dir.path().join("ran");
    let provider = script(
        dir.path(),
        "marker",
        &format!(
            "touch {}\nprintf '%s' '{}'",
            marker.display(),
            reply("001", "web-1", "any", "k")
        ),
    );
    let mut p = Plugin::start(&json!({"exec_path": provider, "timeout": 10}));
    p.lookup("id", "001' OR '1'='1", "sql-id");
    p.lookup("ip", "1.2.3.4' OR '1'='1", "sql-ip");
    p.lookup("id", "001;touch /tmp/x", "shell");
    p.lookup("id", "-1", "option");
    assert_eq!(
        p.failure("sql-id"),
        r#"invalid id "001' OR '1'='1": must be 1 to 8 ASCII digits"#
    );
    assert_eq!(
        p.failure("sql-ip"),
        r#"invalid ip "1.2.3.4' OR '1'='1": must be an IPv4 or IPv6 address of at most 19 characters"#
    );
    assert!(p.failure("shell").starts_with("invalid id"));
    assert!(p.failure("option").starts_with("invalid id"));
    assert!(!marker.exists(), "no program ran for a refused value");
    // The same program runs for a valid lookup, and leaves its mark.
    p.lookup("id", "001", "valid");
    assert_eq!(p.result("valid")["status"], "succeeded");
    assert!(marker.exists());
}

#[test]
fn malformed_tasks_get_precise_answers() {
    let dir = tempfile::tempdir().unwrap();
    let provider = script(
        dir.path(),
        "ok",
        &format!("printf '%s' '{}'", reply("001", "n", "any", "k")),
    );
    let mut p = Plugin::start(&json!({"exec_path": provider}));
    p.task(6050, "{}", "unknown-type");
    p.task(6000, "{not json", "bad-json");
    p.task(6000, r#"{"by":"id"}"#, "missing");
    p.task(6000, r#"{"by":"name","value":"x"}"#, "bad-by");
    p.task(
        6001,
        r#"{"by":"id","value":"001","nonce":"00","csr_sha256":"00","hmac":"00"}"#,
        "short-nonce",
    );
    assert_eq!(
        p.failure("unknown-type"),
        "unknown task data_type 6050: key-request takes 6000 (lookup) and 6001 (key-proof check)"
    );
    assert!(
        p.failure("bad-json")
            .starts_with("invalid task data: key must be a string")
    );
    assert!(
        p.failure("missing")
            .starts_with("invalid task data: missing field `value`")
    );
    assert!(
        p.failure("bad-by")
            .starts_with("invalid task data: by: unknown variant `name`, expected `id` or `ip`")
    );
    assert_eq!(p.failure("short-nonce"), "invalid nonce: 2 hex digits, must be 64");
    // A line that is not a task at all is skipped, and the plugin goes on.
    p.send_lines(&["this is not a task".to_owned()]);
    p.lookup("id", "001", "after");
    assert_eq!(p.result("after")["status"], "succeeded");
}

#[test]
fn invalid_configuration_is_reported_and_every_lookup_refused() {
    let long = format!("/{}", "p".repeat(4096));
    let cases = [
        (
            json!({"exec_path": " /bin/provider"}).to_string(),
            "exec_path: starts with a space",
        ),
        (
            json!({"exec_path": long}).to_string(),
            "exec_path: 4097 bytes, must be shorter than 4096",
        ),
        (
            json!({"socket": " /run/kr.sock"}).to_string(),
            "socket: starts with a space",
        ),
        (
            json!({"socket": long}).to_string(),
            "socket: 4097 bytes, must be shorter than 4096",
        ),
        (
            json!({"exec_path": "/p", "timeout": 0}).to_string(),
            "timeout: 0 s is out of range",
        ),
        (
            json!({"exec_path": "/p", "timeout": "60"}).to_string(),
            "timeout: invalid type: string",
        ),
        (
            json!({"exec_path": "/p", "threads": 0}).to_string(),
            "threads: 0 is out of range",
        ),
        (
            json!({"exec_path": "/p", "threads": 33}).to_string(),
            "threads: 33 is out of range",
        ),
        (
            json!({"exec_path": "/p", "queue_size": 0}).to_string(),
            "queue_size: 0 is out of range",
        ),
        (
            json!({"exec_path": "/p", "queue_size": 220_001}).to_string(),
            "queue_size: 220001 is out of range",
        ),
        (
            json!({"exec_path": "/p", "queue": 5}).to_string(),
            "unknown field `queue`",
        ),
        (json!({}).to_string(), "exec_path and socket are both empty"),
        ("{not json".to_owned(), "DETAIL: key must be a string"),
    ];
    for (detail, problem) in cases {
        let mut p = Plugin::start_raw(&detail);
        let log = p.log("the configuration error log", |f| f["level"] == "error");
        assert!(log["error"].as_str().unwrap().contains(problem), "{problem}: {log}");
        let report = p.result("");
        assert_eq!(report["status"], "failed");
        let msg = report["msg"].as_str().unwrap().to_owned();
        assert!(
            msg.starts_with("configuration invalid: ") && msg.contains(problem),
            "{msg}"
        );
        p.lookup("id", "001", "refused");
        assert_eq!(p.failure("refused"), msg);
        assert!(p.is_running(), "an invalid configuration does not stop the plugin");
    }
}
