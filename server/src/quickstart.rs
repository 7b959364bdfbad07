//! `keel-server quickstart`: a server on embedded defaults plus one local agent,
//! all state in one directory, running until Ctrl-C. A second run reuses the state.

use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::time::{Duration, Instant};

use anyhow::{Context, bail};
use tokio::process::{Child, Command};
use tokio_util::sync::CancellationToken;

use crate::config::ServerConfig;
use crate::state::ServerState;
use crate::store::Role;
use crate::{admin, serve};

/// How the quickstart is laid out.
#[derive(Debug, Clone)]
pub struct Options {
    /// State directory, `./.keel-quickstart` by default.
    pub dir: PathBuf,
    /// The `keel-agent` binary.
    pub agent_bin: PathBuf,
    /// gRPC port on 127.0.0.1.
    pub grpc_port: u16,
    /// HTTP port on 127.0.0.1.
    pub http_port: u16,
}

/// Files and settings derived from [`Options`].
struct Layout {
    server_toml: PathBuf,
    agent_toml: PathBuf,
    admin_token: PathBuf,
    ready: PathBuf,
    agent_state: PathBuf,
}

impl Layout {
    fn new(dir: &Path) -> Self {
        Self {
            server_toml: dir.join("server.toml"),
            agent_toml: dir.join("agent.toml"),
            admin_token: dir.join("admin.token"),
            ready: dir.join("server").join("ready.json"),
            agent_state: dir.join("agent"),
        }
    }
}

fn write_if_missing(path: &Path, text: &str) -> anyhow::Result<()> {
    if !path.exists() {
        keel_common::fsutil::write_public(path, text.as_bytes())
            .with_context(|| format!("cannot write {}", path.display()))?;
    }
    Ok(())
}

fn toml_str(p: &Path) -> String {
    toml::Value::String(p.display().to_string()).to_string()
}

/// Loads (creating on first run) the quickstart's server configuration.
pub fn server_config(opts: &Options) -> anyhow::Result<ServerConfig> {
    let dir = &opts.dir;
    keel_common::fsutil::create_dir(dir, 0o700).with_context(|| format!("cannot create {}", dir.display()))?;
    let layout = Layout::new(dir);
    write_if_missing(
        &layout.server_toml,
        &format!(
            "# keel-server configuration written by the quickstart.\n\
             data_dir = {data}\n\n\
             [grpc]\nlisten = \"127.0.0.1:{grpc}\"\n\n\
             [tunnel]\nlisten = \"127.0.0.1:6753\"\n\n\
             # Plain HTTP is allowed on loopback only; a browser opens it without warnings.\n\
             [http]\nlisten = \"127.0.0.1:{http}\"\ntls = false\n\n\
             [log]\ndir = {log}\n",
            data = toml_str(&dir.join("server")),
            log = toml_str(&dir.join("server").join("log")),
            grpc = opts.grpc_port,
            http = opts.http_port,
        ),
    )?;
    ServerConfig::load(Some(&layout.server_toml), &Default::default()).map_err(anyhow::Error::from)
}

async fn agent_cmd(opts: &Options, args: &[&str]) -> Command {
    let layout = Layout::new(&opts.dir);
    let mut cmd = Command::new(&opts.agent_bin);
    cmd.args(args)
        .arg("--config")
        .arg(&layout.agent_toml)
        .kill_on_drop(true);
    cmd
}

async fn agent_output(opts: &Options, args: &[&str], env: &[(&str, &str)]) -> anyhow::Result<String> {
    let mut cmd = agent_cmd(opts, args).await;
    for (k, v) in env {
        cmd.env(k, v);
    }
    let out = cmd
        .stderr(Stdio::inherit())
        .output()
        .await
        .with_context(|| format!("cannot run {}", opts.agent_bin.display()))?;
    if !out.status.success() {
        bail!("keel-agent {} failed: {}", args.join(" "), out.status);
    }
    Ok(String::from_utf8_lossy(&out.stdout).trim().to_owned())
}

