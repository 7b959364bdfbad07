//! `keelctl files`: the keeper of file-delivery.
//!
//! The keeper holds the operator's Ed25519 key and the files; the server only
//! relays. A push is one operation:
//! 1. the server asks every targeted agent's plugin for its inventory at once
//!    (`POST /api/v1/files/inventories`: 6201, the host key and the keyed digest
//!    of every file it holds);
//! 2. the keeper checks each host key against its pin, seals and signs only the
//!    files whose digest, mode or readers differ
//!    ([`keel_plugin_file_delivery::envelope`]), on every core, and packs each
//!    host's envelopes into as few parts as the task size allows
//!    ([`keel_plugin_file_delivery::bundle`]);
//! 3. it hands the server every host's parts as one push
//!    (`POST /api/v1/files/pushes`), which sends them to all hosts in parallel;
//! 4. it long-polls the push (`GET /api/v1/files/pushes/{id}`), showing each
//!    host as it finishes, until every host is done, failed, or offline (an
//!    offline host with a pinned key gets its files when it reconnects).
//!
//! Host keys are pinned in a JSON file (`file-hosts.json` beside `keelctl.toml`),
//! because the inventory comes through the server: a key the server made up would
//! let it read what is sealed to it. A new agent's key is pinned only with
//! `--accept-host-key` (checked with `file-delivery host-key` on the host) or
//! `--trust-new-hosts`; a changed key is refused until pinned again.

use std::collections::BTreeMap;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::time::Duration;

use anyhow::{Context, anyhow, bail};
use keel_plugin_file_delivery::bundle::pack;
use keel_plugin_file_delivery::envelope::{FileSpec, Keeper, MAX_FILE_BYTES, check_name, parse_mode};
use reqwest::Method;
use serde::Deserialize;
use serde_json::{Value, json};

use crate::cli::{FilesCmd, FilesPushArgs, FilesRemoveArgs, FilesStatusArgs, FilesTarget};
use crate::config::{Env, ProcessEnv};
use crate::{Ctx, EXIT_TASK_UNSUCCESSFUL, output, usage};

/// Runs a `files` command.
pub async fn run(ctx: &Ctx, cmd: FilesCmd) -> anyhow::Result<ExitCode> {
    match cmd {
        FilesCmd::Keygen { out } => keygen(&out).map(|()| ExitCode::SUCCESS),
        FilesCmd::List(target) => list(ctx, &target).await,
        FilesCmd::Push(args) => push(ctx, &args).await,
        FilesCmd::Remove(args) => remove(ctx, &args).await,
        FilesCmd::Status(args) => status(ctx, &args).await,
    }
}

/// Writes a new keeper key to `out` (0600) and prints its public key.
pub fn keygen(out: &Path) -> anyhow::Result<()> {
    if out.exists() {
        return Err(usage(format!(
            "{} exists; a keeper key is never overwritten",
            out.display()
        )));
    }
    let (keeper, seed) = Keeper::generate().map_err(|e| anyhow!(e))?;
    keel_common::fsutil::write_private(out, format!("{}\n", hex::encode(seed)).as_bytes())
        .with_context(|| format!("cannot write {}", out.display()))?;
    output::line(&keeper.public_hex())
}

/// Reads a keeper key, refusing one that others can read.
fn load_keeper(path: &Path) -> anyhow::Result<Keeper> {
    let meta = std::fs::metadata(path).with_context(|| format!("keeper key {}", path.display()))?;
    if meta.permissions().mode() & 0o077 != 0 {
        return Err(usage(format!(
            "keeper key {} is open to others (mode {:04o}); chmod 600 it",
            path.display(),
            meta.permissions().mode() & 0o777
        )));
    }
    let text = std::fs::read_to_string(path).with_context(|| format!("keeper key {}", path.display()))?;
    let seed: [u8; 32] = hex::decode(text.trim())
        .ok()
        .and_then(|b| b.try_into().ok())
        .ok_or_else(|| {
            usage(format!(
                "keeper key {}: not a 32-byte hex key from `keelctl files keygen`",
                path.display()
            ))
        })?;
    Ok(Keeper::from_seed(&seed))
}

