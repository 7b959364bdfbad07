//! `keel-bench keyrequest`: lookups per second through the key-request plugin
//! against the MariaDB-backed providers (the Python one and the Rust one), each
//! run against a baseline of the same lookups made straight to the provider; see
//! the crate documentation.

use std::collections::HashMap;
use std::io::{BufRead, BufReader, BufWriter, Read, Write};
use std::os::unix::fs::PermissionsExt;
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::Path;
use std::process::{Command, Stdio};
use std::sync::Arc;
use std::sync::mpsc::{TrySendError, sync_channel};
use std::time::Instant;

use keel_tests::mariadb::{AgentRow, KeyDb, Provider};
use serde_json::{Value, json};
use sha2::{Digest, Sha256};

/// Rows in the benchmark's table, at least.
const ROWS: usize = 10_000;
/// Parallel requests or processes in the baselines.
const BASELINE_PARALLEL: usize = 8;
/// Worker threads of the socket provider.
const PROVIDER_THREADS: usize = 8;
/// Tasks sent to the plugin and not yet answered, at most: below its queue_size,
/// so nothing is refused.
const WINDOW: usize = 512;
/// The plugin's lookup threads, in turn.
const PLUGIN_THREADS: [usize; 2] = [1, 8];
/// Lookups in the exec ceiling run (a shell program: quick).
const SHELL_LOOKUPS: usize = 2_000;
/// How many times the lookups of a Python run a Rust run makes, socket and exec:
/// it is that much quicker, and a run of well under a second says little.
const RUST_SOCKET_FACTOR: usize = 4;
const RUST_EXEC_FACTOR: usize = 10;

/// Lookups for `provider`, given the Python count.
fn lookups_for(provider: Provider, python: usize, rust_factor: usize) -> usize {
    match provider {
        Provider::Python => python,
        Provider::Rust => python * rust_factor,
    }
}

/// CPU seconds (user + system) of a process, and of its reaped children.
fn cpu(pid: u32) -> (f64, f64) {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap_or_default();
    let after = stat.rsplit_once(')').map(|(_, r)| r).unwrap_or_default();
    let f: Vec<f64> = after.split_whitespace().map(|v| v.parse().unwrap_or(0.0)).collect();
    let at = |i: usize| f.get(i).copied().unwrap_or(0.0) / 100.0;
    (at(11) + at(12), at(13) + at(14))
}

/// The MariaDB server's PID, if it runs on this machine.
fn mariadbd_pid() -> Option<u32> {
    std::fs::read_dir("/proc").ok()?.flatten().find_map(|e| {
        let pid: u32 = e.file_name().to_str()?.parse().ok()?;
        let comm = std::fs::read_to_string(e.path().join("comm")).ok()?;
        (comm.trim() == "mariadbd").then_some(pid)
    })
}

fn rows(n: usize) -> Vec<AgentRow> {
    (1..=n)
        .map(|i| {
            let key = hex::encode(Sha256::digest(format!("bench-key-{i}")));
            let ip = format!("10.{}.{}.{}", (i >> 16) & 255, (i >> 8) & 255, i & 255);
            AgentRow::new(&format!("{i:05}"), &format!("agent-{i}"), &ip, &key)
        })
        .collect()
}

/// What one run through the plugin gave.
struct Run {
    per_s: f64,
    failed: usize,
    first_failure: String,
    plugin_cpu: f64,
    children_cpu: f64,
}

