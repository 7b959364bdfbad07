//! `keel-bench filedelivery [agents] [files] [bytes]`: a push to a fleet, end to
//! end, and what each delivery costs on the host.
//!
//! **End to end** ([`fleet`]): a real keel-server, `agents` real agents running
//! the packaged-style plugin, tagged `bench`, and `keelctl files push --tag bench`
//! of `files` files of `bytes` bytes, as an operator runs it: five rounds of a
//! fresh push (new names), the same push again (nothing changed), and a push
//! with one file changed. Each file on each host is checked (content and mode)
//! after every round. The baseline is the floor of the same work on one machine
//! with nothing in between: the bare atomic write of every file to every host's
//! directory (below).
//!
//! **On the host** ([`host`]): each of `files × agents` distinct files is sealed by a keeper, then
//! parsed, checked (keeper key, host key, Ed25519 signature), opened (HPKE),
//! compared with what is on disk and written atomically by the plugin's store, as
//! the plugin does for a 6200 task. The baseline, in the same run on the same
//! disk, is the bare atomic write of the same bytes (temporary file, write, fsync,
//! rename, directory fsync) that any careful file writer needs. Then the same
//! deliveries again, which find the content unchanged and write nothing, and one
//! inventory of every file.

use std::io::Write;
use std::os::unix::fs::OpenOptionsExt;
use std::path::Path;
use std::time::{Duration, Instant};

use keel_common::keys::ed25519_public;
use keel_plugin_file_delivery::envelope::{Envelope, FileSpec, Keeper};
use keel_plugin_file_delivery::store::{Outcome, Store};
use keel_tests::filedelivery::{FileHost, Keeper as Keelctl};
use keel_tests::{Server, ServerOptions};
use serde_json::Value;

fn per(d: Duration, n: usize) -> f64 {
    d.as_secs_f64() * 1e6 / n as f64
}

fn atomic_write(dir: &Path, name: &str, content: &[u8]) {
    let tmp = dir.join(format!(".{name}.tmp"));
    let mut f = std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o600)
        .open(&tmp)
        .unwrap();
    f.write_all(content).unwrap();
    f.sync_all().unwrap();
    drop(f);
    std::fs::rename(&tmp, dir.join(name)).unwrap();
    std::fs::File::open(dir).unwrap().sync_all().unwrap();
}

/// Runs the benchmark.
pub async fn run(agents: usize, files: usize, bytes: usize) {
    let baseline = host(agents * files, bytes);
    fleet(agents, files, bytes, baseline).await;
}

/// The cost per file on the host; returns the bare atomic write's time for all.
fn host(files: usize, bytes: usize) -> Duration {
    let dir = tempfile::tempdir().unwrap();
    let contents: Vec<Vec<u8>> = (0..files)
        .map(|i| {
            let mut c = format!("secret-{i}-").into_bytes();
            c.resize(bytes, b'x');
            c
        })
        .collect();

    // Baseline: the bare atomic write.
    let plain = dir.path().join("plain");
    std::fs::create_dir(&plain).unwrap();
    let start = Instant::now();
    for (i, c) in contents.iter().enumerate() {
        atomic_write(&plain, &format!("f{i}"), c);
    }
    let baseline = start.elapsed();

    let store = Store::open(&dir.path().join("files"), &dir.path().join("state"), 4096).unwrap();
    let host = store.host_key().unwrap();
    let keeper = Keeper::from_seed(&[7; 32]);
    let trusted = [ed25519_public(&keeper.public_hex()).unwrap()];
    let spec = |i: usize| FileSpec {
        name: format!("f{i}"),
        mode: "0600".into(),
        readers: vec![],
    };

    let start = Instant::now();
    let sealed: Vec<String> = contents
        .iter()
        .enumerate()
        .map(|(i, c)| serde_json::to_string(&keeper.seal(&host.public_hex(), &spec(i), c, 1).unwrap()).unwrap())
        .collect();
    let seal = start.elapsed();

    let deliver = |sealed: &[String], want: Outcome| {
        let start = Instant::now();
        for json in sealed {
            let env = Envelope::parse(json).unwrap();
            let opened = env.open(&trusted, &host).unwrap();
            assert_eq!(store.deliver(&env, &opened).unwrap(), want);
        }
        start.elapsed()
    };
    let written = deliver(&sealed, Outcome::Written);
    let again: Vec<String> = contents
        .iter()
        .enumerate()
        .map(|(i, c)| serde_json::to_string(&keeper.seal(&host.public_hex(), &spec(i), c, 2).unwrap()).unwrap())
        .collect();
    let unchanged = deliver(&again, Outcome::Unchanged);
    let start = Instant::now();
    let inventory = store.inventory();
    let inv = start.elapsed();
    assert_eq!(inventory.len(), files);
    assert!(inventory.iter().all(|i| i.state == "ok"));

    println!("file-delivery on the host: {files} files of {bytes} bytes");
    println!(
        "  baseline atomic write (write, fsync, rename, dir fsync): {:8.1} µs/file",
        per(baseline, files)
    );
    println!(
        "  delivery (parse, verify, open, compare, atomic write):  {:8.1} µs/file  ({:.2}x the baseline)",
        per(written, files),
        written.as_secs_f64() / baseline.as_secs_f64()
    );
    println!(
        "  unchanged delivery (nothing written):                   {:8.1} µs/file  ({:.2}x the baseline)",
        per(unchanged, files),
        unchanged.as_secs_f64() / baseline.as_secs_f64()
    );
    println!(
        "  keeper: seal and sign                                   {:8.1} µs/file",
        per(seal, files)
    );
    println!(
        "  inventory of {files} files                              {:8.1} µs/file",
        per(inv, files)
    );
    baseline
}