/// The pinned host keys: agent ID → X25519 public key, hex.
#[derive(Debug)]
struct KnownHosts {
    path: PathBuf,
    keys: BTreeMap<String, String>,
}

impl KnownHosts {
    fn load(target: &FilesTarget, env: &dyn Env) -> anyhow::Result<KnownHosts> {
        let path = match &target.known_hosts {
            Some(p) => p.clone(),
            None => crate::config::default_path(env)
                .map(|p| p.with_file_name("file-hosts.json"))
                .ok_or_else(|| usage("no HOME or XDG_CONFIG_HOME for the pinned host keys; pass --known-hosts"))?,
        };
        let keys = match std::fs::read(&path) {
            Ok(b) => serde_json::from_slice(&b)
                .with_context(|| format!("{}: not a JSON object of host keys", path.display()))?,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => BTreeMap::new(),
            Err(e) => return Err(e).with_context(|| path.display().to_string()),
        };
        Ok(KnownHosts { path, keys })
    }

    fn save(&self) -> anyhow::Result<()> {
        if let Some(dir) = self.path.parent().filter(|d| !d.as_os_str().is_empty()) {
            std::fs::create_dir_all(dir).with_context(|| dir.display().to_string())?;
        }
        let text = serde_json::to_string_pretty(&self.keys)?;
        keel_common::fsutil::write_private(&self.path, text.as_bytes()).with_context(|| self.path.display().to_string())
    }

    /// Checks `presented` for `agent`, pinning it where the flags allow.
    fn check(&mut self, target: &FilesTarget, agent: &str, presented: &str) -> anyhow::Result<()> {
        let accepted = target.accept_host_key.as_deref().map(str::trim);
        match (self.keys.get(agent), accepted) {
            (_, Some(want)) if want != presented => bail!(
                "agent {agent} presents host key {presented}, not the {want} given with --accept-host-key: \
                 check `file-delivery host-key` on the host; nothing was sent"
            ),
            (_, Some(_)) => {}
            (Some(pinned), None) if pinned == presented => return Ok(()),
            (Some(pinned), None) => bail!(
                "agent {agent} presents host key {presented}, but {pinned} is pinned in {}: the host key changed \
                 (a reinstalled host, or someone between keeper and host); check `file-delivery host-key` on the \
                 host and pass --accept-host-key; nothing was sent",
                self.path.display()
            ),
            (None, None) if target.trust_new_hosts => {}
            (None, None) => bail!(
                "agent {agent} presents host key {presented}, which is not pinned: check it with `file-delivery \
                 host-key` on the host and pass --accept-host-key {presented} (or --trust-new-hosts); nothing was sent"
            ),
        }
        self.keys.insert(agent.to_owned(), presented.to_owned());
        self.save()
    }
}

/// A delivered file as the plugin reports it.
#[derive(Debug, Clone, Deserialize)]
struct Item {
    name: String,
    version: u64,
    digest: String,
    mode: String,
    readers: Vec<String>,
    state: String,
}

impl Item {
    /// Whether the host holds exactly this delivery.
    fn holds(&self, digest: &str, mode: &str, readers: &[String]) -> bool {
        self.state == "ok"
            && self.digest == digest
            && parse_mode(&self.mode).ok() == parse_mode(mode).ok()
            && self.readers == readers
    }
}

/// Every targeted agent's inventory, asked by the server of all at once.
async fn inventories(ctx: &Ctx, target: &FilesTarget) -> anyhow::Result<Vec<Value>> {
    let mut body = json!({"timeout_secs": target.timeout});
    match (&target.tag, target.all) {
        (Some(tag), _) => body["tag"] = json!(tag),
        (None, true) => body["all"] = json!(true),
        (None, false) => body["agents"] = json!(target.agents),
    }
    let limit = Duration::from_secs(target.timeout + 30);
    let answer = ctx
        .client
        .call_within(Method::POST, &["files", "inventories"], Some(&body), limit)
        .await?;
    match answer {
        Value::Array(a) => Ok(a),
        other => bail!("the server answered no list of inventories: {other}"),
    }
}

