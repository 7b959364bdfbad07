//! `keel-bench footprint [settle_secs] [measure_secs]`: what the agent and its
//! three idle plugins cost a host. A `keel-server quickstart` (its own directory
//! and ports) runs the agent with key-request, proxy and file-delivery; once all
//! three run, they settle for `settle_secs` (default 30), then each process's
//! CPU is measured over `measure_secs` (default 120) and its memory read at the
//! end: RSS, PSS (the shared pages split between the processes that map them)
//! and the anonymous part of each.
//!
//! The binaries are those next to keel-bench, or in `KEEL_FOOTPRINT_BIN_DIR`
//! (`./build.sh bench footprint` builds and points it at the packages' `dist`
//! profile). The baseline, measured in the same run, is the floor of the stack:
//! a process of that directory's `keel-bench` that only starts a tokio runtime,
//! as the agent does, and waits.
//!
//! Last line: `footprint agent_rss_kb=<n> total_pss_kb=<n> cpu_pct=<x>`.

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use crate::cpu_secs;
use crate::scale::status_kb;

/// The plugins the quickstart runs.
const PLUGINS: [&str; 3] = ["key-request", "proxy", "file-delivery"];

/// How long the quickstart may take to have all three plugins running.
const START_LIMIT: Duration = Duration::from_secs(90);

/// One process's figures.
#[derive(Debug, Default, Clone, Copy)]
struct Figures {
    rss_kb: u64,
    anon_kb: u64,
    pss_kb: u64,
    pss_anon_kb: u64,
    threads: u64,
    cpu_pct: f64,
}

impl std::ops::AddAssign for Figures {
    fn add_assign(&mut self, o: Self) {
        self.rss_kb += o.rss_kb;
        self.anon_kb += o.anon_kb;
        self.pss_kb += o.pss_kb;
        self.pss_anon_kb += o.pss_anon_kb;
        self.threads += o.threads;
        self.cpu_pct += o.cpu_pct;
    }
}

/// A process stopped when this goes out of scope: SIGTERM (the quickstart then
/// stops its agent, and the agent its plugins), SIGKILL if it is still there
/// after 15 s.
struct Running(Child);

impl Drop for Running {
    fn drop(&mut self) {
        keel_tests::signal(&self.0, nix::sys::signal::Signal::SIGTERM);
        if keel_tests::wait_bounded(&mut self.0, Duration::from_secs(15)).is_none() {
            let _ = self.0.kill();
            let _ = self.0.wait();
        }
    }
}

pub fn run(settle: Duration, measure: Duration) {
    let bin_dir = std::env::var_os("KEEL_FOOTPRINT_BIN_DIR").map_or_else(
        || {
            keel_tests::bin("keel-agent")
                .parent()
                .expect("binary directory")
                .to_path_buf()
        },
        PathBuf::from,
    );
    for name in ["keel-server", "keel-agent", "keel-bench"].iter().chain(PLUGINS.iter()) {
        assert!(
            bin_dir.join(name).is_file(),
            "{name} is missing in {}: build the binaries first",
            bin_dir.display()
        );
    }
    println!("footprint: the binaries in {}", bin_dir.display());
    let dir = tempfile::tempdir().expect("tempdir");
    let (grpc, http) = (keel_tests::free_port(), keel_tests::free_port());
    let server = Running(
        Command::new(bin_dir.join("keel-server"))
            .arg("quickstart")
            .arg("--dir")
            .arg(dir.path().join("qs"))
            .args(["--grpc-port", &grpc.to_string(), "--http-port", &http.to_string()])
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("start keel-server quickstart"),
    );
    let floor = Running(
        Command::new(bin_dir.join("keel-bench"))
            .arg("footprint-floor")
            .spawn()
            .expect("start the floor process"),
    );
    let (agent, plugins) = wait_for_plugins(server.0.id());
    println!(
        "  the agent (pid {agent}) and its plugins run; settling for {:.0} s, then measuring for {:.0} s",
        settle.as_secs_f64(),
        measure.as_secs_f64()
    );
    std::thread::sleep(settle);
    let mut pids = vec![("keel-agent", agent)];
    pids.extend(plugins.iter().map(|(n, p)| (*n, *p)));
    pids.push(("floor", floor.0.id()));
    let before: Vec<f64> = pids.iter().map(|(_, p)| cpu_secs(*p)).collect();
    let start = Instant::now();
    std::thread::sleep(measure);
    let wall = start.elapsed().as_secs_f64();
    let mut total = Figures::default();
    let mut agent_figures = Figures::default();
    let mut floor_figures = Figures::default();
    println!(
        "  {:<14} {:>9} {:>9} {:>9} {:>9} {:>7} {:>8}",
        "process", "RSS KiB", "anon KiB", "PSS KiB", "PSS anon", "threads", "CPU %"
    );
    for ((name, pid), cpu0) in pids.iter().zip(before) {
        let mut f = memory(*pid);
        f.cpu_pct = (cpu_secs(*pid) - cpu0) / wall * 100.0;
        println!(
            "  {name:<14} {:>9} {:>9} {:>9} {:>9} {:>7} {:>8.3}",
            f.rss_kb, f.anon_kb, f.pss_kb, f.pss_anon_kb, f.threads, f.cpu_pct
        );
        match *name {
            "floor" => floor_figures = f,
            "keel-agent" => {
                agent_figures = f;
                total += f;
            }
            _ => total += f,
        }
    }
    println!(
        "  {:<14} {:>9} {:>9} {:>9} {:>9} {:>7} {:>8.3}",
        "agent+plugins", total.rss_kb, total.anon_kb, total.pss_kb, total.pss_anon_kb, total.threads, total.cpu_pct
    );
    println!(
        "  against the floor (a tokio runtime that waits): the agent {:.2}x its RSS, the four processes {:.2}x four floors' PSS",
        agent_figures.rss_kb as f64 / floor_figures.rss_kb.max(1) as f64,
        total.pss_kb as f64 / (4 * floor_figures.pss_kb).max(1) as f64
    );
    println!(
        "  against the targets: agent RSS {:.2}x 8 MB, total PSS {:.2}x 12 MB, CPU {:.2}x 0.1 %",
        agent_figures.rss_kb as f64 / 8192.0,
        total.pss_kb as f64 / 12288.0,
        total.cpu_pct / 0.1
    );
    println!(
        "footprint agent_rss_kb={} total_pss_kb={} cpu_pct={:.3}",
        agent_figures.rss_kb, total.pss_kb, total.cpu_pct
    );
    drop(floor);
    drop(server);
}