/// Feeds a 6000 task for each ID to a plugin started with `detail`, at most
/// [`WINDOW`] unanswered, and times them from the first task to the last result.
fn through_plugin(detail: &Value, ids: &[String]) -> Run {
    let mut child = Command::new(keel_tests::bin("key-request"))
        .env("KEEL_PLUGIN_DEBUG", "1")
        .env("DETAIL", detail.to_string())
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .expect("start key-request");
    let pid = child.id();
    let mut lines = BufReader::new(child.stdout.take().expect("stdout")).lines();
    // Ready once it logged so: the start-up check is not part of the time.
    loop {
        let line = lines.next().expect("key-request exited before it was ready").unwrap();
        if line.contains("key-request ready") {
            break;
        }
    }
    let (slots, freed) = sync_channel::<()>(WINDOW);
    let n = ids.len();
    let reader = std::thread::spawn(move || {
        let (mut done, mut failed, mut first_failure) = (0, 0, String::new());
        for line in lines {
            let line = line.unwrap();
            if !line.starts_with("{\"data_type\":5100") {
                continue;
            }
            let v: Value = serde_json::from_str(&line).unwrap();
            if v["fields"]["status"] != "succeeded" {
                failed += 1;
                if first_failure.is_empty() {
                    first_failure = v["fields"]["msg"].as_str().unwrap_or_default().to_owned();
                }
            }
            done += 1;
            let _ = freed.recv();
            if done == n {
                return (Instant::now(), failed, first_failure);
            }
        }
        panic!("key-request stopped after {done} of {n} results");
    });
    let cpu0 = cpu(pid);
    let start = Instant::now();
    let mut stdin = BufWriter::new(child.stdin.take().expect("stdin"));
    for id in ids {
        if let Err(TrySendError::Full(())) = slots.try_send(()) {
            // The window is full: let the plugin see what is buffered, then wait.
            stdin.flush().unwrap();
            slots.send(()).unwrap();
        }
        let data = format!(r#"{{"by":"id","value":"{id}"}}"#);
        let task = json!({"data_type": 6000, "data": data, "token": id});
        writeln!(stdin, "{task}").unwrap();
    }
    stdin.flush().unwrap();
    let (end, failed, first_failure) = reader.join().expect("result reader");
    let secs = (end - start).as_secs_f64();
    let cpu1 = cpu(pid);
    let _ = child.kill();
    let _ = child.wait();
    Run {
        per_s: n as f64 / secs,
        failed,
        first_failure,
        plugin_cpu: cpu1.0 - cpu0.0,
        children_cpu: cpu1.1 - cpu0.1,
    }
}

/// Whether a provider's reply found the agent.
fn found(reply: &[u8]) -> bool {
    serde_json::from_slice::<Value>(reply).is_ok_and(|v| v["error"] == 0)
}

/// CPU seconds of this process (the load generator: the feeding and reading
/// threads, or the baseline's clients) and of its reaped children.
fn own_cpu() -> (f64, f64) {
    cpu(std::process::id())
}

/// The same lookups straight to the socket, from [`BASELINE_PARALLEL`] threads.
fn direct_socket(sock: &Path, ids: &[String]) -> f64 {
    let start = Instant::now();
    std::thread::scope(|s| {
        for part in ids.chunks(ids.len().div_ceil(BASELINE_PARALLEL)) {
            s.spawn(move || {
                let mut reply = Vec::new();
                for id in part {
                    let mut conn = UnixStream::connect(sock).expect("connect to the provider");
                    conn.write_all(format!("id:{id}").as_bytes()).unwrap();
                    reply.clear();
                    conn.read_to_end(&mut reply).unwrap();
                    assert!(found(&reply), "{id}: {}", String::from_utf8_lossy(&reply));
                }
            });
        }
    });
    ids.len() as f64 / start.elapsed().as_secs_f64()
}

/// The same lookups by running the provider directly, [`BASELINE_PARALLEL`] at a time.
fn direct_exec(exec_path: &str, ids: &[String]) -> f64 {
    let words: Vec<&str> = exec_path.split_ascii_whitespace().collect();
    let start = Instant::now();
    std::thread::scope(|s| {
        for part in ids.chunks(ids.len().div_ceil(BASELINE_PARALLEL)) {
            let words = &words;
            s.spawn(move || {
                for id in part {
                    let out = Command::new(words[0])
                        .args(&words[1..])
                        .args(["id", id])
                        .stdin(Stdio::null())
                        .output()
                        .expect("run the provider");
                    assert!(
                        out.status.success() && found(&out.stdout),
                        "{id}: {}",
                        String::from_utf8_lossy(&out.stdout)
                    );
                }
            });
        }
    });
    ids.len() as f64 / start.elapsed().as_secs_f64()
}

/// An in-memory socket provider: the ceiling without Python and MariaDB.
fn memory_server(sock: &Path, rows: &[AgentRow]) {
    let replies: Arc<HashMap<String, Vec<u8>>> = Arc::new(
        rows.iter()
            .map(|r| {
                let reply = json!({"error": 0, "data": {"id": r.id, "name": r.name, "ip": r.ip, "key": r.key}});
                (format!("id:{}", r.id), reply.to_string().into_bytes())
            })
            .collect(),
    );
    let listener = UnixListener::bind(sock).expect("bind the in-memory provider");
    for _ in 0..2 {
        let (l, replies) = (listener.try_clone().unwrap(), Arc::clone(&replies));
        std::thread::spawn(move || {
            let mut buf = [0u8; 64];
            for conn in l.incoming() {
                let Ok(mut conn) = conn else { continue };
                let Ok(n) = conn.read(&mut buf) else { continue };
                let key = String::from_utf8_lossy(&buf[..n]).into_owned();
                let reply = replies
                    .get(&key)
                    .map_or(&br#"{"error":4,"message":"No agent key found"}"#[..], |r| r);
                let _ = conn.write_all(reply);
            }
        });
    }
}

fn report(label: &str, run: &Run, n: usize, base: f64, what_children: Option<&str>) {
    let ratio = run.per_s / base;
    let per_lookup_us = |secs: f64| secs * 1e6 / n as f64;
    print!(
        "    {label}: {:.0} lookups/s, ratio to baseline {ratio:.2}; plugin CPU {:.0} us/lookup",
        run.per_s,
        per_lookup_us(run.plugin_cpu)
    );
    if let Some(what) = what_children {
        print!(", {what} CPU {:.0} us/lookup", per_lookup_us(run.children_cpu));
    }
    println!();
    if run.failed > 0 {
        println!("      {} lookups failed, the first: {}", run.failed, run.first_failure);
    }
}

/// CPU seconds of the processes a run shares the machine with.
#[derive(Clone, Copy)]
struct Usage {
    /// The socket provider (0 in exec mode: its processes are the plugin's children).
    provider: f64,
    /// mariadbd.
    mariadbd: f64,
    /// keel-bench itself.
    bench: f64,
    /// keel-bench's reaped children (the baseline's provider processes).
    bench_children: f64,
}

/// Reads [`Usage`] now.
struct Meter {
    provider: Option<u32>,
    mariadbd: Option<u32>,
}

impl Meter {
    fn now(&self) -> Usage {
        let own = own_cpu();
        Usage {
            provider: self.provider.map_or(0.0, |p| cpu(p).0),
            mariadbd: self.mariadbd.map_or(0.0, |p| cpu(p).0),
            bench: own.0,
            bench_children: own.1,
        }
    }

    /// "provider CPU ... , mariadbd CPU ..., keel-bench CPU ..." per lookup since `from`.
    fn since(&self, from: Usage, n: usize, provider: Option<&str>) -> String {
        let to = self.now();
        let us = |secs: f64| secs * 1e6 / n as f64;
        let mut parts = Vec::new();
        if let Some(what) = provider {
            let secs = if self.provider.is_some() {
                to.provider - from.provider
            } else {
                to.bench_children - from.bench_children
            };
            parts.push(format!("{what} CPU {:.0} us/lookup", us(secs)));
        }
        if self.mariadbd.is_some() {
            parts.push(format!("mariadbd CPU {:.0} us/lookup", us(to.mariadbd - from.mariadbd)));
        }
        parts.push(format!("keel-bench CPU {:.0} us/lookup", us(to.bench - from.bench)));
        parts.join(", ")
    }
}

/// The best figure through the plugin so far, and what gave it.
#[derive(Default)]
struct Best {
    per_s: f64,
    what: String,
}

impl Best {
    fn offer(&mut self, per_s: f64, provider: Provider, threads: usize) {
        if per_s > self.per_s {
            self.per_s = per_s;
            self.what = format!("{} provider, plugin threads {threads}", provider.name());
        }
    }
}

/// Socket mode with `provider`: the baseline, then through the plugin.
fn socket_runs(db: &KeyDb, provider: Provider, dir: &Path, ids: &[String], mariadbd: Option<u32>, best: &mut Best) {
    let n = ids.len();
    let sock = dir.join(format!("{}-provider.sock", provider.name().to_lowercase()));
    let server = db.serve_using(provider, &sock, PROVIDER_THREADS);
    let meter = Meter {
        provider: Some(server.pid()),
        mariadbd,
    };
    println!(
        "  socket, {} provider with {PROVIDER_THREADS} threads ({n} lookups)",
        provider.name()
    );
    let from = meter.now();
    let base = direct_socket(&sock, ids);
    println!(
        "    baseline, {BASELINE_PARALLEL} threads straight to the socket: {base:.0} lookups/s; {}",
        meter.since(from, n, Some("provider"))
    );
    for threads in PLUGIN_THREADS {
        let detail = json!({"socket": sock, "threads": threads, "timeout": 30});
        let from = meter.now();
        let run = through_plugin(&detail, ids);
        let usage = meter.since(from, n, Some("provider"));
        report(&format!("plugin, threads {threads}"), &run, n, base, None);
        println!("      {usage}");
        if run.failed == 0 {
            best.offer(run.per_s, provider, threads);
        }
    }
}

/// Exec mode with `provider`: the baseline, then through the plugin.
fn exec_runs(db: &KeyDb, provider: Provider, ids: &[String], mariadbd: Option<u32>, best: &mut Best) {
    let n = ids.len();
    let exec_path = db.exec_path_for(provider);
    let meter = Meter {
        provider: None,
        mariadbd,
    };
    println!(
        "  exec, {} provider, a process per lookup ({n} lookups)",
        provider.name()
    );
    let from = meter.now();
    let base = direct_exec(&exec_path, ids);
    println!(
        "    baseline, {BASELINE_PARALLEL} provider processes at a time: {base:.1} lookups/s; {}",
        meter.since(from, n, Some("provider processes'"))
    );
    for threads in PLUGIN_THREADS {
        let detail = json!({"exec_path": exec_path, "threads": threads, "timeout": 30});
        let from = meter.now();
        let run = through_plugin(&detail, ids);
        let usage = meter.since(from, n, None);
        report(
            &format!("plugin, threads {threads}"),
            &run,
            n,
            base,
            Some("provider processes'"),
        );
        println!("      {usage}");
        if run.failed == 0 {
            best.offer(run.per_s, provider, threads);
        }
    }
}

/// Runs the benchmark: `socket_lookups` and `exec_lookups` for the Python
/// provider, [`RUST_SOCKET_FACTOR`] and [`RUST_EXEC_FACTOR`] times as many for the
/// Rust one.
pub fn run(socket_lookups: usize, exec_lookups: usize) {
    let cores = std::thread::available_parallelism().map_or(1, |n| n.get());
    println!(
        "keyrequest: lookups/s through the key-request plugin, MariaDB-backed providers (Python and Rust), {cores} cores; every lookup for a different agent"
    );
    let most = Provider::ALL
        .iter()
        .map(|&p| {
            lookups_for(p, socket_lookups, RUST_SOCKET_FACTOR).max(lookups_for(p, exec_lookups, RUST_EXEC_FACTOR))
        })
        .max()
        .unwrap_or(0);
    let rows = rows(ROWS.max(most));
    let db = KeyDb::create(&rows);
    let ids: Vec<String> = rows.iter().map(|r| r.id.clone()).collect();
    let dir = tempfile::tempdir().expect("tempdir");
    let mariadbd = mariadbd_pid();
    if mariadbd.is_none() {
        println!("  (mariadbd is not a process on this machine: its CPU is not measured)");
    }

    // Socket mode.
    let mut socket_best = Best::default();
    for provider in Provider::ALL {
        let n = lookups_for(provider, socket_lookups, RUST_SOCKET_FACTOR);
        socket_runs(&db, provider, dir.path(), &ids[..n], mariadbd, &mut socket_best);
    }
    let ids_s = &ids[..socket_lookups];
    let mem_sock = dir.path().join("memory.sock");
    memory_server(&mem_sock, &rows);
    let mem_base = direct_socket(&mem_sock, ids_s);
    let mem_run = through_plugin(&json!({"socket": mem_sock, "threads": 8, "timeout": 30}), ids_s);
    println!("  socket ceiling without a provider process and MariaDB (an in-memory socket server in keel-bench):");
    println!("    baseline, {BASELINE_PARALLEL} threads straight to it: {mem_base:.0} lookups/s");
    report("plugin, threads 8", &mem_run, socket_lookups, mem_base, None);

    // Exec mode.
    let mut exec_best = Best::default();
    for provider in Provider::ALL {
        let n = lookups_for(provider, exec_lookups, RUST_EXEC_FACTOR);
        exec_runs(&db, provider, &ids[..n], mariadbd, &mut exec_best);
    }
    let shell = dir.path().join("printf-provider");
    std::fs::write(
        &shell,
        "#!/bin/sh\nprintf '{\"error\":0,\"data\":{\"id\":\"%s\",\"name\":\"n\",\"ip\":\"any\",\"key\":\"k\"}}' \"$2\"\n",
    )
    .unwrap();
    std::fs::set_permissions(&shell, std::fs::Permissions::from_mode(0o755)).unwrap();
    let shell_path = shell.display().to_string();
    let shell_ids = &ids[..SHELL_LOOKUPS.min(ids.len())];
    let shell_base = direct_exec(&shell_path, shell_ids);
    let shell_run = through_plugin(&json!({"exec_path": shell_path, "threads": 8}), shell_ids);
    println!(
        "  exec ceiling without a real provider and MariaDB (a /bin/sh printf program, {} lookups):",
        shell_ids.len()
    );
    println!("    baseline, {BASELINE_PARALLEL} processes at a time: {shell_base:.0} lookups/s");
    report(
        "plugin, threads 8",
        &shell_run,
        shell_ids.len(),
        shell_base,
        Some("programs'"),
    );

    println!(
        "  best through the plugin against MariaDB: socket {:.0} lookups/s ({}), exec {:.1} lookups/s ({})",
        socket_best.per_s, socket_best.what, exec_best.per_s, exec_best.what
    );
    println!(
        "keyrequest socket_per_s={:.0} exec_per_s={:.1}",
        socket_best.per_s, exec_best.per_s
    );
}