/// What the keeper knows of one targeted host.
#[derive(Debug)]
enum Known {
    /// Online, its key checked: what it holds.
    Online { host_key: String, held: Vec<Item> },
    /// Offline, with a pinned key: its share waits for it.
    Offline { host_key: String },
    /// Nothing can be sealed to it.
    Failed(String),
}

/// Checks each inventory's host key against the pins (pinning where the flags
/// allow).
fn checked(target: &FilesTarget, known: &mut KnownHosts, inv: &Value) -> Known {
    let agent = inv["agent"].as_str().unwrap_or_default();
    if let Some(e) = inv["error"].as_str() {
        return Known::Failed(e.to_owned());
    }
    if inv["online"] != true {
        return match known.keys.get(agent) {
            Some(k) => Known::Offline { host_key: k.clone() },
            None => Known::Failed(format!(
                "agent {agent} is offline and its host key is not pinned: nothing can be sealed to it"
            )),
        };
    }
    let Some(host_key) = inv["host_key"]
        .as_str()
        .filter(|k| k.len() == 64 && k.bytes().all(|b| b.is_ascii_hexdigit()))
    else {
        return Known::Failed(format!("agent {agent}: the inventory carries no valid host_key"));
    };
    let held: Vec<Item> = match serde_json::from_value(inv["files"].clone()) {
        Ok(h) => h,
        Err(e) => return Known::Failed(format!("agent {agent}: the inventory's files are not a list: {e}")),
    };
    match known.check(target, agent, host_key) {
        Ok(()) => Known::Online {
            host_key: host_key.to_owned(),
            held,
        },
        Err(e) => Known::Failed(format!("{e:#}")),
    }
}

/// Every targeted host's inventory, its key checked against the pins.
async fn hosts(ctx: &Ctx, target: &FilesTarget) -> anyhow::Result<Vec<(String, Known)>> {
    let mut known = KnownHosts::load(target, &ProcessEnv)?;
    Ok(inventories(ctx, target)
        .await?
        .iter()
        .map(|inv| {
            let agent = inv["agent"].as_str().unwrap_or_default().to_owned();
            (agent, checked(target, &mut known, inv))
        })
        .collect())
}

fn check_target(target: &FilesTarget) -> anyhow::Result<()> {
    let given = usize::from(!target.agents.is_empty()) + usize::from(target.tag.is_some()) + usize::from(target.all);
    if given != 1 {
        return Err(usage("give the agents with --agent, --tag or --all (one of them)"));
    }
    if let Some(bad) = target.agents.iter().find(|a| !keel_common::ids::valid_agent_id(a)) {
        return Err(usage(format!("--agent {bad:?} is not an agent ID")));
    }
    if target.accept_host_key.is_some() && target.agents.len() != 1 {
        return Err(usage(
            "--accept-host-key pins one agent's key: give exactly one --agent",
        ));
    }
    Ok(())
}

async fn list(ctx: &Ctx, target: &FilesTarget) -> anyhow::Result<ExitCode> {
    check_target(target)?;
    let mut rows = Vec::new();
    let mut failed = Vec::new();
    for (agent, known) in hosts(ctx, target).await? {
        match known {
            Known::Online { host_key, held } => {
                for f in held {
                    rows.push(
                        json!({"agent": agent, "host_key": host_key, "name": f.name, "version": f.version,
                        "state": f.state, "mode": f.mode, "readers": f.readers, "digest": f.digest}),
                    );
                }
            }
            Known::Offline { .. } => failed.push(format!("agent {agent} is offline")),
            Known::Failed(e) => failed.push(e),
        }
    }
    if ctx.json {
        output::json(&Value::Array(rows))?;
    } else {
        let mut t = output::table(&["agent", "name", "version", "state", "mode", "readers"]);
        for r in &rows {
            t.add_row(["agent", "name", "version", "state", "mode", "readers"].map(|k| output::cell(&r[k])));
        }
        output::print(&t)?;
    }
    for f in &failed {
        eprintln!("keelctl: {f}");
    }
    Ok(if failed.is_empty() {
        ExitCode::SUCCESS
    } else {
        ExitCode::from(EXIT_TASK_UNSUCCESSFUL)
    })
}

