//! The plugin at run time: the main thread answers tasks one at a time (so the
//! index sees one change at a time), and a thread runs the local file server.
//!
//! With an invalid configuration the plugin does not exit (the agent would only
//! restart it into the same error): it reports the error once and refuses every
//! task with it.

use std::sync::Arc;

use keel_plugin_sdk::data_type::{FILE_DELIVER, FILE_EVENT, FILE_HOST_KEY, FILE_INVENTORY, FILE_REMOVE, TASK_RESULT};
use keel_plugin_sdk::{Client, Error, Task};

use crate::bundle::Part;
use crate::config::{self, Config};
use crate::envelope::{Envelope, HostKey, Op, Opened};
use crate::server;
use crate::store::{Outcome, Store};
use crate::uploads::Uploads;

/// Runs the plugin until the agent closes the task pipe.
pub fn run(client: Client, detail: &str) -> Result<(), Error> {
    match start(detail) {
        Ok((config, store, host)) => serve(&client, &config, &store, &host),
        Err(msg) => {
            let msg = format!("configuration invalid: {msg}");
            tracing::error!("{msg}: every task is refused until it is fixed");
            client.refuse_all(&msg)
        }
    }
}

/// Reads the configuration and opens the store and the host key.
pub fn start(detail: &str) -> Result<(Config, Arc<Store>, HostKey), String> {
    let path = config::path_from_detail(detail)?;
    let config = config::load(&path)?;
    let store = Store::open(&config.files_dir, &config.state_dir, config.max_files).map_err(|e| e.to_string())?;
    let host = store.host_key().map_err(|e| e.to_string())?;
    Ok((config, Arc::new(store), host))
}

fn serve(client: &Client, config: &Config, store: &Arc<Store>, host: &HostKey) -> Result<(), Error> {
    let listening = match config.listen {
        Some(addr) => start_file_server(addr, Arc::clone(store)),
        None => None,
    };
    let uploads = match Uploads::open(&config.state_dir) {
        Ok(u) => u,
        Err(e) => {
            let msg = format!("cannot open {}/uploads: {e}", config.state_dir.display());
            tracing::error!("{msg}: every task is refused until it is fixed");
            return client.refuse_all(&msg);
        }
    };
    client.send(FILE_HOST_KEY, [("host_key", host.public_hex())])?;
    tracing::info!(
        host_key = %host.public_hex(),
        files_dir = %config.files_dir.display(),
        file_server = %listening.map(|a| a.to_string()).unwrap_or_else(|| "off".into()),
        keepers = config.keeper_keys.len(),
        "file-delivery ready"
    );
    client.flush()?;
    let host = Host {
        client,
        config,
        store,
        key: host,
        uploads,
    };
    while let Some(task) = client.next_task()? {
        match task.data_type {
            FILE_INVENTORY => inventory(client, store, host.key, &task.token)?,
            FILE_DELIVER => host.deliver(&task)?,
            FILE_REMOVE => {
                let outcome = Envelope::parse(&task.data)
                    .map_err(|e| e.to_string())
                    .and_then(|env| match env.op {
                        Op::Remove => Ok(env),
                        Op::Deliver => Err(format!("a deliver envelope was sent as task {FILE_REMOVE}; refused")),
                    });
                match outcome {
                    Ok(env) => host.answer_one(&task.token, &env)?,
                    Err(msg) => {
                        tracing::warn!(data_type = task.data_type, error = %msg, "task refused");
                        client.task_result(&task.token, false, &msg)?;
                    }
                }
            }
            other => client.task_result(
                &task.token,
                false,
                &format!(
                    "data_type {other} is not a file-delivery task ({FILE_DELIVER} deliver, {FILE_INVENTORY} inventory, {FILE_REMOVE} remove)"
                ),
            )?,
        }
    }
    client.flush().or(Ok(()))
}

