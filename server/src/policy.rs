//! Policies: which version of a component applies to which agents, and the
//! effective configuration that follows for one agent.
//!
//! Precedence by how specifically a rule names the agent: an agent's own plugin set
//! (`PUT /api/v1/agents/{id}/plugins`) > a policy naming agent IDs > one naming tags
//! (any of them) > one naming a platform > one for all agents. Two rules of the same
//! rank that pick different versions for one agent conflict: creating such a policy
//! is refused; if tags change later, the older policy wins and the conflict is shown.

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};

/// One entry of an agent's desired plugin set.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DesiredPlugin {
    /// Plugin name.
    pub name: String,
    /// Version.
    pub version: String,
    /// Passed to the plugin as `DETAIL`.
    pub detail: String,
}

/// Which agents a policy applies to.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, utoipa::ToSchema)]
#[serde(rename_all = "snake_case")]
pub enum Target {
    /// Every agent.
    All,
    /// Agents with any of these tags.
    Tags(Vec<String>),
    /// These agents.
    Agents(Vec<String>),
    /// Agents whose platform, platform family or architecture is this.
    Platform(String),
}

impl Target {
    /// Higher is more specific.
    pub fn rank(&self) -> u8 {
        match self {
            Target::All => 0,
            Target::Platform(_) => 1,
            Target::Tags(_) => 2,
            Target::Agents(_) => 3,
        }
    }

    /// Whether it selects `agent`.
    pub fn matches(&self, agent: &AgentFacts) -> bool {
        match self {
            Target::All => true,
            Target::Tags(tags) => tags.iter().any(|t| agent.tags.contains(t)),
            Target::Agents(ids) => ids.contains(&agent.id),
            Target::Platform(p) => {
                agent.platform == *p || agent.platform_family.split(' ').any(|f| f == p) || agent.arch == *p
            }
        }
    }

    /// A short description for messages.
    pub fn describe(&self) -> String {
        match self {
            Target::All => "all agents".into(),
            Target::Tags(t) => format!("tags {}", t.join(",")),
            Target::Agents(a) => format!("agents {}", a.join(",")),
            Target::Platform(p) => format!("platform {p}"),
        }
    }
}

/// A policy.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Policy {
    /// ID.
    pub id: String,
    /// Unique name.
    pub name: String,
    /// Component: `keel-agent` or a plugin.
    pub component: String,
    /// Version to apply.
    pub version: String,
    /// Plugin `detail`.
    pub detail: String,
    /// Which agents.
    pub target: Target,
    /// Created at, Unix ms; the older of two conflicting policies wins.
    pub created_at: i64,
}

/// What selection needs to know about an agent.
#[derive(Debug, Clone, Default)]
pub struct AgentFacts {
    /// ID.
    pub id: String,
    /// Tags.
    pub tags: Vec<String>,
    /// os-release ID.
    pub platform: String,
    /// os-release ID_LIKE.
    pub platform_family: String,
    /// `uname -m`.
    pub arch: String,
}

/// Where an entry of the effective configuration came from.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, utoipa::ToSchema)]
#[serde(rename_all = "snake_case", tag = "kind")]
pub enum Source {
    /// The agent's own plugin set.
    Agent,
    /// A policy.
    Policy {
        /// Its ID.
        id: String,
        /// Its name.
        name: String,
    },
}

/// One component of an agent's effective configuration.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, utoipa::ToSchema)]
pub struct Effective {
    /// Component.
    pub component: String,
    /// Version.
    pub version: String,
    /// Plugin detail.
    pub detail: String,
    /// What chose it.
    pub source: Source,
    /// Other rules of the same rank that wanted something else.
    pub conflicts_with: Vec<String>,
}

/// One rule for one component: rank, source, version, detail, age.
struct Candidate<'a> {
    rank: u8,
    source: Source,
    version: &'a str,
    detail: &'a str,
    created_at: i64,
}

/// The effective configuration of `agent`: one entry per component.
pub fn effective(
    agent: &AgentFacts,
    policies: &[Policy],
    own: Option<&[DesiredPlugin]>,
) -> BTreeMap<String, Effective> {
    let mut by_component: BTreeMap<&str, Vec<Candidate<'_>>> = BTreeMap::new();
    for p in policies.iter().filter(|p| p.target.matches(agent)) {
        by_component.entry(&p.component).or_default().push(Candidate {
            rank: p.target.rank(),
            source: Source::Policy {
                id: p.id.clone(),
                name: p.name.clone(),
            },
            version: &p.version,
            detail: &p.detail,
            created_at: p.created_at,
        });
    }
    for d in own.unwrap_or_default() {
        by_component.entry(&d.name).or_default().push(Candidate {
            rank: 4,
            source: Source::Agent,
            version: &d.version,
            detail: &d.detail,
            created_at: i64::MIN,
        });
    }
    let mut out = BTreeMap::new();
    for (component, mut cands) in by_component {
        cands.sort_by(|a, b| b.rank.cmp(&a.rank).then(a.created_at.cmp(&b.created_at)));
        let winner = &cands[0];
        let conflicts_with = cands[1..]
            .iter()
            .filter(|c| c.rank == winner.rank && (c.version != winner.version || c.detail != winner.detail))
            .map(|c| match &c.source {
                Source::Policy { name, .. } => name.clone(),
                Source::Agent => "the agent's own set".into(),
            })
            .collect();
        out.insert(
            component.to_owned(),
            Effective {
                component: component.to_owned(),
                version: winner.version.to_owned(),
                detail: winner.detail.to_owned(),
                source: winner.source.clone(),
                conflicts_with,
            },
        );
    }
    out
}