/// One row of a push or removal report.
fn row(agent: &str, name: &str, action: &str, detail: impl Into<String>) -> Value {
    json!({"agent": agent, "name": name, "action": action, "detail": detail.into()})
}

fn report(ctx: &Ctx, rows: Vec<Value>) -> anyhow::Result<ExitCode> {
    let failed = rows.iter().filter(|r| r["action"] == "failed").count();
    if ctx.json {
        output::json(&Value::Array(rows))?;
    } else {
        let mut t = output::table(&["agent", "name", "action", "detail"]);
        for r in &rows {
            t.add_row(["agent", "name", "action", "detail"].map(|k| output::cell(&r[k])));
        }
        output::print(&t)?;
    }
    Ok(if failed == 0 {
        ExitCode::SUCCESS
    } else {
        ExitCode::from(EXIT_TASK_UNSUCCESSFUL)
    })
}

/// A version above what the host holds and above the last one this keeper used.
fn next_version(held: Option<u64>) -> u64 {
    let now = u64::try_from(keel_common::time::now_ms()).unwrap_or(1);
    now.max(held.map_or(0, |v| v + 1))
}

/// One host's sealed changes, before packing.
#[derive(Debug, Default)]
struct Share {
    agent: String,
    envelopes: Vec<String>,
    files: Vec<Value>,
}

impl Share {
    fn add(&mut self, env: &keel_plugin_file_delivery::envelope::Envelope, removed: bool) -> anyhow::Result<()> {
        self.envelopes.push(serde_json::to_string(env)?);
        self.files
            .push(json!({"name": env.name, "version": env.version, "removed": removed}));
        Ok(())
    }
}

/// The files to push, read.
fn read_files(args: &FilesPushArgs) -> anyhow::Result<Vec<(String, Vec<u8>)>> {
    let mut files = Vec::new();
    for f in &args.files {
        let (name, path) = f
            .split_once('=')
            .ok_or_else(|| usage(format!("{f:?}: give files as NAME=PATH")))?;
        check_name(name).map_err(|m| usage(format!("{f:?}: {m}")))?;
        if files.iter().any(|(n, _)| n == name) {
            return Err(usage(format!("{name} is given twice")));
        }
        let content = std::fs::read(path).with_context(|| format!("{name}: cannot read {path}"))?;
        if content.len() > MAX_FILE_BYTES {
            return Err(usage(format!(
                "{name}: {path} is {} bytes; at most {MAX_FILE_BYTES} are delivered",
                content.len()
            )));
        }
        files.push((name.to_owned(), content));
    }
    Ok(files)
}

async fn push(ctx: &Ctx, args: &FilesPushArgs) -> anyhow::Result<ExitCode> {
    check_target(&args.target)?;
    parse_mode(&args.mode).map_err(|m| usage(format!("--mode: {m}")))?;
    let keeper = load_keeper(&args.keeper_key)?;
    let files = read_files(args)?;
    let hosts = hosts(ctx, &args.target).await?;
    // Sealing is the keeper's work: spread over the cores, host by host.
    let sealed = seal_all(&hosts, |agent, host_key, held, rows| {
        let mut share = Share {
            agent: agent.to_owned(),
            ..Share::default()
        };
        for (name, content) in &files {
            let have = held.and_then(|h| h.iter().find(|i| &i.name == name));
            let digest = keeper.digest_for(host_key, content);
            if have.is_some_and(|h| h.holds(&digest, &args.mode, &args.readers)) {
                rows.push(row(
                    agent,
                    name,
                    "unchanged",
                    "not sent: the host holds this content, mode and readers",
                ));
                continue;
            }
            let spec = FileSpec {
                name: name.clone(),
                mode: args.mode.clone(),
                readers: args.readers.clone(),
            };
            let env = keeper
                .seal(host_key, &spec, content, next_version(have.map(|h| h.version)))
                .map_err(|m| usage(format!("{name}: {m}")))?;
            share.add(&env, false)?;
        }
        Ok(share)
    })?;
    send_and_wait(ctx, &args.target, sealed).await
}