/// The floor process: a tokio runtime built as the agent builds its own, waiting.
pub fn floor() {
    let runtime = tokio::runtime::Runtime::new().expect("runtime");
    runtime.block_on(std::future::pending::<()>());
}

/// Waits until the quickstart's agent runs all of [`PLUGINS`]; their PIDs.
fn wait_for_plugins(server: u32) -> (u32, Vec<(&'static str, u32)>) {
    let start = Instant::now();
    loop {
        if let Some(agent) = children(server).into_iter().find(|(_, comm)| comm == "keel-agent") {
            let running = children(agent.0);
            let found: Vec<(&str, u32)> = PLUGINS
                .iter()
                .filter_map(|name| running.iter().find(|(_, c)| c == name).map(|(p, _)| (*name, *p)))
                .collect();
            if found.len() == PLUGINS.len() {
                return (agent.0, found);
            }
        }
        assert!(
            start.elapsed() < START_LIMIT,
            "the quickstart's agent did not run all of {PLUGINS:?} within {START_LIMIT:?}"
        );
        std::thread::sleep(Duration::from_millis(200));
    }
}

/// The children of `parent`: PID and command name.
fn children(parent: u32) -> Vec<(u32, String)> {
    let Ok(entries) = std::fs::read_dir("/proc") else {
        return Vec::new();
    };
    entries
        .flatten()
        .filter_map(|e| {
            let pid: u32 = e.file_name().to_str()?.parse().ok()?;
            let stat = std::fs::read_to_string(e.path().join("stat")).ok()?;
            let (head, rest) = stat.rsplit_once(')')?;
            let comm = head.split_once('(')?.1.to_owned();
            let ppid: u32 = rest.split_whitespace().nth(1)?.parse().ok()?;
            (ppid == parent).then_some((pid, comm))
        })
        .collect()
}

/// A process's memory: `/proc/<pid>/status` and `smaps_rollup`.
fn memory(pid: u32) -> Figures {
    let rollup = Path::new("/proc").join(pid.to_string()).join("smaps_rollup");
    let text = std::fs::read_to_string(rollup).unwrap_or_default();
    let field = |key: &str| -> u64 {
        text.lines()
            .find_map(|l| l.strip_prefix(key).and_then(|v| v.strip_prefix(':')))
            .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
            .unwrap_or(0)
    };
    Figures {
        rss_kb: status_kb(pid, "VmRSS"),
        anon_kb: status_kb(pid, "RssAnon"),
        pss_kb: field("Pss"),
        pss_anon_kb: field("Pss_Anon"),
        threads: status_kb(pid, "Threads"),
        cpu_pct: 0.0,
    }
}
