//! The plugin at run time: the main thread reads tasks; each job runs on a small
//! tokio runtime, at most `max_jobs` at once (more are refused at once, not
//! queued: the server retries a scan, and a queue would hold tunnels open).
//!
//! With an invalid configuration the plugin does not exit (the agent would only
//! restart it into the same error): it reports the error once and refuses every
//! task with it.

use std::sync::Arc;

use keel_plugin_sdk::data_type::{PROXY_DISCOVER, PROXY_JOB, PROXY_JOB_EVENT};
use keel_plugin_sdk::{Client, Error, Task};
use tokio::sync::Semaphore;

use crate::job::{self, Request};
use crate::{config, discover};

/// Runs the plugin until the agent closes the task pipe.
pub fn run(client: Client, detail: &str) -> Result<(), Error> {
    let loaded = config::path_from_detail(detail).and_then(|p| config::load(&p));
    let loaded = loaded.and_then(|c| job::tls_config(&c).map(|tls| (c, tls)));
    let (config, tls) = match loaded {
        Ok(v) => v,
        Err(msg) => {
            let msg = format!("configuration invalid: {msg}");
            tracing::error!("{msg}: every job is refused until it is fixed");
            return client.refuse_all(&msg);
        }
    };
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .map_err(Error::Io)?;
    let config = Arc::new(config);
    let slots = Arc::new(Semaphore::new(config.max_jobs));
    tracing::info!(
        rules = config.allow.len(),
        tunnel = %config.tunnel,
        max_jobs = config.max_jobs,
        "proxy ready"
    );
    client.flush()?;
    while let Some(task) = client.next_task()? {
        if task.data_type == PROXY_DISCOVER {
            discover(&client, &runtime, &config, &slots, &task)?;
            continue;
        }
        if task.data_type != PROXY_JOB {
            client.task_result(
                &task.token,
                false,
                &format!(
                    "data_type {} is not a proxy task ({PROXY_JOB} runs a job, {PROXY_DISCOVER} a discovery)",
                    task.data_type
                ),
            )?;
            continue;
        }
        let req = match Request::parse(&task.data) {
            Ok(r) => r,
            Err(e) => {
                client.task_result(&task.token, false, &e)?;
                continue;
            }
        };
        let Ok(slot) = Arc::clone(&slots).try_acquire_owned() else {
            client.task_result(
                &task.token,
                false,
                &format!("busy: {} jobs are running (max_jobs)", config.max_jobs),
            )?;
            continue;
        };
        let (client, config, tls) = (client.clone(), Arc::clone(&config), Arc::clone(&tls));
        runtime.spawn(async move {
            let outcome = job::run(&config, tls, &req).await;
            // Free before the report: the server sends its next job to this
            // proxy once it reads the report.
            drop(slot);
            let _ = report(&client, &task, &req, outcome);
        });
    }
    runtime.shutdown_timeout(std::time::Duration::from_secs(2));
    client.flush().or(Ok(()))
}

/// Starts a discovery sweep, which takes one job slot; its answer is the task
/// result.
fn discover(
    client: &Client,
    runtime: &tokio::runtime::Runtime,
    config: &Arc<config::Config>,
    slots: &Arc<Semaphore>,
    task: &Task,
) -> Result<(), Error> {
    let req = match discover::Request::parse(&task.data) {
        Ok(r) => r,
        Err(e) => return client.task_result(&task.token, false, &e),
    };
    let Ok(slot) = Arc::clone(slots).try_acquire_owned() else {
        return client.task_result(
            &task.token,
            false,
            &format!("busy: {} jobs are running (max_jobs)", config.max_jobs),
        );
    };
    let (client, config, token) = (client.clone(), Arc::clone(config), task.token.clone());
    runtime.spawn(async move {
        let found = discover::sweep(&config, &req).await;
        drop(slot);
        tracing::info!(
            tried = found.tried,
            open = found.open.len(),
            skipped = found.skipped.len(),
            "discovery swept the allow list"
        );
        let msg = serde_json::to_string(&found).unwrap_or_default();
        let _ = client.task_result(&token, true, &msg);
    });
    Ok(())
}

fn report(client: &Client, task: &Task, req: &Request, outcome: Result<job::Outcome, String>) -> Result<(), Error> {
    match outcome {
        Ok(o) => {
            let ms = o.elapsed.as_millis().to_string();
            let how = o.cut.clone().unwrap_or_else(|| "closed".into());
            client.send(
                PROXY_JOB_EVENT,
                [
                    ("job", req.job.as_str()),
                    ("target", req.target.as_str()),
                    ("address", &o.address.to_string()),
                    ("outcome", &how),
                    ("sent", &o.sent.to_string()),
                    ("received", &o.received.to_string()),
                    ("ms", &ms),
                ],
            )?;
            tracing::info!(job = %req.job, target = %req.target, address = %o.address, sent = o.sent, received = o.received, outcome = %how, "job ended");
            client.task_result(
                &task.token,
                true,
                &format!(
                    "tunnel to {} ({}) {how}: {} bytes sent, {} received in {ms} ms",
                    o.address, req.target, o.sent, o.received
                ),
            )
        }
        Err(e) => {
            client.send(
                PROXY_JOB_EVENT,
                [
                    ("job", req.job.as_str()),
                    ("target", req.target.as_str()),
                    ("outcome", e.as_str()),
                ],
            )?;
            tracing::warn!(job = %req.job, target = %req.target, error = %e, "job refused or failed");
            client.task_result(&task.token, false, &e)
        }
    }
}