/// Why `new` cannot be added next to `existing`, judged on the agents there are:
/// it would tie with another policy for some agent and choose differently.
pub fn conflict(new: &Policy, existing: &[Policy], agents: &[AgentFacts]) -> Option<String> {
    for other in existing
        .iter()
        .filter(|o| o.id != new.id && o.component == new.component)
    {
        if other.target.rank() != new.target.rank() || (other.version == new.version && other.detail == new.detail) {
            continue;
        }
        if let Some(a) = agents.iter().find(|a| new.target.matches(a) && other.target.matches(a)) {
            return Some(format!(
                "policy {:?} ({} -> {} {}) and policy {:?} ({} -> {} {}) would both apply to agent {} with equal precedence",
                new.name,
                new.target.describe(),
                new.component,
                new.version,
                other.name,
                other.target.describe(),
                other.component,
                other.version,
                a.id
            ));
        }
    }
    None
}

#[cfg(test)]
mod tests {
    use super::*;

    fn agent(id: &str, tags: &[&str]) -> AgentFacts {
        AgentFacts {
            id: id.into(),
            tags: tags.iter().map(|t| (*t).to_owned()).collect(),
            platform: "debian".into(),
            platform_family: "debian".into(),
            arch: "x86_64".into(),
        }
    }

    fn policy(name: &str, version: &str, target: Target, at: i64) -> Policy {
        Policy {
            id: name.into(),
            name: name.into(),
            component: "p".into(),
            version: version.into(),
            detail: String::new(),
            target,
            created_at: at,
        }
    }

    #[test]
    fn the_most_specific_rule_wins() {
        let ps = vec![
            policy("fleet", "1", Target::All, 1),
            policy("deb", "2", Target::Platform("debian".into()), 2),
            policy("canary", "3", Target::Tags(vec!["canary".into()]), 3),
            policy("pinned", "4", Target::Agents(vec!["a2".into()]), 4),
        ];
        assert_eq!(effective(&agent("a0", &[]), &ps, None)["p"].version, "2");
        assert_eq!(effective(&agent("a1", &["canary"]), &ps, None)["p"].version, "3");
        assert_eq!(effective(&agent("a2", &["canary"]), &ps, None)["p"].version, "4");
        let own = [DesiredPlugin {
            name: "p".into(),
            version: "9".into(),
            detail: String::new(),
        }];
        let e = effective(&agent("a2", &[]), &ps, Some(&own));
        assert_eq!((e["p"].version.as_str(), &e["p"].source), ("9", &Source::Agent));
        let mut other = agent("a3", &[]);
        other.platform = "rhel".into();
        other.platform_family = "rhel fedora".into();
        assert_eq!(effective(&other, &ps, None)["p"].version, "1");
    }

    #[test]
    fn equal_rank_disagreement_is_a_conflict() {
        let existing = vec![policy("eu", "1", Target::Tags(vec!["eu".into()]), 1)];
        let new = policy("canary", "2", Target::Tags(vec!["canary".into()]), 2);
        let agents = vec![agent("a1", &["eu"]), agent("a2", &["canary"])];
        assert_eq!(conflict(&new, &existing, &agents), None, "no agent has both tags");
        let both = vec![agent("a1", &["eu", "canary"])];
        let why = conflict(&new, &existing, &both).unwrap();
        assert!(
            why.contains("\"canary\"") && why.contains("\"eu\"") && why.contains("a1"),
            "{why}"
        );
        // Once an agent has both tags anyway, the older policy wins and the tie shows.
        let mut all = existing.clone();
        all.push(new);
        let e = effective(&both[0], &all, None);
        assert_eq!(e["p"].version, "1");
        assert_eq!(e["p"].conflicts_with, ["canary"]);
        // A more specific policy never conflicts with a broader one.
        let fleet = policy("fleet", "5", Target::All, 0);
        assert_eq!(conflict(&fleet, &all, &both), None);
    }
}