async fn remove(ctx: &Ctx, args: &FilesRemoveArgs) -> anyhow::Result<ExitCode> {
    check_target(&args.target)?;
    for (i, n) in args.names.iter().enumerate() {
        check_name(n).map_err(|m| usage(format!("{n:?}: {m}")))?;
        if args.names[..i].contains(n) {
            return Err(usage(format!("{n} is given twice")));
        }
    }
    let keeper = load_keeper(&args.keeper_key)?;
    let hosts = hosts(ctx, &args.target).await?;
    let sealed = seal_all(&hosts, |agent, host_key, held, _| {
        let mut share = Share {
            agent: agent.to_owned(),
            ..Share::default()
        };
        for name in &args.names {
            let have = held.and_then(|h| h.iter().find(|i| &i.name == name));
            let env = keeper
                .removal(host_key, name, next_version(have.map(|h| h.version)))
                .map_err(|m| usage(format!("{name}: {m}")))?;
            share.add(&env, true)?;
        }
        Ok(share)
    })?;
    send_and_wait(ctx, &args.target, sealed).await
}

/// Each host's share and the rows already known (unchanged files, hosts that
/// cannot be sent to).
type Sealed = (Vec<Share>, Vec<Value>);

/// Runs `seal` for every host with a key, spread over the cores.
fn seal_all<F>(hosts: &[(String, Known)], seal: F) -> anyhow::Result<Sealed>
where
    F: Fn(&str, &str, Option<&[Item]>, &mut Vec<Value>) -> anyhow::Result<Share> + Sync,
{
    let mut rows = Vec::new();
    let mut work = Vec::new();
    for (agent, known) in hosts {
        match known {
            Known::Online { host_key, held } => work.push((agent.as_str(), host_key.as_str(), Some(held.as_slice()))),
            Known::Offline { host_key } => work.push((agent.as_str(), host_key.as_str(), None)),
            Known::Failed(e) => rows.push(row(agent, "-", "failed", e.clone())),
        }
    }
    let threads = std::thread::available_parallelism().map_or(1, std::num::NonZero::get);
    let chunk = work.len().div_ceil(threads).max(1);
    let done: Vec<anyhow::Result<(Vec<Share>, Vec<Value>)>> = std::thread::scope(|scope| {
        let handles: Vec<_> = work
            .chunks(chunk)
            .map(|hosts| {
                let seal = &seal;
                scope.spawn(move || {
                    let mut shares = Vec::new();
                    let mut rows = Vec::new();
                    for (agent, key, held) in hosts {
                        shares.push(seal(agent, key, *held, &mut rows)?);
                    }
                    Ok((shares, rows))
                })
            })
            .collect();
        handles
            .into_iter()
            .map(|h| h.join().unwrap_or_else(|_| Err(anyhow!("a sealing thread panicked"))))
            .collect()
    });
    let mut shares = Vec::new();
    for d in done {
        let (s, r) = d?;
        shares.extend(s.into_iter().filter(|s| !s.envelopes.is_empty()));
        rows.extend(r);
    }
    Ok((shares, rows))
}

/// The most bytes of shares one push request carries; a larger push is sent in
/// several.
const REQUEST_BYTES: usize = 32 << 20;