async fn wait_for(path: &Path, limit: Duration) -> anyhow::Result<()> {
    let start = Instant::now();
    while !path.exists() {
        if start.elapsed() > limit {
            bail!("server did not start within {limit:?}");
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    Ok(())
}

async fn stop_agent(child: &mut Child) {
    if let Some(pid) = child.id().and_then(|p| i32::try_from(p).ok()) {
        let _ = nix::sys::signal::kill(nix::unistd::Pid::from_raw(pid), nix::sys::signal::Signal::SIGTERM);
    }
    if tokio::time::timeout(Duration::from_secs(12), child.wait())
        .await
        .is_err()
    {
        let _ = child.kill().await;
    }
}

/// The feature plugins the repository builds, installed when found next to the binaries.
const PLUGINS: &[&str] = &["key-request", "proxy", "file-delivery"];

/// Uploads every plugin built next to `keel-agent` (as this build's version) and
/// makes them the agent's desired set, through the same path the API uses.
async fn install_plugins(
    state: &std::sync::Arc<ServerState>,
    opts: &Options,
    agent_id: &str,
) -> anyhow::Result<Vec<String>> {
    let bin_dir = opts.agent_bin.parent().map(Path::to_path_buf).unwrap_or_default();
    let version = keel_common::VERSION;
    let mut desired = Vec::new();
    for name in PLUGINS {
        let path = bin_dir.join(name);
        if !path.is_file() {
            continue;
        }
        let meta = crate::components::PackageMeta {
            name: (*name).to_owned(),
            version: version.to_owned(),
            kind: "exec".into(),
            arch: "any".into(),
            signature: None,
            sha256: None,
            by: "quickstart".into(),
        };
        match crate::components::store_file(state, &path, &meta).await {
            Ok(_) | Err(crate::components::ComponentError::Exists { .. }) => {}
            Err(e) => return Err(e.into()),
        }
        let detail = match *name {
            "file-delivery" => file_delivery(&opts.dir)?,
            "proxy" => proxy(&opts.dir, state.tunnel_addr())?,
            _ => String::new(),
        };
        desired.push(crate::policy::DesiredPlugin {
            name: (*name).to_owned(),
            version: version.to_owned(),
            detail,
        });
    }
    if desired.is_empty() {
        return Ok(Vec::new());
    }
    state
        .store
        .set_desired(agent_id, &desired, "quickstart", keel_common::time::now_ms())
        .await?;
    state.push_config(agent_id, None).await?;
    Ok(desired.into_iter().map(|d| d.name).collect())
}

/// file-delivery for the quickstart: a keeper key of its own (`keeper.key`, for
/// `keelctl files push --keeper-key`), pinned in a plugin configuration under the
/// quickstart's directory; returns the plugin's `DETAIL`.
fn file_delivery(dir: &Path) -> anyhow::Result<String> {
    let dir = std::path::absolute(dir).context("the quickstart directory")?;
    let (key, public_path) = (dir.join("keeper.key"), dir.join("keeper.pub"));
    let public = if key.exists() {
        std::fs::read_to_string(&public_path)
            .with_context(|| format!("cannot read {}", public_path.display()))?
            .trim()
            .to_owned()
    } else {
        crate::release::generate_pair(&key, &public_path)?
    };
    let fd = dir.join("file-delivery");
    keel_common::fsutil::create_dir(&fd, 0o700).with_context(|| format!("cannot create {}", fd.display()))?;
    let config = fd.join("file-delivery.toml");
    let text = format!(
        "# Written by the quickstart: its keeper key, and files under {fd}.\n\
         keeper_keys = [\"{public}\"]\nfiles_dir = {files:?}\nstate_dir = {state:?}\nlisten = \"127.0.0.1:2080\"\n",
        fd = fd.display(),
        files = fd.join("files").display().to_string(),
        state = fd.join("state").display().to_string(),
    );
    // Kept once written: an operator's edits survive the next run.
    if !config.exists() {
        keel_common::fsutil::write_private(&config, text.as_bytes())
            .with_context(|| format!("cannot write {}", config.display()))?;
    }
    Ok(serde_json::json!({ "config": config }).to_string())
}

/// proxy for the quickstart: the agent's own certificate at the quickstart's
/// tunnel endpoint, and an allow list that reaches nothing until edited; returns
/// the plugin's `DETAIL`.
fn proxy(dir: &Path, tunnel: std::net::SocketAddr) -> anyhow::Result<String> {
    let dir = std::path::absolute(dir).context("the quickstart directory")?;
    let pki = Layout::new(&dir).agent_state.join("pki");
    let conf = dir.join("proxy");
    keel_common::fsutil::create_dir(&conf, 0o700).with_context(|| format!("cannot create {}", conf.display()))?;
    let config = conf.join("proxy.toml");
    let text = format!(
        "# Written by the quickstart. Add what audit jobs may reach, e.g. \"127.0.0.1:8443\".\n\
         allow = []\ntunnel = \"{tunnel}\"\nca_file = {ca:?}\ncert_file = {cert:?}\nkey_file = {key:?}\n",
        ca = pki.join("ca.pem").display().to_string(),
        cert = pki.join("agent.pem").display().to_string(),
        key = pki.join("agent.key").display().to_string(),
    );
    // Kept once written: an operator's allow list survives the next run.
    if !config.exists() {
        keel_common::fsutil::write_private(&config, text.as_bytes())
            .with_context(|| format!("cannot write {}", config.display()))?;
    }
    Ok(serde_json::json!({ "config": config }).to_string())
}

/// Runs the quickstart until `shutdown`.
pub async fn run(opts: Options, shutdown: CancellationToken) -> anyhow::Result<()> {
    if !opts.agent_bin.exists() {
        bail!(
            "keel-agent binary not found at {} (build the workspace first)",
            opts.agent_bin.display()
        );
    }
    let layout = Layout::new(&opts.dir);
    let config = prepare(&opts, &layout).await?;
    let _ = std::fs::remove_file(&layout.ready);
    let state = serve::open_state(config.clone()).await?;
    let server_stop = shutdown.child_token();
    let server = tokio::spawn(serve::run_with_state(
        std::sync::Arc::clone(&state),
        server_stop.clone(),
        Some(layout.ready.clone()),
    ));
    wait_for(&layout.ready, Duration::from_secs(20)).await?;
    let http = format!("http://127.0.0.1:{}", config.http.listen.port());
    enroll_agent(&opts, &layout, &config, &state, &http).await?;
    let agent_id = agent_output(&opts, &["id"], &[]).await?;
    let mut agent = agent_cmd(&opts, &["run"])
        .await
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .context("cannot start keel-agent")?;
    let (online, plugins) = bring_up(&state, &opts, &agent_id).await;
    print_welcome(&opts, &layout, &http, &agent_id, online, &plugins);
    tokio::select! {
        _ = shutdown.cancelled() => {}
        status = agent.wait() => eprintln!("keel-agent exited unexpectedly: {status:?}; stopping"),
    }
    stop_agent(&mut agent).await;
    server_stop.cancel();
    server.await.context("server task")??;
    println!("Keel quickstart stopped. State is kept in {}.", opts.dir.display());
    Ok(())
}

/// The server's configuration, and what a first run makes once: the CA, the
/// admin token, the release key and the agent's configuration.
async fn prepare(opts: &Options, layout: &Layout) -> anyhow::Result<ServerConfig> {
    let config = server_config(opts)?;
    if !config.pki_dir().join(crate::pki::CA_KEY).exists() {
        admin::ca_init(&config, &[])?;
    }
    if !layout.admin_token.exists() {
        let token = admin::token_create(&config, Some(Role::Admin), None, 1, "quickstart admin").await?;
        admin::write_token_file(&layout.admin_token, &token)?;
    }
    if !config.pki_dir().join(crate::release::KEY_FILE).exists() {
        admin::release_key(&config)?;
    }
    let release = crate::release::Release::load(&config)?;
    write_if_missing(
        &layout.agent_toml,
        &format!(
            "# keel-agent configuration written by the quickstart.\n\
             [agent]\nstate_dir = {state}\nlog_dir = {log}\n\n\
             [server]\nprivate = [\"127.0.0.1:{grpc}\"]\n\n\
             # Plugin packages must be signed with this server's release key.\n\
             [plugins]\nrelease_public_key = \"{key}\"\n",
            state = toml_str(&layout.agent_state),
            log = toml_str(&layout.agent_state.join("log")),
            grpc = opts.grpc_port,
            key = release.public_hex().unwrap_or_default(),
        ),
    )?;
    Ok(config)
}

/// Enrolls the agent with a one-time token, unless it is enrolled already.
async fn enroll_agent(
    opts: &Options,
    layout: &Layout,
    config: &ServerConfig,
    state: &ServerState,
    http: &str,
) -> anyhow::Result<()> {
    if !layout.agent_state.join("pki").join("agent.pem").exists() {
        let token = admin::token_create(config, None, Some(Duration::from_secs(600)), 1, "quickstart agent").await?;
        let fp = state.ca.fingerprint().to_owned();
        agent_output(
            opts,
            &["enroll", "--server", http, "--ca-fingerprint", &fp],
            &[("KEEL_ENROLL_TOKEN", token.secret.expose())],
        )
        .await?;
    }
    Ok(())
}

/// Waits up to 30 s for the agent's stream, then installs the plugins built
/// next to the server. Says how each went.
async fn bring_up(state: &std::sync::Arc<ServerState>, opts: &Options, agent_id: &str) -> (&'static str, String) {
    let start = Instant::now();
    while !state.connections.is_online(agent_id) && start.elapsed() < Duration::from_secs(30) {
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let online = if state.connections.is_online(agent_id) {
        "online"
    } else {
        "not online yet; see its log"
    };
    let plugins = match install_plugins(state, opts, agent_id).await {
        Ok(names) if names.is_empty() => "none built yet".to_owned(),
        Ok(names) => names.join(", "),
        Err(e) => format!("not installed: {e:#}"),
    };
    (online, plugins)
}

/// Tells the operator where everything is and what to try.
fn print_welcome(opts: &Options, layout: &Layout, http: &str, agent_id: &str, online: &str, plugins: &str) {
    let token_path = layout.admin_token.display();
    println!(
        "\nKeel quickstart is running.\n\
         \n  console:      {http}/  (sign in with the admin token)\
         \n  API:          {http}/api/v1/agents\
         \n  admin token:  {token_path}\
         \n  agent:        {agent_id} ({online}; logs in {agent_log})\
         \n  plugins:      {plugins}\
         \n  keeper key:   {keeper} (keelctl files push --keeper-key {keeper} …)\
         \n  server logs:  {server_log}\
         \n\nTry:\
         \n  curl -s -H \"Authorization: Bearer $(cat {token_path})\" {http}/api/v1/agents\
         \n  curl -s -H \"Authorization: Bearer $(cat {token_path})\" {http}/api/v1/agents/{agent_id}\
         \n  curl -s -H \"Authorization: Bearer $(cat {token_path})\" -X POST {http}/api/v1/agents/{agent_id}/tasks \\\
         \n       -d '{{\"data_type\":1051,\"data\":\"{{\\\"idc\\\":\\\"lab\\\"}}\"}}' -H 'Content-Type: application/json'\
         \n\nPress Ctrl-C to stop.",
        agent_log = layout.agent_state.join("log").display(),
        keeper = opts.dir.join("keeper.key").display(),
        server_log = opts.dir.join("server").join("log").display(),
    );
}