/// Runs the file server on a thread of its own; its address once bound.
fn start_file_server(addr: std::net::SocketAddr, store: Arc<Store>) -> Option<std::net::SocketAddr> {
    let runtime = match tokio::runtime::Builder::new_current_thread().enable_all().build() {
        Ok(r) => r,
        Err(e) => {
            tracing::error!(error = %e, "file server: no runtime; files are delivered but not served");
            return None;
        }
    };
    let bound = runtime.block_on(server::bind(addr, store));
    let (local, serve) = match bound {
        Ok(b) => b,
        Err(e) => {
            tracing::error!(%addr, error = %e, "file server: cannot listen; files are delivered but not served");
            return None;
        }
    };
    let spawned = std::thread::Builder::new().name("file-server".into()).spawn(move || {
        if let Err(e) = runtime.block_on(serve) {
            tracing::error!(error = %e, "file server stopped");
        }
    });
    spawned.ok().map(|_| local)
}

/// What the plugin works with while it answers tasks.
struct Host<'a> {
    client: &'a Client,
    config: &'a Config,
    store: &'a Store,
    key: &'a HostKey,
    uploads: Uploads,
}

/// One envelope applied.
struct Done {
    name: String,
    version: u64,
    outcome: Outcome,
}

impl Done {
    fn message(&self) -> String {
        format!("{}: {} (version {})", self.name, self.outcome.as_str(), self.version)
    }
}

