//! file-delivery hosts and a keeper, for tests and benchmarks: real agents
//! running the plugin as the package installs it, and `keelctl files` with a
//! keeper key of its own.

use std::os::unix::fs::PermissionsExt;
use std::path::PathBuf;
use std::process::{Command, Output};

use serde_json::{Value, json};
use tempfile::TempDir;

use crate::{Agent, Server, bin, eventually};

/// An agent running the file-delivery plugin.
#[derive(Debug)]
pub struct FileHost {
    /// The agent.
    pub agent: Agent,
    /// The plugin's configuration file.
    pub config: PathBuf,
    /// Where it writes the delivered files.
    pub files: PathBuf,
    /// Holds the configuration, the files and the plugin's state.
    pub conf: TempDir,
    _plugins: TempDir,
}

impl FileHost {
    /// Starts agent `id` of `server` with the plugin trusting `keeper` (a public
    /// key, hex) and `extra` lines in its configuration, with `tags`; waits until
    /// the plugin runs.
    pub async fn start(server: &Server, id: &str, keeper: &str, extra: &str, tags: &[&str]) -> FileHost {
        let host = Self::launch(server, id, keeper, extra);
        host.ready(server, tags).await;
        host
    }

    /// Starts several at once (agent IDs `ids`), and waits for all of them.
    pub async fn start_all(server: &Server, ids: &[String], keeper: &str, tags: &[&str]) -> Vec<FileHost> {
        let hosts: Vec<FileHost> = ids.iter().map(|id| Self::launch(server, id, keeper, "")).collect();
        futures::future::join_all(hosts.iter().map(|h| h.ready(server, tags))).await;
        hosts
    }

    /// Writes the configuration and starts the agent.
    fn launch(server: &Server, id: &str, keeper: &str, extra: &str) -> FileHost {
        // The plugin as the package installs it: in a directory only root can change.
        let plugins = tempfile::tempdir().expect("tempdir");
        std::fs::set_permissions(plugins.path(), std::fs::Permissions::from_mode(0o755)).expect("chmod");
        std::fs::copy(bin("file-delivery"), plugins.path().join("file-delivery")).expect("copy the plugin");
        let conf = tempfile::tempdir().expect("tempdir");
        let config = conf.path().join("file-delivery.toml");
        let files = conf.path().join("files");
        std::fs::write(
            &config,
            format!(
                "keeper_keys = [\"{keeper}\"]\nfiles_dir = {:?}\nstate_dir = {:?}\n{extra}\n",
                files.display().to_string(),
                conf.path().join("state").display().to_string()
            ),
        )
        .expect("write file-delivery.toml");
        std::fs::set_permissions(&config, std::fs::Permissions::from_mode(0o600)).expect("chmod");
        let detail = json!({ "config": config }).to_string();
        let local = format!(
            "local_dir = {:?}\n[plugins.local.file-delivery]\ndetail = '{detail}'\n",
            plugins.path().display().to_string()
        );
        let mut agent = Agent::enrolled_with(server, id, &local);
        agent.start();
        FileHost {
            agent,
            config,
            files,
            conf,
            _plugins: plugins,
        }
    }

    /// Waits until the agent is online and its plugin runs; sets its tags.
    async fn ready(&self, server: &Server, tags: &[&str]) {
        let id = self.agent.id.as_str();
        let api = server.api();
        api.online(id).await;
        if !tags.is_empty() {
            let (status, body) = api.put_json(&format!("/api/v1/agents/{id}/tags"), &json!(tags)).await;
            assert_eq!(status, 200, "tags: {body}");
        }
        eventually("the file-delivery plugin running", || async {
            let a = api.agent(id).await?;
            a["plugins"]
                .as_array()?
                .iter()
                .any(|p| p["name"] == "file-delivery" && p["state"] == "running")
                .then_some(())
        })
        .await;
    }

    /// The host key as `file-delivery host-key` prints it on the host.
    pub fn host_key(&self) -> String {
        let out = Command::new(bin("file-delivery"))
            .args(["host-key", "--config"])
            .arg(&self.config)
            .output()
            .expect("file-delivery host-key");
        assert!(out.status.success(), "{out:?}");
        String::from_utf8(out.stdout).expect("UTF-8").trim().to_owned()
    }

    /// The plugin's process ID: the agent's child named file-delivery.
    pub fn plugin_pid(&self) -> Option<u32> {
        let agent = self.agent.pid()?.to_string();
        std::fs::read_dir("/proc").ok()?.flatten().find_map(|e| {
            let pid: u32 = e.file_name().to_str()?.parse().ok()?;
            let status = std::fs::read_to_string(e.path().join("status")).ok()?;
            let field = |k: &str| status.lines().find_map(|l| l.strip_prefix(k)).map(str::trim);
            (field("Name:") == Some("file-delivery") && field("PPid:") == Some(agent.as_str())).then_some(pid)
        })
    }
}

/// `keelctl` as a keeper: its own home, keeper key and pinned host keys.
#[derive(Debug)]
pub struct Keeper {
    /// keelctl's home.
    pub home: TempDir,
    /// The keeper's public key, hex.
    pub public: String,
    base_url: String,
    token: String,
}

impl Keeper {
    /// Makes a keeper key for `server`'s API with its admin token.
    pub fn new(server: &Server) -> Keeper {
        let home = tempfile::tempdir().expect("tempdir");
        let out = Command::new(bin("keelctl"))
            .args(["files", "keygen", "--out"])
            .arg(home.path().join("keeper.key"))
            .env_remove("KEEL_SERVER")
            .output()
            .expect("keelctl files keygen");
        assert!(out.status.success(), "keygen needs no server: {out:?}");
        Keeper {
            public: String::from_utf8(out.stdout).expect("UTF-8").trim().to_owned(),
            home,
            base_url: server.base_url(),
            token: server.admin_token.clone(),
        }
    }

    /// The keeper's secret key file.
    pub fn key(&self) -> PathBuf {
        self.home.path().join("keeper.key")
    }

    /// The pinned host keys.
    pub fn pins(&self) -> PathBuf {
        self.home.path().join("config/keel/file-hosts.json")
    }

    /// Runs keelctl with `args`.
    pub fn keelctl(&self, args: &[&str]) -> Output {
        Command::new(bin("keelctl"))
            .env("HOME", self.home.path())
            .env("XDG_CONFIG_HOME", self.home.path().join("config"))
            .env("KEEL_SERVER", &self.base_url)
            .env("KEEL_TOKEN", &self.token)
            .env_remove("KEEL_CA_FILE")
            .args(args)
            .output()
            .expect("keelctl")
    }

    /// `keelctl files push --json` with the keeper key, `target` and `extra`
    /// flags, of `files` (`NAME=PATH`): its exit code and rows.
    pub fn push(&self, target: &[&str], extra: &[&str], files: &[String]) -> (Option<i32>, Vec<Value>) {
        let key = self.key();
        let mut args = vec![
            "files",
            "push",
            "--json",
            "--keeper-key",
            key.to_str().expect("UTF-8 path"),
        ];
        args.extend_from_slice(target);
        args.extend_from_slice(extra);
        args.extend(files.iter().map(String::as_str));
        let out = self.keelctl(&args);
        let rows: Value = serde_json::from_slice(&out.stdout).unwrap_or_else(|e| {
            panic!(
                "not JSON ({e}): {}{}",
                String::from_utf8_lossy(&out.stdout),
                String::from_utf8_lossy(&out.stderr)
            )
        });
        (out.status.code(), rows.as_array().cloned().unwrap_or_default())
    }
}
