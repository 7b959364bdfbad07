//! Drives the real `key-request` binary in the SDK's debug mode: tasks go in as
//! JSON lines on stdin, records come back as JSON lines on stdout; everything it
//! writes is kept, so a test can also search it all. Waits are on conditions with
//! a deadline, never fixed sleeps.
// Each test binary uses a different part of this module.
#![allow(dead_code)]

use std::io::{BufRead, BufReader, Read, Write};
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::process::{Child, ChildStdin, Command, ExitStatus, Stdio};
use std::sync::{Arc, Condvar, Mutex};
use std::time::{Duration, Instant};

use serde_json::{Value, json};

/// How long a wait lasts before the test fails.
pub const DEADLINE: Duration = Duration::from_secs(30);

/// What the plugin wrote so far.
#[derive(Debug, Default)]
pub struct Seen {
    /// stdout, parsed line by line.
    pub records: Vec<Value>,
    /// stdout as text.
    pub stdout: String,
    /// stderr as text.
    pub stderr: String,
}

type Shared = Arc<(Mutex<Seen>, Condvar)>;

/// A running plugin in debug mode; killed on drop.
#[derive(Debug)]
pub struct Plugin {
    child: Child,
    stdin: Option<ChildStdin>,
    seen: Shared,
}

impl Plugin {
    /// Starts the plugin with `detail` (JSON) as `DETAIL`.
    pub fn start(detail: &Value) -> Plugin {
        Plugin::start_raw(&detail.to_string())
    }

    /// Starts the plugin with `detail` as it is.
    pub fn start_raw(detail: &str) -> Plugin {
        let mut child = Command::new(env!("CARGO_BIN_EXE_key-request"))
            .env("KEEL_PLUGIN_DEBUG", "1")
            .env("DETAIL", detail)
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .expect("start key-request");
        let seen: Shared = Arc::default();
        let stdout = child.stdout.take().expect("stdout");
        let shared = Arc::clone(&seen);
        std::thread::spawn(move || {
            for line in BufReader::new(stdout).lines() {
                let Ok(line) = line else { break };
                let (lock, changed) = &*shared;
                let mut s = lock.lock().unwrap();
                s.stdout.push_str(&line);
                s.stdout.push('\n');
                let record: Value =
                    serde_json::from_str(&line).unwrap_or_else(|e| panic!("stdout line {line:?} is not JSON: {e}"));
                s.records.push(record);
                changed.notify_all();
            }
        });
        let mut stderr = child.stderr.take().expect("stderr");
        let shared = Arc::clone(&seen);
        std::thread::spawn(move || {
            let mut buf = [0u8; 4096];
            while let Ok(n) = stderr.read(&mut buf) {
                if n == 0 {
                    break;
                }
                let (lock, changed) = &*shared;
                lock.lock()
                    .unwrap()
                    .stderr
                    .push_str(&String::from_utf8_lossy(&buf[..n]));
                changed.notify_all();
            }
        });
        let stdin = child.stdin.take();
        Plugin { child, stdin, seen }
    }

    /// Sends a task.
    pub fn task(&mut self, data_type: i32, data: &str, token: &str) {
        let line = json!({"data_type": data_type, "object_name": "key-request", "data": data, "token": token});
        self.send_lines(&[line.to_string()]);
    }

    /// Sends a 6000 lookup.
    pub fn lookup(&mut self, by: &str, value: &str, token: &str) {
        self.task(6000, &json!({"by": by, "value": value}).to_string(), token);
    }

    /// Writes `lines` to stdin in one write.
    pub fn send_lines(&mut self, lines: &[String]) {
        let mut text = lines.join("\n");
        text.push('\n');
        let stdin = self.stdin.as_mut().expect("stdin is open");
        stdin.write_all(text.as_bytes()).expect("write a task");
        stdin.flush().expect("flush the tasks");
    }

    /// Closes stdin: the plugin answers what is waiting and exits.
    pub fn close_stdin(&mut self) {
        self.stdin = None;
    }