/// Hands the server one push of every share, then waits for it to settle,
/// showing each agent's progress.
async fn send_and_wait(ctx: &Ctx, target: &FilesTarget, (shares, mut rows): Sealed) -> anyhow::Result<ExitCode> {
    if shares.is_empty() {
        return report(ctx, rows);
    }
    let mut batches: Vec<Vec<Value>> = vec![Vec::new()];
    let mut size = 0;
    for s in &shares {
        let parts = pack(&s.envelopes);
        let bytes: usize = parts.iter().map(String::len).sum();
        if size + bytes > REQUEST_BYTES && batches.last().is_some_and(|b| !b.is_empty()) {
            batches.push(Vec::new());
            size = 0;
        }
        size += bytes;
        if let Some(b) = batches.last_mut() {
            b.push(json!({"agent": s.agent, "parts": parts, "files": s.files}));
        }
    }
    let limit = Duration::from_secs(120);
    let mut batches = batches.into_iter();
    let first = json!({"agents": batches.next().unwrap_or_default(), "part_timeout_secs": target.timeout});
    let created = ctx
        .client
        .call_within(Method::POST, &["files", "pushes"], Some(&first), limit)
        .await?;
    let id = created["id"]
        .as_str()
        .ok_or_else(|| anyhow!("the server answered no push ID"))?
        .to_owned();
    for b in batches {
        ctx.client
            .call_within(
                Method::POST,
                &["files", "pushes", &id, "agents"],
                Some(&json!({"agents": b})),
                limit,
            )
            .await?;
    }
    let progress = wait(ctx, &id, shares.len()).await?;
    for share in progress["agents"].as_array().into_iter().flatten() {
        rows.extend(share_rows(&id, share));
    }
    report(ctx, rows)
}

/// Long-polls the push until it settles; each agent's end goes to stderr as it
/// comes (not with `--json`).
async fn wait(ctx: &Ctx, id: &str, agents: usize) -> anyhow::Result<Value> {
    let mut since = 0_i64;
    let mut shown = std::collections::HashSet::new();
    loop {
        let p = ctx
            .client
            .get(
                &["files", "pushes", id],
                &[("since", since.to_string()), ("wait_secs", "25".into())],
            )
            .await?;
        since = p["revision"].as_i64().unwrap_or(since);
        if !ctx.json {
            for s in p["agents"].as_array().into_iter().flatten() {
                let agent = s["agent_id"].as_str().unwrap_or_default();
                let state = s["state"].as_str().unwrap_or_default();
                let ended = matches!(state, "done" | "failed") || (state == "waiting" && s["online"] == false);
                if ended && shown.insert(agent.to_owned()) {
                    let what = match state {
                        "done" => format!("done, {} files", s["files"].as_array().map_or(0, Vec::len)),
                        "failed" => format!("failed: {}", s["detail"].as_str().unwrap_or_default()),
                        _ => "offline: sent when it reconnects".to_owned(),
                    };
                    eprintln!("[{}/{agents}] {agent}: {what}", shown.len());
                }
            }
        }
        if p["settled"] == true {
            return Ok(p);
        }
    }
}

/// The report rows of one agent's share.
fn share_rows(id: &str, share: &Value) -> Vec<Value> {
    let agent = share["agent_id"].as_str().unwrap_or_default();
    let state = share["state"].as_str().unwrap_or_default();
    let results = share["results"].as_array().cloned().unwrap_or_default();
    let mut rows = Vec::new();
    for f in share["files"].as_array().into_iter().flatten() {
        let name = f["name"].as_str().unwrap_or_default();
        let removal = f["removed"] == true;
        let result = results.iter().rev().find(|r| r["name"] == name);
        let r = match (result, state) {
            (Some(r), _) if r["error"].is_string() => {
                row(agent, name, "failed", r["error"].as_str().unwrap_or_default())
            }
            (Some(r), _) => {
                let action = r["action"].as_str().unwrap_or_default();
                let detail = format!("{name}: {action} (version {})", r["version"]);
                row(agent, name, if removal { "removed" } else { "sent" }, detail)
            }
            (None, "failed") => row(agent, name, "failed", share["detail"].as_str().unwrap_or_default()),
            (None, _) => row(
                agent,
                name,
                "queued",
                format!("agent offline: push {id} sends it when the agent reconnects"),
            ),
        };
        rows.push(r);
    }
    rows
}

