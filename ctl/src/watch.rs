//! `keelctl tasks watch`: polls a task until it is no longer running, with a live
//! progress bar on a terminal and one line per change otherwise. Exit 0 when the
//! task succeeded, [`crate::EXIT_TASK_UNSUCCESSFUL`] when it failed, paused or was
//! cancelled.

use std::io::IsTerminal;
use std::process::ExitCode;
use std::time::{Duration, Instant};

use indicatif::{ProgressBar, ProgressDrawTarget, ProgressStyle};
use serde_json::Value;

use crate::Ctx;
use crate::client::{ApiError, Unreachable};
use crate::output;

/// Subtask states, in the order they are shown.
pub const STATES: [&str; 6] = ["pending", "sent", "succeeded", "failed", "timed_out", "cancelled"];

/// How long the server may stay unreachable before watching gives up.
const PATIENCE: Duration = Duration::from_secs(30);

/// Where a task is, from one `GET /api/v1/tasks/{id}`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Progress {
    /// The task's state (or a single task's status).
    pub state: String,
    /// Why it is in that state.
    pub reason: String,
    /// Subtasks per state, in the order of [`STATES`].
    pub counts: [i64; 6],
    /// Whether it is still under way.
    pub running: bool,
}

impl Progress {
    /// Reads a task view, or the view of a single task (by token).
    pub fn of(view: &Value) -> anyhow::Result<Progress> {
        if let Some(state) = view["state"].as_str() {
            let mut counts = [0; 6];
            for (n, s) in counts.iter_mut().zip(STATES) {
                *n = view["counts"][s].as_i64().unwrap_or(0);
            }
            return Ok(Progress {
                state: state.to_owned(),
                reason: view["reason"].as_str().unwrap_or_default().to_owned(),
                counts,
                running: state == "running",
            });
        }
        let Some(status) = view["status"].as_str() else {
            anyhow::bail!("the server's answer has neither a task state nor a status: {view}");
        };
        let counts = STATES.map(|s| i64::from(s == status));
        let result = &view["result"];
        let reason = result["msg"].as_str().map_or_else(
            || {
                if result.is_null() {
                    String::new()
                } else {
                    result.to_string()
                }
            },
            str::to_owned,
        );
        Ok(Progress {
            state: status.to_owned(),
            reason,
            counts,
            running: matches!(status, "pending" | "sent"),
        })
    }

    /// Every subtask.
    pub fn total(&self) -> u64 {
        self.counts.iter().map(|&n| n.max(0).unsigned_abs()).sum()
    }

    /// Subtasks that are over: answered, timed out or cancelled.
    pub fn finished(&self) -> u64 {
        self.counts[2..].iter().map(|&n| n.max(0).unsigned_abs()).sum()
    }

    /// `pending 1, sent 0, …`.
    pub fn counts_text(&self) -> String {
        STATES
            .iter()
            .zip(self.counts)
            .map(|(s, n)| format!("{s} {n}"))
            .collect::<Vec<_>>()
            .join(", ")
    }

    /// One line for a log: `running: 1/3 finished (pending 1, sent 1, …)`.
    pub fn line(&self) -> String {
        format!(
            "{}: {}/{} finished ({})",
            self.state,
            self.finished(),
            self.total(),
            self.counts_text()
        )
    }
}

/// Whether a failed poll may succeed if tried again: no answer, or a 5xx.
fn transient(e: &anyhow::Error) -> bool {
    e.is::<Unreachable>() || e.downcast_ref::<ApiError>().is_some_and(|a| a.status.is_server_error())
}

fn bar(show: bool) -> ProgressBar {
    if !show {
        return ProgressBar::hidden();
    }
    let bar = ProgressBar::with_draw_target(Some(0), ProgressDrawTarget::stderr());
    if let Ok(style) = ProgressStyle::with_template("{spinner} [{bar:30}] {pos}/{len} {msg}") {
        bar.set_style(style.progress_chars("=> "));
    }
    bar.enable_steady_tick(Duration::from_millis(120));
    bar
}

