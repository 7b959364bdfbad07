//! `keel-bench filedelivery [files] [bytes]`: what a delivery costs on the host.
//!
//! Each of `files` distinct files of `bytes` bytes is sealed by a keeper, then
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
pub fn run(files: usize, bytes: usize) {
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
    println!(
        "filedelivery deliver_us={:.1} baseline_us={:.1} ratio={:.2} unchanged_us={:.1}",
        per(written, files),
        per(baseline, files),
        written.as_secs_f64() / baseline.as_secs_f64(),
        per(unchanged, files)
    );
}
