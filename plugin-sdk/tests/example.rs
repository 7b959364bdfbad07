//! The `echo` example, built by `cargo test`, run as a plugin author first runs
//! it: in debug mode, tasks in and records out as JSON lines.
#![allow(clippy::expect_used, clippy::unwrap_used)]

use std::io::Write;
use std::process::{Command, Stdio};

use serde_json::Value;

#[test]
fn the_echo_example_answers_its_tasks_and_exits_cleanly_when_stopped() {
    // target/<profile>/deps/example-… → target/<profile>/examples/echo
    let exe = std::env::current_exe().unwrap();
    let echo = exe.parent().unwrap().parent().unwrap().join("examples/echo");
    assert!(echo.exists(), "{} is built by cargo test", echo.display());
    let mut child = Command::new(&echo)
        .env("KEEL_PLUGIN_DEBUG", "1")
        .env("DETAIL", "from the test")
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let mut stdin = child.stdin.take().unwrap();
    writeln!(
        stdin,
        r#"{{"data_type":20001,"object_name":"echo","data":"hi","token":"t1"}}"#
    )
    .unwrap();
    // The closed task pipe is how the agent stops a plugin.
    drop(stdin);
    let out = child.wait_with_output().unwrap();
    assert!(
        out.status.success(),
        "{:?}: {}",
        out.status,
        String::from_utf8_lossy(&out.stderr)
    );
    let lines: Vec<Value> = String::from_utf8(out.stdout)
        .unwrap()
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    let of = |t: i64| lines.iter().filter(move |l| l["data_type"] == t);
    let hello = of(20_000).next().expect("hello");
    assert_eq!(hello["fields"]["detail"], "from the test");
    assert_eq!(of(20_001).next().expect("the echo")["fields"]["data"], "hi");
    let result = of(5100).next().expect("the task result");
    assert_eq!(result["fields"]["token"], "t1");
    assert_eq!(result["fields"]["status"], "succeeded");
    assert!(
        of(1011).any(|l| l["fields"]["msg"] == "echo plugin started"),
        "its log line went to the agent: {lines:?}"
    );
    // Records are numbered from 1 without gaps.
    let seqs: Vec<u64> = lines.iter().map(|l| l["seq"].as_u64().unwrap()).collect();
    assert_eq!(seqs, (1..=seqs.len() as u64).collect::<Vec<_>>());
}
