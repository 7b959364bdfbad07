//! The states of tasks rolled out to many agents ("jobs" in the schema) and of
//! their subtasks (one per agent, and single-agent tasks), in one place: the
//! rollout engine, the store and the API name them through these types. Each is
//! kept and shown as the same lower-case string it always was (`as_str`, serde),
//! so the database and the API are unchanged.

use std::fmt;
use std::str::FromStr;

use serde::{Deserialize, Serialize};

/// A state string that names no state.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("unknown {what} state {value:?}")]
pub struct UnknownState {
    /// `task` or `subtask`.
    pub what: &'static str,
    /// The string.
    pub value: String,
}

/// Defines a state enum with its strings, `as_str`, `Display` and `FromStr`.
macro_rules! states {
    ($(#[$doc:meta])* $name:ident, $what:literal { $($(#[$vdoc:meta])* $variant:ident = $s:literal,)+ }) => {
        $(#[$doc])*
        #[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
        pub enum $name {
            $($(#[$vdoc])* #[serde(rename = $s)] $variant,)+
        }

        impl $name {
            /// Every state, in order.
            pub const ALL: &'static [$name] = &[$($name::$variant,)+];

            /// The state as stored and shown.
            pub const fn as_str(self) -> &'static str {
                match self {
                    $($name::$variant => $s,)+
                }
            }
        }

        impl fmt::Display for $name {
            fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str(self.as_str())
            }
        }

        impl FromStr for $name {
            type Err = UnknownState;

            fn from_str(s: &str) -> Result<Self, Self::Err> {
                match s {
                    $($s => Ok($name::$variant),)+
                    _ => Err(UnknownState { what: $what, value: s.to_owned() }),
                }
            }
        }
    };
}

states! {
    /// A task's state: `running` until every subtask ended (`succeeded` when none
    /// failed, else `failed`), `paused` at the failure threshold or by an operator,
    /// `cancelled` by an operator.
    JobState, "task" {
        /// Subtasks are being sent in batches.
        Running = "running",
        /// No further batch goes out until it is resumed.
        Paused = "paused",
        /// Every subtask succeeded.
        Succeeded = "succeeded",
        /// Every subtask ended, some not successfully.
        Failed = "failed",
        /// Stopped by an operator; its pending subtasks were cancelled.
        Cancelled = "cancelled",
    }
}

states! {
    /// A subtask's state (also a single-agent task's): `pending`, then `sent`, then
    /// how it ended.
    SubtaskState, "subtask" {
        /// Not sent yet.
        Pending = "pending",
        /// Sent, no answer yet.
        Sent = "sent",
        /// Answered with success.
        Succeeded = "succeeded",
        /// Answered with failure, or could not be sent.
        Failed = "failed",
        /// No answer in time.
        TimedOut = "timed_out",
        /// Not sent because the task was cancelled.
        Cancelled = "cancelled",
    }
}

impl JobState {
    /// Whether the task may still send subtasks (`running` or `paused`).
    pub const fn is_open(self) -> bool {
        matches!(self, JobState::Running | JobState::Paused)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn states_read_and_write_the_strings_they_always_were() {
        let jobs: Vec<&str> = JobState::ALL.iter().map(|s| s.as_str()).collect();
        assert_eq!(jobs, ["running", "paused", "succeeded", "failed", "cancelled"]);
        let subtasks: Vec<&str> = SubtaskState::ALL.iter().map(|s| s.as_str()).collect();
        assert_eq!(
            subtasks,
            ["pending", "sent", "succeeded", "failed", "timed_out", "cancelled"]
        );
        for s in JobState::ALL {
            assert_eq!(s.as_str().parse::<JobState>(), Ok(*s));
            assert_eq!(serde_json::to_string(s).ok(), Some(format!("\"{s}\"")));
        }
        for s in SubtaskState::ALL {
            assert_eq!(s.as_str().parse::<SubtaskState>(), Ok(*s));
            assert_eq!(serde_json::to_string(s).ok(), Some(format!("\"{s}\"")));
        }
        assert_eq!(
            "done".parse::<SubtaskState>().unwrap_err().to_string(),
            "unknown subtask state \"done\""
        );
    }
}
