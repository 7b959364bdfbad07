//! The plugin at run time: the main thread reads tasks and checks them, the
//! [`Queue`] joins identical lookups, `threads` workers ask the provider, and each
//! waiting task gets its record and its 5100 result.
//!
//! With an invalid configuration the plugin does not exit (the agent would only
//! restart it into the same error): it reports the error once and refuses every
//! task with it.

use std::sync::Arc;
use std::time::Duration;

use keel_plugin_sdk::data_type::TASK_RESULT;
use keel_plugin_sdk::{Client, Error};
use keel_proto::keyproof;

use crate::config::{self, Config};
use crate::provider::{Children, Provider};
use crate::queue::Queue;
use crate::reply::{self, AgentEntry};
use keel_proto::data_type::{KEY_LOOKUP, KEY_PROOF};

use crate::request::{self, Lookup, ProofCheck};

/// How long the plugin keeps answering waiting tasks after the agent closed the
/// task pipe (the agent sends SIGTERM after its `plugin_stop_grace`, 5 s by
/// default; the stop hook then answers what is left).
pub const DRAIN_LIMIT: Duration = Duration::from_secs(10);
/// The answer to tasks still waiting when the plugin stops.
const STOPPING: &str = "key-request is stopping";

/// A task waiting for a lookup.
#[derive(Debug)]
struct Waiter {
    token: String,
    proof: Option<ProofCheck>,
}

/// Runs the plugin until the agent closes the task pipe or a stop signal arrives
/// (the SDK's stop handling runs [`stop`] then).
pub fn run(client: Client, detail: &str) -> Result<(), Error> {
    match config::parse(detail) {
        Ok(config) => serve(client, config),
        Err(e) => {
            let msg = format!("configuration invalid: {e}");
            tracing::error!(error = %e, "configuration invalid: every task is refused until it is fixed");
            client.refuse_all(&msg)
        }
    }
}

fn serve(client: Client, config: Config) -> Result<(), Error> {
    let children = Arc::new(Children::default());
    let provider = Arc::new(Provider::new(&config, Arc::clone(&children)));
    provider.check_at_start();
    let queue: Arc<Queue<Lookup, Waiter>> = Arc::new(Queue::new(config.queue_size));
    for i in 0..config.threads {
        let (client, provider, queue) = (client.clone(), Arc::clone(&provider), Arc::clone(&queue));
        std::thread::Builder::new()
            .name(format!("lookup-{i}"))
            .spawn(move || work(&client, &provider, &queue))
            .map_err(Error::Io)?;
    }
    {
        let (client, queue, children) = (client.clone(), Arc::clone(&queue), Arc::clone(&children));
        client.clone().on_stop(move || stop(&client, &queue, &children));
    }
    tracing::info!(
        socket = config
            .socket
            .as_ref()
            .map(|p| p.display().to_string())
            .unwrap_or_default(),
        exec = config.exec.as_ref().map(|c| c.program.as_str()).unwrap_or(""),
        threads = config.threads,
        queue_size = config.queue_size,
        timeout_s = config.timeout.as_secs(),
        "key-request ready"
    );
    client.flush()?;

    while let Some(task) = client.next_task()? {
        let request = match request::parse(task.data_type, &task.data) {
            Ok(r) => r,
            Err(e) => {
                client.task_result(&task.token, false, &e.to_string())?;
                continue;
            }
        };
        let waiter = Waiter {
            token: task.token.clone(),
            proof: request.proof,
        };
        if let Err(full) = queue.submit(request.lookup, waiter) {
            client.task_result(&task.token, false, &full.to_string())?;
        }
    }
    if !queue.wait_idle(DRAIN_LIMIT) {
        tracing::warn!(
            waiting = queue.waiting(),
            "lookups still running {} s after the agent closed the pipe: stopping them",
            DRAIN_LIMIT.as_secs()
        );
    }
    stop(&client, &queue, &children);
    Ok(())
}

/// A worker: takes lookups until the queue stops.
fn work(client: &Client, provider: &Provider, queue: &Queue<Lookup, Waiter>) {
    while let Some(lookup) = queue.next() {
        let outcome = provider
            .lookup(&lookup)
            .map_err(|e| e.to_string())
            .and_then(|raw| reply::parse(&raw, &lookup).map_err(|e| e.to_string()));
        if let Err(e) = &outcome {
            tracing::debug!(lookup = %lookup, error = %e, "lookup failed");
        }
        let waiters = queue.finish(&lookup);
        let n = waiters.len();
        for w in waiters {
            if answer(client, w, &outcome).is_err() {
                // The agent closed the pipe: nobody to answer.
                return;
            }
        }
        if queue.answered(n) {
            let _ = client.flush();
        }
    }
}

/// Sends one task's record and result.
fn answer(client: &Client, w: Waiter, outcome: &Result<AgentEntry, String>) -> Result<(), Error> {
    let entry = match outcome {
        Ok(entry) => entry,
        Err(msg) => return result(client, &w.token, false, msg),
    };
    let base = [
        ("token", w.token.as_str()),
        ("id", entry.id.as_str()),
        ("name", entry.name.as_str()),
        ("ip", entry.ip.as_str()),
    ];
    match &w.proof {
        None => {
            client.send(KEY_LOOKUP, base)?;
            result(
                client,
                &w.token,
                true,
                &format!("found agent {} ({})", entry.id, entry.name),
            )
        }
        Some(p) => {
            let verified = keyproof::verify(entry.key.expose(), &p.nonce, &p.csr_sha256, &p.hmac);
            let flag = if verified { "true" } else { "false" };
            client.send(KEY_PROOF, base.into_iter().chain([("verified", flag)]))?;
            let msg = if verified {
                format!("key proof verified for agent {}", entry.id)
            } else {
                format!("key proof does not match the key of agent {}", entry.id)
            };
            result(client, &w.token, true, &msg)
        }
    }
}

/// A 5100 result, left in the buffer: the worker flushes when the queue is idle,
/// and the SDK every 100 ms, so that results under load go out in batches.
fn result(client: &Client, token: &str, ok: bool, msg: &str) -> Result<(), Error> {
    let status = if ok { "succeeded" } else { "failed" };
    client.send(TASK_RESULT, [("token", token), ("status", status), ("msg", msg)])
}

/// Stops the workers, answers every waiting task, kills running providers and
/// flushes.
fn stop(client: &Client, queue: &Queue<Lookup, Waiter>, children: &Children) {
    for w in queue.stop() {
        let _ = result(client, &w.token, false, STOPPING);
    }
    children.kill_all();
    let _ = client.flush();
}