/// The rows of a `keelctl files push --json`, counted by action.
fn count(rows: &[Value], action: &str) -> usize {
    rows.iter().filter(|r| r["action"] == action).count()
}

/// The end-to-end runs; `floor` is the bare atomic write of every file.
async fn fleet(agents: usize, files: usize, bytes: usize, floor: Duration) {
    const ROUNDS: usize = 5;
    let server = Server::start(ServerOptions::default()).await;
    let keeper = Keelctl::new(&server);
    let ids: Vec<String> = (0..agents).map(|i| format!("bench-fd-{i}")).collect();
    let hosts = FileHost::start_all(&server, &ids, &keeper.public, &["bench"]).await;
    let src = tempfile::tempdir().unwrap();
    let target = ["--tag", "bench", "--trust-new-hosts"];
    let (mut fresh, mut unchanged, mut changed) = (Vec::new(), Vec::new(), Vec::new());
    let (mut failed, mut unchanged_bytes, mut changed_sent) = (0, 0, 0);
    for round in 0..ROUNDS {
        let contents: Vec<Vec<u8>> = (0..files)
            .map(|i| {
                let mut c = format!("round-{round}-secret-{i}-").into_bytes();
                c.resize(bytes, b'x');
                c
            })
            .collect();
        let args: Vec<String> = contents
            .iter()
            .enumerate()
            .map(|(i, c)| {
                let path = src.path().join(format!("r{round}-f{i}"));
                std::fs::write(&path, c).unwrap();
                format!("r{round}/f{i}={}", path.display())
            })
            .collect();
        let check = |contents: &[Vec<u8>]| {
            for h in &hosts {
                for (i, c) in contents.iter().enumerate() {
                    let path = h.files.join(format!("r{round}/f{i}"));
                    assert_eq!(&std::fs::read(&path).unwrap(), c, "{}", path.display());
                    let mode =
                        std::os::unix::fs::PermissionsExt::mode(&std::fs::metadata(&path).unwrap().permissions());
                    assert_eq!(mode & 0o7777, 0o600, "{}", path.display());
                }
            }
        };

        let start = Instant::now();
        let (code, rows) = keeper.push(&target, &[], &args);
        fresh.push(start.elapsed());
        failed += count(&rows, "failed");
        assert_eq!(
            (code, count(&rows, "sent")),
            (Some(0), agents * files),
            "fresh round {round}"
        );
        check(&contents);

        let start = Instant::now();
        let (code, rows) = keeper.push(&target, &[], &args);
        unchanged.push(start.elapsed());
        failed += count(&rows, "failed");
        assert_eq!(
            (code, count(&rows, "unchanged")),
            (Some(0), agents * files),
            "unchanged round {round}"
        );
        // Nothing sent is no content sent.
        unchanged_bytes += count(&rows, "sent") * bytes;

        let mut contents = contents;
        contents[files / 2][0] ^= 1;
        std::fs::write(
            src.path().join(format!("r{round}-f{}", files / 2)),
            &contents[files / 2],
        )
        .unwrap();
        let start = Instant::now();
        let (code, rows) = keeper.push(&target, &[], &args);
        changed.push(start.elapsed());
        failed += count(&rows, "failed");
        assert_eq!(code, Some(0), "changed round {round}");
        changed_sent = changed_sent.max(count(&rows, "sent") / agents);
        check(&contents);
    }
    let rss_kb = hosts
        .iter()
        .filter_map(|h| h.plugin_pid())
        .filter_map(|pid| {
            let status = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
            let line = status.lines().find(|l| l.starts_with("VmRSS:"))?;
            line.split_whitespace().nth(1)?.parse::<u64>().ok()
        })
        .max()
        .unwrap_or(0);
    let median = |v: &mut Vec<Duration>| {
        v.sort();
        v[v.len() / 2]
    };
    let show = |v: &[Duration]| {
        v.iter()
            .map(|d| format!("{:.3}", d.as_secs_f64()))
            .collect::<Vec<_>>()
            .join(" ")
    };
    println!(
        "file-delivery end to end: keelctl files push --tag of {files} files of {bytes} bytes to {agents} agents, {ROUNDS} rounds"
    );
    println!("  fresh:        {} s", show(&fresh));
    println!("  unchanged:    {} s", show(&unchanged));
    println!("  one changed:  {} s", show(&changed));
    let (f, u, c) = (median(&mut fresh), median(&mut unchanged), median(&mut changed));
    println!(
        "  fresh median {:.3} s, worst {:.3} s: {:.2}x the bare atomic write of the same {} files on one machine ({:.3} s)",
        f.as_secs_f64(),
        fresh.last().unwrap().as_secs_f64(),
        f.as_secs_f64() / floor.as_secs_f64(),
        agents * files,
        floor.as_secs_f64()
    );
    println!(
        "  unchanged median {:.3} s, one changed median {:.3} s",
        u.as_secs_f64(),
        c.as_secs_f64()
    );
    println!("  file-delivery plugin RSS after the runs: {rss_kb} KiB (the largest of {agents})");
    println!(
        "filedelivery agents={agents} files={files} fresh_s={:.3} unchanged_s={:.3} unchanged_content_bytes={unchanged_bytes} changed_files_sent={changed_sent} failed={failed} plugin_rss_kb={rss_kb}",
        f.as_secs_f64(),
        u.as_secs_f64()
    );
}