impl Host<'_> {
    /// A 6200 task: one envelope, a bundle, or a piece of a large one.
    fn deliver(&self, task: &Task) -> Result<(), Error> {
        let envelopes = match Part::parse(&task.data) {
            Ok(Part::One(env)) if env.op == Op::Remove => {
                Err(format!("a remove envelope was sent as task {FILE_DELIVER}; refused"))
            }
            Ok(Part::One(env)) => return self.answer_one(&task.token, &env),
            Ok(Part::Bundle(envs)) => Ok(envs),
            Ok(Part::Piece(piece)) => match self.uploads.add(&piece) {
                Ok(None) => {
                    let msg = format!(
                        "upload {}: piece {} of {} kept",
                        piece.upload,
                        piece.index + 1,
                        piece.count
                    );
                    return self.client.task_result(&task.token, true, &msg);
                }
                Ok(Some(json)) => Envelope::parse(&json).map(|e| vec![e]).map_err(|e| e.to_string()),
                Err(msg) => Err(msg),
            },
            Err(e) => Err(e.to_string()),
        };
        match envelopes {
            Ok(envs) => self.answer_bundle(&task.token, &envs),
            Err(msg) => {
                tracing::warn!(error = %msg, "delivery refused");
                self.client.task_result(&task.token, false, &msg)
            }
        }
    }

    /// Applies one envelope and answers with its outcome alone.
    fn answer_one(&self, token: &str, env: &Envelope) -> Result<(), Error> {
        match self.apply(std::slice::from_ref(env)).pop() {
            Some(Ok(done)) => self.client.task_result(token, true, &done.message()),
            Some(Err(msg)) => {
                tracing::warn!(error = %msg, "delivery refused");
                self.client.task_result(token, false, &msg)
            }
            None => self.client.task_result(token, false, "nothing to apply"),
        }
    }

    /// Applies a bundle and answers with every file's outcome: `files` is
    /// `[{"name", "version", "action"}]`, with `error` in place of `action` for
    /// one refused.
    fn answer_bundle(&self, token: &str, envelopes: &[Envelope]) -> Result<(), Error> {
        let mut files = Vec::with_capacity(envelopes.len());
        let (mut changed, mut unchanged, mut refused) = (0, 0, Vec::new());
        for (env, outcome) in envelopes.iter().zip(self.apply(envelopes)) {
            match outcome {
                Ok(done) => {
                    match done.outcome {
                        Outcome::Written | Outcome::Removed => changed += 1,
                        Outcome::Unchanged | Outcome::Absent => unchanged += 1,
                    }
                    files.push(serde_json::json!({"name": done.name, "version": done.version, "action": done.outcome.as_str()}));
                }
                Err(msg) => {
                    tracing::warn!(name = %env.name, error = %msg, "delivery refused");
                    files.push(serde_json::json!({"name": env.name, "version": env.version, "error": msg}));
                    refused.push(msg);
                }
            }
        }
        let mut msg = format!("{changed} changed, {unchanged} unchanged, {} refused", refused.len());
        if let Some(first) = refused.first() {
            msg.push_str(": ");
            msg.push_str(first);
        }
        let status = if refused.is_empty() { "succeeded" } else { "failed" };
        let files = serde_json::Value::Array(files).to_string();
        self.client.send(
            TASK_RESULT,
            [
                ("token", token),
                ("status", status),
                ("msg", msg.as_str()),
                ("files", files.as_str()),
            ],
        )?;
        self.client.flush()
    }

    /// Checks, opens and applies envelopes in order, each on its own; runs of
    /// deliveries are written together ([`Store::deliver_all`]).
    fn apply(&self, envelopes: &[Envelope]) -> Vec<Result<Done, String>> {
        let opened: Vec<Result<Opened, String>> = envelopes
            .iter()
            .map(|env| {
                env.open(&self.config.keeper_keys, self.key)
                    .map_err(|e| format!("{}: {e}", env.name))
            })
            .collect();
        // Each envelope that opened gets its own outcome below.
        let mut outcomes: Vec<Result<Outcome, String>> = opened
            .iter()
            .map(|o| o.as_ref().map(|_| Outcome::Absent).map_err(Clone::clone))
            .collect();
        let indices: Vec<usize> = (0..envelopes.len()).collect();
        for run in indices.chunk_by(|a, b| envelopes[*a].op == envelopes[*b].op) {
            let ready: Vec<usize> = run.iter().copied().filter(|k| opened[*k].is_ok()).collect();
            if envelopes[run[0]].op == Op::Remove {
                for k in ready {
                    outcomes[k] = self.store.remove(&envelopes[k]).map_err(|e| e.to_string());
                }
                continue;
            }
            let items: Vec<(&Envelope, &Opened)> = ready
                .iter()
                .filter_map(|k| Some((&envelopes[*k], opened[*k].as_ref().ok()?)))
                .collect();
            for (k, result) in ready.iter().zip(self.store.deliver_all(&items)) {
                outcomes[*k] = result.map_err(|e| e.to_string());
            }
        }
        envelopes
            .iter()
            .zip(outcomes)
            .map(|(env, outcome)| {
                let outcome = outcome?;
                if matches!(outcome, Outcome::Written | Outcome::Removed) {
                    tracing::info!(name = %env.name, version = env.version, action = outcome.as_str(), "file changed");
                }
                self.client
                    .send(
                        FILE_EVENT,
                        [
                            ("name", env.name.as_str()),
                            ("action", outcome.as_str()),
                            ("version", &env.version.to_string()),
                            ("keeper", &env.keeper),
                        ],
                    )
                    .map_err(|e| e.to_string())?;
                Ok(Done {
                    name: env.name.clone(),
                    version: env.version,
                    outcome,
                })
            })
            .collect()
    }
}

/// Answers an inventory with a 5100 result that carries the data.
fn inventory(client: &Client, store: &Store, host: &HostKey, token: &str) -> Result<(), Error> {
    let items = store.inventory();
    let files = serde_json::to_string(&items).unwrap_or_else(|_| "[]".into());
    let msg = format!("{} files", items.len());
    let host_key = host.public_hex();
    client.send(
        TASK_RESULT,
        [
            ("token", token),
            ("status", "succeeded"),
            ("msg", msg.as_str()),
            ("host_key", host_key.as_str()),
            ("files", files.as_str()),
        ],
    )?;
    client.flush()
}
