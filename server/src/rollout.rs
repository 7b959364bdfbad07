//! Rolling tasks out in batches.
//!
//! A task has one subtask per agent. The engine sends a batch of `batch_size`
//! subtasks, waits until each has an answer or has timed out, then checks the
//! failure threshold (over the subtasks finished since the task was started or last
//! resumed): above it the task pauses, otherwise the next batch goes out. Everything
//! lives in the registry, so a task carries on where it was after a server restart.
//!
//! A task sent to one agent (`POST /api/v1/agents/{id}/tasks`, proxy jobs, key
//! proofs) has a deadline instead; every few seconds whatever is still `sent` past
//! it ends `timed_out`.

use std::sync::Arc;
use std::time::Duration;

use keel_common::time::now_ms;
use tokio_util::sync::CancellationToken;
use tracing::{info, warn};

use crate::connections::{Outbound, TaskCommand};
use crate::state::ServerState;
use crate::states::{JobState, SubtaskState};
use crate::store::{JobRow, PendingSubtask, StoreError};

/// How often running tasks are looked at without a wake-up.
const TICK: Duration = Duration::from_millis(500);

/// Task kinds.
pub const SYNC_CONFIG: &str = "sync-config";
/// Restart the agents (1060).
pub const RESTART_AGENT: &str = "restart-agent";
/// Any task for a plugin.
pub const PLUGIN_TASK: &str = "plugin-task";

/// How often tasks sent to single agents are checked against their deadlines.
const EXPIRE_EVERY_MS: i64 = 5_000;

/// Runs until `shutdown`.
pub async fn run(state: Arc<ServerState>, shutdown: CancellationToken) {
    let mut next_expiry = 0;
    loop {
        tokio::select! {
            _ = shutdown.cancelled() => return,
            _ = state.rollout_wake.notified() => {}
            _ = tokio::time::sleep(TICK) => {}
        }
        let now = now_ms();
        if now >= next_expiry {
            next_expiry = now.saturating_add(EXPIRE_EVERY_MS);
            match state.store.tasks_expire(now).await {
                Ok(0) => {}
                Ok(n) => info!(tasks = n, "tasks ended timed_out: no answer before their deadlines"),
                Err(e) => warn!(error = %e, "cannot end overdue tasks"),
            }
        }
        let lease = i64::try_from(state.config.cluster.lease.as_millis()).unwrap_or(i64::MAX);
        // Only the tasks this instance drives; another takes them over once this
        // instance's lease on them has passed.
        let jobs = match state
            .store
            .jobs_claim(&state.cluster.instance, now, now.saturating_add(lease))
            .await
        {
            Ok(j) => j,
            Err(e) => {
                warn!(error = %e, "cannot read running tasks");
                continue;
            }
        };
        for job in jobs {
            if let Err(e) = step(&state, &job).await {
                warn!(task = %job.id, error = %e, "task step failed");
            }
        }
    }
}

async fn step(state: &ServerState, job: &JobRow) -> Result<(), StoreError> {
    let now = now_ms();
    for token in state.store.job_overdue(&job.id, now - job.timeout_ms).await? {
        let msg = format!("no answer within {} s", job.timeout_ms / 1000);
        state
            .store
            .subtask_end(&token, SubtaskState::TimedOut, &msg, now)
            .await?;
    }
    let c = state.store.job_counts(&job.id).await?;
    if c.sent > 0 {
        // A batch is out: wait for all of it.
        return Ok(());
    }
    let done = c.finished() - job.baseline.0;
    let bad = c.unsuccessful() - job.baseline.1;
    if c.pending > 0 && done > 0 && bad as f64 / done as f64 > job.failure_threshold {
        let reason = format!(
            "{bad} of {done} finished subtasks failed, over the failure threshold {}; resume or cancel",
            job.failure_threshold
        );
        warn!(task = %job.id, %reason, "task paused");
        return state.store.job_state(&job.id, JobState::Paused, &reason, now).await;
    }
    if c.pending == 0 {
        let (end, reason) = if c.unsuccessful() == 0 {
            (JobState::Succeeded, format!("{} succeeded", c.succeeded))
        } else {
            (
                JobState::Failed,
                format!(
                    "{} succeeded, {} failed, {} timed out",
                    c.succeeded, c.failed, c.timed_out
                ),
            )
        };
        info!(task = %job.id, state = %end, %reason, "task finished");
        return state.store.job_state(&job.id, end, &reason, now).await;
    }
    for s in state.store.job_pending(&job.id, job.batch_size).await? {
        dispatch(state, job, &s, now).await?;
    }
    Ok(())
}

async fn dispatch(state: &ServerState, job: &JobRow, s: &PendingSubtask, now: i64) -> Result<(), StoreError> {
    // Whoever flips it from pending sends it: never twice, whichever instance.
    if !state.store.subtask_sent(&s.token, now).await? {
        return Ok(());
    }
    let sent: Result<(), String> = match job.kind.as_str() {
        SYNC_CONFIG => match state.push_config(&s.agent_id, Some(s.token.clone())).await {
            Ok(true) => Ok(()),
            Ok(false) if !state.is_online(&s.agent_id).await? => Err(format!("agent {} is offline", s.agent_id)),
            Ok(false) => {
                let done = std::collections::HashMap::from([
                    ("status".to_owned(), "succeeded".to_owned()),
                    (
                        "msg".to_owned(),
                        "no policy applies to this agent; nothing to apply".to_owned(),
                    ),
                ]);
                state.store.task_result(&s.token, &s.agent_id, &done, now).await?;
                Ok(())
            }
            Err(e) => Err(e.to_string()),
        },
        _ => {
            let cmd = TaskCommand {
                data_type: s.data_type,
                object_name: s.object_name.clone(),
                data: s.data.clone(),
                token: s.token.clone(),
            };
            state
                .send(&s.agent_id, Outbound::Task(cmd))
                .await
                .map_err(|e| e.to_string())
        }
    };
    if let Err(msg) = sent {
        state
            .store
            .subtask_end(&s.token, SubtaskState::Failed, &msg, now)
            .await?;
    }
    Ok(())
}