async fn status(ctx: &Ctx, args: &FilesStatusArgs) -> anyhow::Result<ExitCode> {
    let mut q = Vec::new();
    if let Some(a) = &args.agent {
        q.push(("agent", a.clone()));
    }
    if let Some(n) = &args.name {
        q.push(("name", n.clone()));
    }
    if args.behind {
        q.push(("behind", "true".to_owned()));
    }
    let rows = ctx.client.get(&["files", "status"], &q).await?;
    let rows = rows.as_array().cloned().unwrap_or_default();
    let behind = rows.iter().filter(|r| r["behind"] == true).count();
    if ctx.json {
        output::json(&Value::Array(rows))?;
    } else {
        let cols = [
            "agent_id",
            "name",
            "wanted_version",
            "held_version",
            "held_state",
            "behind",
        ];
        let mut t = output::table(&["agent", "name", "pushed", "held", "state", "behind"]);
        for r in &rows {
            t.add_row(cols.map(|k| output::cell(&r[k])));
        }
        output::print(&t)?;
        eprintln!("{behind} of {} behind", rows.len());
    }
    Ok(ExitCode::SUCCESS)
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    fn target(dir: &Path) -> FilesTarget {
        FilesTarget {
            agents: vec!["a1".into()],
            tag: None,
            all: false,
            known_hosts: Some(dir.join("hosts.json")),
            accept_host_key: None,
            trust_new_hosts: false,
            timeout: 1,
        }
    }

    #[test]
    fn host_keys_are_pinned_and_changes_refused() {
        let dir = tempfile::tempdir().unwrap();
        let (k1, k2) = ("11".repeat(32), "22".repeat(32));
        let mut t = target(dir.path());
        let mut known = KnownHosts::load(&t, &ProcessEnv).unwrap();
        let e = known.check(&t, "a1", &k1).unwrap_err().to_string();
        assert!(e.contains("not pinned") && e.contains("nothing was sent"), "{e}");
        t.accept_host_key = Some(k2.clone());
        let e = known.check(&t, "a1", &k1).unwrap_err().to_string();
        assert!(e.contains("not the"), "{e}");
        t.accept_host_key = Some(k1.clone());
        known.check(&t, "a1", &k1).unwrap();
        let meta = std::fs::metadata(dir.path().join("hosts.json")).unwrap();
        assert_eq!(meta.permissions().mode() & 0o777, 0o600);

        let t = target(dir.path());
        let mut known = KnownHosts::load(&t, &ProcessEnv).unwrap();
        known.check(&t, "a1", &k1).unwrap();
        let e = known.check(&t, "a1", &k2).unwrap_err().to_string();
        assert!(e.contains("the host key changed"), "{e}");
        let mut tofu = target(dir.path());
        tofu.trust_new_hosts = true;
        let e = known.check(&tofu, "a1", &k2).unwrap_err().to_string();
        assert!(
            e.contains("the host key changed"),
            "trust-new-hosts never replaces a pin: {e}"
        );
        known.check(&tofu, "a2", &k2).unwrap();
        assert_eq!(KnownHosts::load(&t, &ProcessEnv).unwrap().keys.get("a2"), Some(&k2));
    }

    #[test]
    fn keeper_keys_are_private_and_never_overwritten() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("keeper.key");
        keygen(&path).unwrap();
        assert_eq!(std::fs::metadata(&path).unwrap().permissions().mode() & 0o777, 0o600);
        let keeper = load_keeper(&path).unwrap();
        assert!(keygen(&path).unwrap_err().to_string().contains("never overwritten"));
        std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o644)).unwrap();
        let e = load_keeper(&path).unwrap_err().to_string();
        assert!(e.contains("open to others (mode 0644)"), "{e}");
        std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o600)).unwrap();
        assert_eq!(load_keeper(&path).unwrap().public_hex(), keeper.public_hex());
        std::fs::write(&path, "nonsense").unwrap();
        assert!(
            load_keeper(&path)
                .unwrap_err()
                .to_string()
                .contains("not a 32-byte hex key")
        );
    }

    #[test]
    fn versions_only_grow() {
        let now = next_version(None);
        assert!(next_version(Some(u64::MAX - 1)) == u64::MAX);
        assert!(next_version(Some(1)) >= now);
    }
}
