//! Scheduled audits, as KeyChest runs them: each schedule's targets are scanned
//! again through its agent every interval, and every scan, scheduled or not,
//! goes into the history (`inventory::scan` records it), where a certificate
//! that changed is marked.
//!
//! Every instance looks for due schedules every [`TICK`]; a run is taken by
//! moving the schedule's next run on in the store (compare and set), so in a
//! cluster each run happens once, on whichever instance took it. A run missed
//! while no instance was up is made once, not once per missed interval. At most
//! [`RUNS_AT_ONCE`] runs go on at once per instance; each scans
//! `tunnel.scan_concurrency` targets at a time.

use std::sync::Arc;
use std::time::Duration;

use keel_common::time::now_ms;
use tokio_util::sync::CancellationToken;
use tracing::{info, warn};

use crate::state::ServerState;
use crate::store::ScheduleRow;

/// How often due schedules are looked for.
pub const TICK: Duration = Duration::from_secs(1);
/// Runs going on at once on one instance.
pub const RUNS_AT_ONCE: usize = 4;

/// Runs until `shutdown`.
pub async fn run(state: Arc<ServerState>, shutdown: CancellationToken) {
    let runs = Arc::new(tokio::sync::Semaphore::new(RUNS_AT_ONCE));
    loop {
        tokio::select! {
            _ = shutdown.cancelled() => return,
            () = tokio::time::sleep(TICK) => {}
        }
        let free = runs.available_permits();
        if free == 0 {
            continue;
        }
        let now = now_ms();
        let due = match state.store.schedules_due(now, i64::try_from(free).unwrap_or(1)).await {
            Ok(d) => d,
            Err(e) => {
                warn!(error = %e, "cannot read the audit schedules");
                continue;
            }
        };
        for s in due {
            // The room to run it first: a run taken is a run made.
            let Ok(permit) = Arc::clone(&runs).try_acquire_owned() else {
                break;
            };
            match state.store.schedule_take(&s.id, s.next_run, next_run(&s, now)).await {
                Ok(true) => {}
                // Another instance took it.
                Ok(false) => continue,
                Err(e) => {
                    warn!(schedule = %s.id, error = %e, "cannot take a scheduled audit");
                    continue;
                }
            }
            let state = Arc::clone(&state);
            tokio::spawn(async move {
                run_one(&state, &s).await;
                drop(permit);
            });
        }
    }
}

/// When a schedule runs next after a run due at its `next_run`, taken at `now`:
/// one interval on, or one interval from now if it fell behind.
pub fn next_run(s: &ScheduleRow, now: i64) -> i64 {
    let next = s.next_run.saturating_add(s.interval_ms);
    if next > now {
        next
    } else {
        now.saturating_add(s.interval_ms)
    }
}

async fn run_one(state: &Arc<ServerState>, s: &ScheduleRow) {
    let by = format!("schedule:{}", s.id);
    let results = crate::inventory::scan_all(state, &s.agent_id, &s.targets, &by).await;
    let ok = results.iter().filter(|r| r.status == "ok").count();
    let failed = results.len() - ok;
    let (ok, failed) = (
        i64::try_from(ok).unwrap_or(i64::MAX),
        i64::try_from(failed).unwrap_or(i64::MAX),
    );
    info!(schedule = %s.id, agent_id = %s.agent_id, ok, failed, "scheduled audit ran");
    if let Err(e) = state.store.schedule_ran(&s.id, now_ms(), ok, failed).await {
        warn!(schedule = %s.id, error = %e, "cannot record a scheduled audit's run");
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_late_run_is_made_once() {
        let s = ScheduleRow {
            id: "s".into(),
            agent_id: "a".into(),
            targets: vec![],
            interval_ms: 60_000,
            next_run: 1_000_000,
            created_by: String::new(),
            created_at: 0,
            last_run: 0,
            last_ok: 0,
            last_failed: 0,
        };
        assert_eq!(next_run(&s, 1_000_500), 1_060_000, "on time: the next interval");
        assert_eq!(next_run(&s, 5_000_000), 5_060_000, "behind: one interval from now");
    }
}
