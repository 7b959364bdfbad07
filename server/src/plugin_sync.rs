//! sync-config for agents that do not answer `config_token` (Elkeid's agent and
//! other foreign products, [`keel_proto::product`]).
//!
//! Such an agent applies a plugin set silently. What it runs shows in its
//! heartbeats: every minute one agent heartbeat (1000) and then one plugin
//! heartbeat (1001, `name` and `pversion`) per running plugin. The stream
//! collects each such round ([`Round`]) and judges the agent's sync-config
//! subtasks sent before the round began against it:
//! - the round shows the desired plugins at the desired versions, and nothing
//!   else: succeeded, at once;
//! - a complete round (the next 1000 began) that began at least [`APPLY_GRACE`]
//!   after the subtask was sent shows otherwise: failed, naming the difference;
//! - nothing comes: the subtask times out like any other.

use std::collections::BTreeMap;
use std::collections::HashMap;
use std::time::Duration;

use keel_proto::product::KEEL_AGENT;

use crate::rollout::SYNC_CONFIG;
use crate::state::ServerState;
use crate::states::SubtaskState;
use crate::store::StoreError;

/// How long an agent has to apply a plugin set before a round that shows
/// otherwise fails it.
pub const APPLY_GRACE: Duration = Duration::from_secs(60);

/// The plugins one round of heartbeats showed.
#[derive(Debug, Default)]
pub struct Round {
    /// When its agent heartbeat arrived, Unix ms (server time).
    pub at: i64,
    /// Plugin name → version.
    pub plugins: BTreeMap<String, String>,
}

impl Round {
    /// A round begun by an agent heartbeat arriving at `at`.
    pub fn begin(at: i64) -> Self {
        Self {
            at,
            plugins: BTreeMap::new(),
        }
    }

    /// Takes in a plugin heartbeat's fields.
    pub fn plugin(&mut self, fields: &HashMap<String, String>) {
        let Some(name) = fields.get("name").filter(|n| !n.is_empty()) else {
            return;
        };
        let version = fields
            .get("pversion")
            .or_else(|| fields.get("version"))
            .cloned()
            .unwrap_or_default();
        self.plugins.insert(name.clone(), version);
    }
}

/// How what runs differs from what is desired, or `None` when it is the same.
pub fn difference(desired: &BTreeMap<String, String>, running: &BTreeMap<String, String>) -> Option<String> {
    let mut out = Vec::new();
    for (name, want) in desired {
        match running.get(name) {
            None => out.push(format!("plugin {name} is not running")),
            Some(have) if have != want => out.push(format!("plugin {name} runs version {have}, not {want}")),
            Some(_) => {}
        }
    }
    for name in running.keys().filter(|n| !desired.contains_key(*n)) {
        out.push(format!("plugin {name} still runs"));
    }
    (!out.is_empty()).then(|| out.join("; "))
}

/// Judges the agent's sent sync-config subtasks against `round`; `complete`
/// when the next round has begun. Returns how many subtasks ended.
pub async fn judge(
    state: &ServerState,
    agent_id: &str,
    round: &Round,
    complete: bool,
    now: i64,
) -> Result<usize, StoreError> {
    let pending = state.store.sent_subtasks_of_kind(agent_id, SYNC_CONFIG).await?;
    let pending: Vec<(String, i64)> = pending.into_iter().filter(|(_, sent)| *sent < round.at).collect();
    if pending.is_empty() {
        return Ok(0);
    }
    let desired: BTreeMap<String, String> = state
        .effective(agent_id)
        .await?
        .unwrap_or_default()
        .into_values()
        .filter(|e| e.component != KEEL_AGENT)
        .map(|e| (e.component, e.version))
        .collect();
    let grace = i64::try_from(APPLY_GRACE.as_millis()).unwrap_or(i64::MAX);
    let mut ended = 0;
    for (token, sent) in pending {
        let (status, msg) = match difference(&desired, &round.plugins) {
            None => (
                SubtaskState::Succeeded,
                "the plugin heartbeats show the desired set".to_owned(),
            ),
            Some(why) if complete && round.at - sent >= grace => (SubtaskState::Failed, why),
            Some(_) => continue,
        };
        let fields = HashMap::from([
            ("status".to_owned(), status.as_str().to_owned()),
            ("msg".to_owned(), msg),
            ("token".to_owned(), token.clone()),
        ]);
        if state.store.task_result(&token, agent_id, &fields, now).await? {
            ended += 1;
        }
    }
    if ended > 0 {
        state.rollout_wake.notify_one();
    }
    Ok(ended)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn set(pairs: &[(&str, &str)]) -> BTreeMap<String, String> {
        pairs.iter().map(|(a, b)| ((*a).to_owned(), (*b).to_owned())).collect()
    }

    #[test]
    fn the_difference_names_each_plugin_out_of_place() {
        let want = set(&[("collector", "1.2"), ("scanner", "2")]);
        assert_eq!(difference(&want, &set(&[("collector", "1.2"), ("scanner", "2")])), None);
        assert_eq!(difference(&BTreeMap::new(), &BTreeMap::new()), None);
        let why = difference(&want, &set(&[("collector", "1.1"), ("old", "9")])).unwrap();
        assert_eq!(
            why,
            "plugin collector runs version 1.1, not 1.2; plugin scanner is not running; plugin old still runs"
        );
    }

    #[test]
    fn a_round_reads_elkeid_and_keel_plugin_heartbeats() {
        let mut r = Round::begin(5);
        r.plugin(&HashMap::from([
            ("name".into(), "a".into()),
            ("pversion".into(), "1".into()),
        ]));
        r.plugin(&HashMap::from([
            ("name".into(), "b".into()),
            ("version".into(), "2".into()),
        ]));
        r.plugin(&HashMap::from([("pversion".into(), "3".into())]));
        assert_eq!(r.plugins, set(&[("a", "1"), ("b", "2")]));
    }
}
