//! A plugin for the end-to-end tests and the benchmarks, built with the SDK. Its
//! behaviour comes from `DETAIL` (JSON): `{"mode": …}`.
//!
//! - `echo` (default): answers each task with a 6901 record and a 5100 result; a
//!   task whose data is `sleep:<ms>` is answered after that many milliseconds.
//! - `emit`: sends `count` records of data_type `data_type` with ~`payload_bytes`
//!   each as fast as it can (or `per_second`), once (a `emitted` file in its
//!   directory remembers), then behaves like `echo`; `delay_ms` waits first.
//! - `stream`: sends data_type 6100 records numbered by their `i` field, `per_second`
//!   (default 1000), buffered with a flush every `flush_ms` (default 100), and
//!   answers tasks like `echo`. Each record's `run` field is `<run>-<pid>`.
//!   Stopped, it stops sending and sends a 6199 record whose `sent` field says how
//!   many 6100 records it sent. With `"deaf": true` it never reads its tasks, so
//!   only SIGTERM stops it (the SDK's stop handling). With `sent_dir` it also
//!   writes the count to `<sent_dir>/<pid>` when it ends, however it ends (its
//!   pipe broken by a killed agent, too).
//! - `raw`: writes the bytes of `hex` to fd 4 verbatim (hand-built frames), then idles
//!   (or exits, with `"exit": true`).
//! - `high`: Elkeid's high-priority pipe. Writes the first half of a 6950 record
//!   frame to fd 4 and a whole 6951 record to fd 5 (exits with status 2 unless
//!   `ELKEID_PLUGIN_HIGH_PRIORITY_PIPE` is set), waits for a task on fd 3, then
//!   writes the rest of the 6950 frame, and idles.
//! - `crash`: sends one record and exits with status 3.
//! - `deaf`: never reads its tasks.
//! - `memhog`: allocates and touches memory until something stops it.
#![forbid(unsafe_code)]

use std::io::Write;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use keel_plugin_sdk::{Client, ClientOptions, Error, Payload, Record};
use serde_json::Value;

fn main() {
    let detail: Value = keel_plugin_sdk::detail()
        .and_then(|d| serde_json::from_str(&d).ok())
        .unwrap_or(Value::Null);
    let mode = detail["mode"].as_str().unwrap_or("echo");
    let result = match mode {
        "raw" => raw(&detail),
        "high" => high(),
        "crash" => crash(),
        "deaf" => idle(),
        "memhog" => memhog(),
        "emit" => emit(&detail).and_then(|c| echo(&c)),
        "stream" => stream(&detail),
        _ => Client::new().and_then(|c| echo(&c)),
    };
    if let Err(e) = result {
        eprintln!("test plugin ({mode}): {e}");
        std::process::exit(1);
    }
}

fn echo(client: &Client) -> Result<(), Error> {
    client.send(6900, [("pid", std::process::id().to_string())])?;
    client.flush()?;
    loop {
        match client.receive_task() {
            Ok(task) => {
                // "sleep:<ms>" answers after a while, to keep a task in flight.
                if let Some(ms) = task.data.strip_prefix("sleep:").and_then(|ms| ms.parse().ok()) {
                    std::thread::sleep(Duration::from_millis(ms));
                }
                client.send(6901, [("data", task.data.as_str())])?;
                client.task_result(&task.token, true, &format!("echo {}", task.data))?;
            }
            Err(Error::Closed) => return client.flush().or(Ok(())),
            Err(e) => return Err(e),
        }
    }
}

fn emit(detail: &Value) -> Result<Client, Error> {
    let client = Client::new()?;
    let marker = std::path::Path::new("emitted");
    if marker.exists() {
        return Ok(client);
    }
    if let Some(ms) = detail["delay_ms"].as_u64() {
        std::thread::sleep(Duration::from_millis(ms));
    }
    let count = detail["count"].as_u64().unwrap_or(1000);
    let data_type = detail["data_type"].as_i64().unwrap_or(6100) as i32;
    let payload_bytes = detail["payload_bytes"].as_u64().unwrap_or(100) as usize;
    // Two fields; the padding brings the encoded Payload to about payload_bytes.
    let pad = "p".repeat(payload_bytes.saturating_sub(30).max(1));
    let mut record = Record {
        data_type,
        timestamp: 1_700_000_000,
        data: Some(Payload::default()),
        seq: 0,
    };
    let per_second = detail["per_second"].as_u64().filter(|r| *r > 0);
    let start = std::time::Instant::now();
    for i in 0..count {
        if let Some(rate) = per_second {
            let due = Duration::from_micros(i * 1_000_000 / rate);
            if let Some(wait) = due.checked_sub(start.elapsed()) {
                std::thread::sleep(wait);
            }
        }
        let fields = &mut record.data.get_or_insert_with(Payload::default).fields;
        fields.insert("i".to_owned(), i.to_string());
        fields.insert("pad".to_owned(), pad.clone());
        client.send_record(&record)?;
    }
    client.flush()?;
    std::fs::write(marker, count.to_string()).map_err(Error::Io)?;
    Ok(client)
}