/// Follows task `id` until it is no longer running.
pub async fn watch(ctx: &Ctx, id: &str, interval: Duration) -> anyhow::Result<ExitCode> {
    let bar = bar(!ctx.json && std::io::stderr().is_terminal());
    let mut last_line = String::new();
    let mut failing_since: Option<Instant> = None;
    let (view, progress) = loop {
        let view = match ctx.client.get(&["tasks", id], &[]).await {
            Ok(v) => {
                failing_since = None;
                v
            }
            Err(e) if transient(&e) && failing_since.is_none_or(|t| t.elapsed() < PATIENCE) => {
                failing_since.get_or_insert_with(Instant::now);
                let note = format!("retrying: {e:#}");
                if bar.is_hidden() {
                    eprintln!("{note}");
                } else {
                    bar.set_message(note);
                }
                tokio::time::sleep(interval).await;
                continue;
            }
            Err(e) => {
                bar.abandon();
                return Err(e);
            }
        };
        let p = Progress::of(&view)?;
        if bar.is_hidden() {
            let line = p.line();
            if line != last_line {
                eprintln!("{line}");
                last_line = line;
            }
        } else {
            bar.set_length(p.total());
            bar.set_position(p.finished());
            bar.set_message(format!("{} ({})", p.state, p.counts_text()));
        }
        if !p.running {
            break (view, p);
        }
        tokio::time::sleep(interval).await;
    };
    bar.finish_and_clear();

    let summary = if progress.reason.is_empty() {
        format!("task {id} {}", progress.state)
    } else {
        format!("task {id} {}: {}", progress.state, progress.reason)
    };
    if ctx.json {
        output::json(&view)?;
    }
    if progress.state == "succeeded" {
        if !ctx.json {
            output::line(&summary)?;
        }
        Ok(ExitCode::SUCCESS)
    } else {
        eprintln!("keelctl: {summary}");
        Ok(ExitCode::from(crate::EXIT_TASK_UNSUCCESSFUL))
    }
}

#[cfg(test)]
mod tests {
    use serde_json::json;

    use super::*;

    #[test]
    fn task_views() {
        let p = Progress::of(&json!({
            "id": "t", "state": "running", "reason": "",
            "counts": {"pending": 2, "sent": 1, "succeeded": 3, "failed": 1, "timed_out": 0, "cancelled": 0}
        }))
        .unwrap();
        assert!(p.running);
        assert_eq!((p.finished(), p.total()), (4, 7));
        assert_eq!(
            p.line(),
            "running: 4/7 finished (pending 2, sent 1, succeeded 3, failed 1, timed_out 0, cancelled 0)"
        );
        let p = Progress::of(&json!({"state": "paused", "reason": "too many failures", "counts": {}})).unwrap();
        assert!(!p.running);
        assert_eq!(p.reason, "too many failures");
    }

    #[test]
    fn single_task_views() {
        let p = Progress::of(&json!({"token": "x", "status": "sent", "result": null})).unwrap();
        assert!(p.running);
        assert_eq!(p.counts, [0, 1, 0, 0, 0, 0]);
        let p = Progress::of(&json!({"token": "x", "status": "failed", "result": {"msg": "no such plugin"}})).unwrap();
        assert!(!p.running);
        assert_eq!(p.reason, "no such plugin");
        assert!(Progress::of(&json!({"what": 1})).is_err());
    }

    #[test]
    fn only_unanswered_or_5xx_polls_are_retried() {
        assert!(transient(&Unreachable("refused".into()).into()));
        let api = |s| ApiError {
            status: s,
            message: "m".into(),
        };
        assert!(transient(&api(reqwest::StatusCode::SERVICE_UNAVAILABLE).into()));
        assert!(!transient(&api(reqwest::StatusCode::NOT_FOUND).into()));
    }
}
