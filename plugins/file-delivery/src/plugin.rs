//! The plugin at run time: the main thread answers tasks one at a time (so the
//! index sees one change at a time), and a thread runs the local file server.
//!
//! With an invalid configuration the plugin does not exit (the agent would only
//! restart it into the same error): it reports the error once and refuses every
//! task with it.

use std::sync::Arc;

use keel_plugin_sdk::data_type::{FILE_DELIVER, FILE_EVENT, FILE_HOST_KEY, FILE_INVENTORY, FILE_REMOVE, TASK_RESULT};
use keel_plugin_sdk::{Client, Error, Task};

use crate::config::{self, Config};
use crate::envelope::{Envelope, HostKey, Op};
use crate::server;
use crate::store::{Outcome, Store};

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
    client.send(FILE_HOST_KEY, [("host_key", host.public_hex())])?;
    tracing::info!(
        host_key = %host.public_hex(),
        files_dir = %config.files_dir.display(),
        file_server = %listening.map(|a| a.to_string()).unwrap_or_else(|| "off".into()),
        keepers = config.keeper_keys.len(),
        "file-delivery ready"
    );
    client.flush()?;
    while let Some(task) = client.next_task()? {
        if task.data_type == FILE_INVENTORY {
            inventory(client, store, host, &task.token)?;
            continue;
        }
        match handle(client, config, store, host, &task) {
            Ok(msg) => client.task_result(&task.token, true, &msg)?,
            Err(msg) => {
                tracing::warn!(data_type = task.data_type, error = %msg, "task refused");
                client.task_result(&task.token, false, &msg)?;
            }
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

/// One task; its result message, or why it was refused.
fn handle(client: &Client, config: &Config, store: &Store, host: &HostKey, task: &Task) -> Result<String, String> {
    let op = match task.data_type {
        FILE_DELIVER => Op::Deliver,
        FILE_REMOVE => Op::Remove,
        other => {
            return Err(format!(
                "data_type {other} is not a file-delivery task ({FILE_DELIVER} deliver, {FILE_INVENTORY} inventory, {FILE_REMOVE} remove)"
            ));
        }
    };
    let env = Envelope::parse(&task.data).map_err(|e| e.to_string())?;
    if env.op != op {
        return Err(format!(
            "a {} envelope was sent as task {}; refused",
            if env.op == Op::Deliver { "deliver" } else { "remove" },
            task.data_type
        ));
    }
    let opened = env
        .open(&config.keeper_keys, host)
        .map_err(|e| format!("{}: {e}", env.name))?;
    let outcome = match op {
        Op::Deliver => store.deliver(&env, &opened),
        Op::Remove => store.remove(&env),
    }
    .map_err(|e| e.to_string())?;
    if matches!(outcome, Outcome::Written | Outcome::Removed) {
        tracing::info!(name = %env.name, version = env.version, action = outcome.as_str(), "file changed");
    }
    client
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
    Ok(format!("{}: {} (version {})", env.name, outcome.as_str(), env.version))
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