fn stream(detail: &Value) -> Result<(), Error> {
    let client = Client::with_options(ClientOptions {
        flush_interval: Duration::from_millis(detail["flush_ms"].as_u64().unwrap_or(100)),
        ..Default::default()
    })?;
    let per_second = detail["per_second"].as_u64().unwrap_or(1000).max(1);
    let run = format!("{}-{}", detail["run"].as_str().unwrap_or(""), std::process::id());
    let sent_dir = detail["sent_dir"].as_str().map(std::path::PathBuf::from);
    let running = Arc::new(AtomicBool::new(true));
    let sent = Arc::new(AtomicU64::new(0));
    let emitter = {
        let (client, running, sent, run) = (client.clone(), Arc::clone(&running), Arc::clone(&sent), run.clone());
        std::thread::spawn(move || {
            let start = std::time::Instant::now();
            let mut i = 0u64;
            while running.load(Ordering::SeqCst) {
                if client.send(6100, [("i", i.to_string()), ("run", run.clone())]).is_err() {
                    if let Some(dir) = &sent_dir {
                        let _ = std::fs::write(dir.join(std::process::id().to_string()), i.to_string());
                    }
                    std::process::exit(0);
                }
                i += 1;
                sent.store(i, Ordering::SeqCst);
                let due = Duration::from_micros(i * 1_000_000 / per_second);
                if let Some(wait) = due.checked_sub(start.elapsed()) {
                    std::thread::sleep(wait);
                }
            }
        })
    };
    let emitter = Arc::new(Mutex::new(Some(emitter)));
    // Stops the emitter and reports its count; buffered, flushed by the SDK.
    let finish = {
        let client = client.clone();
        let sent_dir = detail["sent_dir"].as_str().map(std::path::PathBuf::from);
        move || {
            running.store(false, Ordering::SeqCst);
            if let Some(e) = emitter.lock().unwrap_or_else(|p| p.into_inner()).take() {
                let _ = e.join();
            }
            if let Some(dir) = &sent_dir {
                let n = sent.load(Ordering::SeqCst).to_string();
                let _ = std::fs::write(dir.join(std::process::id().to_string()), n);
            }
            let _ = client.send(
                6199,
                [("sent", sent.load(Ordering::SeqCst).to_string()), ("run", run.clone())],
            );
        }
    };
    let on_signal = finish.clone();
    client.on_stop(on_signal);
    if detail["deaf"].as_bool() == Some(true) {
        return idle();
    }
    client.serve(|task| {
        client.send(6901, [("data", task.data.as_str())])?;
        client.task_result(&task.token, true, "ok")
    })?;
    finish();
    client.flush()
}

fn raw(detail: &Value) -> Result<(), Error> {
    let bytes = hex_decode(detail["hex"].as_str().unwrap_or_default());
    // The pipe reopened through /proc: the same pipe, without taking fd 4 unsafely.
    let mut pipe = std::fs::OpenOptions::new()
        .write(true)
        .open("/proc/self/fd/4")
        .map_err(Error::Io)?;
    pipe.write_all(&bytes).map_err(Error::Io)?;
    if detail["exit"].as_bool() == Some(true) {
        std::process::exit(0);
    }
    idle()
}

fn high() -> Result<(), Error> {
    use std::io::Read;
    if std::env::var_os("ELKEID_PLUGIN_HIGH_PRIORITY_PIPE").is_none_or(|v| v.is_empty()) {
        eprintln!("no ELKEID_PLUGIN_HIGH_PRIORITY_PIPE in the environment");
        std::process::exit(2);
    }
    let open = |fd: u32| {
        std::fs::OpenOptions::new()
            .write(true)
            .open(format!("/proc/self/fd/{fd}"))
    };
    let record = |data_type: i32, lane: &str| {
        keel_proto::frame::encode_record(&keel_proto::grpc::Record {
            data_type,
            timestamp: 1_700_000_000,
            data: Some(keel_proto::grpc::Payload {
                fields: [("lane".to_owned(), lane.to_owned())].into(),
            }),
            seq: 0,
        })
    };
    let normal = record(6950, "normal");
    let (first, rest) = normal.split_at(normal.len() / 2);
    let mut fd4 = open(4).map_err(Error::Io)?;
    fd4.write_all(first).map_err(Error::Io)?;
    open(5)
        .map_err(Error::Io)?
        .write_all(&record(6951, "high"))
        .map_err(Error::Io)?;
    let mut byte = [0u8; 1];
    std::fs::File::open("/proc/self/fd/3")
        .and_then(|mut tasks| tasks.read_exact(&mut byte))
        .map_err(Error::Io)?;
    fd4.write_all(rest).map_err(Error::Io)?;
    idle()
}

fn hex_decode(s: &str) -> Vec<u8> {
    (0..s.len() / 2)
        .filter_map(|i| u8::from_str_radix(&s[2 * i..2 * i + 2], 16).ok())
        .collect()
}

fn crash() -> Result<(), Error> {
    let client = Client::new()?;
    client.send(6902, [("about_to", "crash")])?;
    client.flush()?;
    std::process::exit(3);
}

fn idle() -> Result<(), Error> {
    loop {
        std::thread::sleep(Duration::from_secs(3600));
    }
}

fn memhog() -> Result<(), Error> {
    let mut hoard: Vec<Vec<u8>> = Vec::new();
    for _ in 0..256 {
        // Touch every page so the memory is really used.
        hoard.push(vec![1u8; 16 << 20]);
        std::thread::sleep(Duration::from_millis(5));
    }
    eprintln!("memhog: holding {} MiB", hoard.len() * 16);
    idle()
}