    /// Waits until `check` finds something in what the plugin wrote.
    pub fn wait_for<T>(&self, what: &str, mut check: impl FnMut(&Seen) -> Option<T>) -> T {
        let (lock, changed) = &*self.seen;
        let start = Instant::now();
        let mut s = lock.lock().unwrap();
        loop {
            if let Some(v) = check(&s) {
                return v;
            }
            let left = DEADLINE.saturating_sub(start.elapsed());
            assert!(
                !left.is_zero(),
                "timed out after {DEADLINE:?} waiting for {what}; stdout:\n{}\nstderr:\n{}",
                s.stdout,
                s.stderr
            );
            s = changed.wait_timeout(s, left).unwrap().0;
        }
    }

    /// The fields of the first record of `data_type` for `token`, once there is one.
    pub fn record(&self, data_type: i64, token: &str) -> Value {
        self.wait_for(&format!("a {data_type} record for {token:?}"), |s| {
            s.records
                .iter()
                .find(|r| r["data_type"] == data_type && r["fields"]["token"] == token)
                .map(|r| r["fields"].clone())
        })
    }

    /// The fields of the 5100 result for `token`.
    pub fn result(&self, token: &str) -> Value {
        self.record(5100, token)
    }

    /// The `msg` of the 5100 result for `token`, which must have failed.
    pub fn failure(&self, token: &str) -> String {
        let r = self.result(token);
        assert_eq!(r["status"], "failed", "the result for {token}: {r}");
        r["msg"].as_str().unwrap_or_default().to_owned()
    }

    /// Every record of `data_type` so far.
    pub fn records_of(&self, data_type: i64) -> Vec<Value> {
        let s = self.seen.0.lock().unwrap();
        s.records
            .iter()
            .filter(|r| r["data_type"] == data_type)
            .map(|r| r["fields"].clone())
            .collect()
    }

    /// The fields of the first 1011 log record for which `check` holds.
    pub fn log(&self, what: &str, check: impl Fn(&Value) -> bool) -> Value {
        self.wait_for(what, |s| {
            s.records
                .iter()
                .find(|r| r["data_type"] == 1011 && check(&r["fields"]))
                .map(|r| r["fields"].clone())
        })
    }

    /// Everything written to stdout and stderr so far.
    pub fn all_output(&self) -> String {
        let s = self.seen.0.lock().unwrap();
        format!("{}{}", s.stdout, s.stderr)
    }

    /// The process ID.
    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// Whether the process is still running.
    pub fn is_running(&mut self) -> bool {
        self.child.try_wait().expect("try_wait").is_none()
    }

    /// Waits for the process to exit.
    pub fn wait_exit(&mut self) -> ExitStatus {
        let start = Instant::now();
        loop {
            if let Some(status) = self.child.try_wait().expect("try_wait") {
                return status;
            }
            assert!(start.elapsed() < DEADLINE, "key-request did not exit");
            std::thread::sleep(Duration::from_millis(20));
        }
    }
}

impl Drop for Plugin {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Writes an executable `/bin/sh` script into `dir`.
pub fn script(dir: &Path, name: &str, body: &str) -> PathBuf {
    let path = dir.join(name);
    std::fs::write(&path, format!("#!/bin/sh\n{body}\n")).expect("write a script");
    std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o755)).expect("chmod a script");
    path
}

/// A provider reply for an agent.
pub fn reply(id: &str, name: &str, ip: &str, key: &str) -> String {
    json!({"error": 0, "data": {"id": id, "name": name, "ip": ip, "key": key}}).to_string()
}

/// The data of a 6001 task with a proof made with `key`.
pub fn proof_task(by: &str, value: &str, key: &str) -> String {
    let nonce = [0x5au8; keel_proto::keyproof::NONCE_BYTES];
    let csr = [0xc5u8; 32];
    json!({
        "by": by,
        "value": value,
        "nonce": hex::encode(nonce),
        "csr_sha256": hex::encode(csr),
        "hmac": keel_proto::keyproof::prove(key, &nonce, &csr),
    })
    .to_string()
}
