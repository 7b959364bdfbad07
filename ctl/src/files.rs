//! `keelctl files`: the keeper of file-delivery.
//!
//! The keeper holds the operator's Ed25519 key and the files; the server only
//! relays. For each agent it asks the plugin for its inventory (6201: the host key
//! and the digest of every file it holds), checks the host key against the pinned
//! one, and sends (6200) only the files whose digest differs, each sealed to that
//! host key and signed ([`keel_plugin_file_delivery::envelope`]).
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
use std::time::{Duration, Instant};

use anyhow::{Context, anyhow, bail};
use keel_plugin_file_delivery::envelope::{FileSpec, Keeper, check_name, parse_mode};
use keel_proto::data_type::{FILE_DELIVER, FILE_INVENTORY, FILE_REMOVE};
use reqwest::Method;
use serde::Deserialize;
use serde_json::{Value, json};

use crate::cli::{FilesCmd, FilesPushArgs, FilesRemoveArgs, FilesTarget};
use crate::config::{Env, ProcessEnv};
use crate::{Ctx, EXIT_TASK_UNSUCCESSFUL, output, usage};

const PLUGIN: &str = "file-delivery";
/// How often a task's result is polled.
const POLL: Duration = Duration::from_millis(100);

/// Runs a `files` command.
pub async fn run(ctx: &Ctx, cmd: FilesCmd) -> anyhow::Result<ExitCode> {
    match cmd {
        FilesCmd::Keygen { out } => keygen(&out).map(|()| ExitCode::SUCCESS),
        FilesCmd::List(target) => list(ctx, &target).await,
        FilesCmd::Push(args) => push(ctx, &args).await,
        FilesCmd::Remove(args) => remove(ctx, &args).await,
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

/// Sends a task to the agent's file-delivery plugin and waits for its result.
async fn ask(ctx: &Ctx, agent: &str, data_type: i32, data: &str, timeout: Duration) -> anyhow::Result<Value> {
    // The server ends the task at the same deadline this waits for.
    let body =
        json!({"data_type": data_type, "object_name": PLUGIN, "data": data, "timeout_secs": timeout.as_secs().max(1)});
    let created = ctx
        .client
        .call(Method::POST, &["agents", agent, "tasks"], Some(&body))
        .await?;
    let token = created["token"]
        .as_str()
        .ok_or_else(|| anyhow!("the server answered no task token"))?;
    let start = Instant::now();
    loop {
        let task = ctx.client.get(&["tasks", token], &[]).await?;
        match task["status"].as_str() {
            Some("succeeded") => return Ok(task["result"].clone()),
            Some("sent" | "pending") if start.elapsed() < timeout => tokio::time::sleep(POLL).await,
            Some("sent" | "pending") => bail!("agent {agent} did not answer within {} s", timeout.as_secs()),
            _ => bail!(
                "{}",
                task["result"]["msg"].as_str().unwrap_or("failed without a message")
            ),
        }
    }
}

/// The agent's host key (checked against the pin) and its files.
async fn inventory(
    ctx: &Ctx,
    target: &FilesTarget,
    known: &mut KnownHosts,
    agent: &str,
) -> anyhow::Result<(String, Vec<Item>)> {
    let result = ask(ctx, agent, FILE_INVENTORY, "{}", Duration::from_secs(target.timeout)).await?;
    let host_key = result["host_key"]
        .as_str()
        .filter(|k| k.len() == 64 && k.bytes().all(|b| b.is_ascii_hexdigit()))
        .ok_or_else(|| anyhow!("agent {agent}: the inventory carries no valid host_key"))?
        .to_owned();
    let files: Vec<Item> = serde_json::from_str(result["files"].as_str().unwrap_or("[]"))
        .with_context(|| format!("agent {agent}: the inventory's files are not a list"))?;
    known.check(target, agent, &host_key)?;
    Ok((host_key, files))
}

fn check_target(target: &FilesTarget) -> anyhow::Result<()> {
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
    let mut known = KnownHosts::load(target, &ProcessEnv)?;
    let mut rows = Vec::new();
    for agent in &target.agents {
        let (host_key, files) = inventory(ctx, target, &mut known, agent).await?;
        for f in files {
            rows.push(
                json!({"agent": agent, "host_key": host_key, "name": f.name, "version": f.version,
                             "state": f.state, "mode": f.mode, "readers": f.readers, "digest": f.digest}),
            );
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
    Ok(ExitCode::SUCCESS)
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

/// Each agent's checked host key and files; an agent whose inventory failed gets
/// its row in `rows` instead.
async fn hosts(
    ctx: &Ctx,
    target: &FilesTarget,
    rows: &mut Vec<Value>,
) -> anyhow::Result<Vec<(String, String, Vec<Item>)>> {
    let mut known = KnownHosts::load(target, &ProcessEnv)?;
    let mut out = Vec::new();
    for agent in &target.agents {
        match inventory(ctx, target, &mut known, agent).await {
            Ok((host_key, held)) => out.push((agent.clone(), host_key, held)),
            Err(e) => rows.push(row(agent, "-", "failed", format!("{e:#}"))),
        }
    }
    Ok(out)
}

/// A version above what the host holds and above the last one this keeper used.
fn next_version(held: Option<u64>) -> u64 {
    let now = u64::try_from(keel_common::time::now_ms()).unwrap_or(1);
    now.max(held.map_or(0, |v| v + 1))
}

async fn push(ctx: &Ctx, args: &FilesPushArgs) -> anyhow::Result<ExitCode> {
    check_target(&args.target)?;
    parse_mode(&args.mode).map_err(|m| usage(format!("--mode: {m}")))?;
    let keeper = load_keeper(&args.keeper_key)?;
    let mut files = Vec::new();
    for f in &args.files {
        let (name, path) = f
            .split_once('=')
            .ok_or_else(|| usage(format!("{f:?}: give files as NAME=PATH")))?;
        check_name(name).map_err(|m| usage(format!("{f:?}: {m}")))?;
        let content = std::fs::read(path).with_context(|| format!("{name}: cannot read {path}"))?;
        files.push((name.to_owned(), content));
    }
    let timeout = Duration::from_secs(args.target.timeout);
    let mut rows = Vec::new();
    for (agent, host_key, held) in hosts(ctx, &args.target, &mut rows).await? {
        let agent = agent.as_str();
        for (name, content) in &files {
            let have = held.iter().find(|i| &i.name == name);
            let digest = keeper.digest_for(&host_key, content);
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
            let sealed = keeper
                .seal(&host_key, &spec, content, next_version(have.map(|h| h.version)))
                .map_err(|m| usage(format!("{name}: {m}")))?;
            let data = serde_json::to_string(&sealed)?;
            match ask(ctx, agent, FILE_DELIVER, &data, timeout).await {
                Ok(r) => rows.push(row(agent, name, "sent", r["msg"].as_str().unwrap_or_default())),
                Err(e) => rows.push(row(agent, name, "failed", format!("{e:#}"))),
            }
        }
    }
    report(ctx, rows)
}

async fn remove(ctx: &Ctx, args: &FilesRemoveArgs) -> anyhow::Result<ExitCode> {
    check_target(&args.target)?;
    for n in &args.names {
        check_name(n).map_err(|m| usage(format!("{n:?}: {m}")))?;
    }
    let keeper = load_keeper(&args.keeper_key)?;
    let timeout = Duration::from_secs(args.target.timeout);
    let mut rows = Vec::new();
    for (agent, host_key, held) in hosts(ctx, &args.target, &mut rows).await? {
        let agent = agent.as_str();
        for name in &args.names {
            let version = next_version(held.iter().find(|i| &i.name == name).map(|h| h.version));
            let env = keeper
                .removal(&host_key, name, version)
                .map_err(|m| usage(format!("{name}: {m}")))?;
            match ask(ctx, agent, FILE_REMOVE, &serde_json::to_string(&env)?, timeout).await {
                Ok(r) => rows.push(row(agent, name, "removed", r["msg"].as_str().unwrap_or_default())),
                Err(e) => rows.push(row(agent, name, "failed", format!("{e:#}"))),
            }
        }
    }
    report(ctx, rows)
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    fn target(dir: &Path) -> FilesTarget {
        FilesTarget {
            agents: vec!["a1".into()],
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
