//! This instance's Prometheus metrics, served at `/metrics`.
//!
//! Every series carries the label `keel_instance` (the cluster instance ID; not
//! `instance`, which Prometheus gives each target itself). Counters and
//! histograms move as things happen; gauges of the registry (agents, tasks,
//! rollouts) and of the fleet (from the heartbeats of the agents connected here)
//! are read when scraped. The store and the sink register their own series
//! ([`crate::store::Store::register_metrics`], [`crate::sink::Sink::register_metrics`]).

use std::collections::HashMap;
use std::sync::Mutex;
use std::sync::atomic::AtomicU64;

use prometheus_client::encoding::{EncodeLabelSet, EncodeLabelValue, LabelValueEncoder};
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::{Histogram, exponential_buckets};
use prometheus_client::registry::Registry;

/// The content type of the text `/metrics` answers with.
pub const CONTENT_TYPE: &str = "application/openmetrics-text; version=1.0.0; charset=utf-8";

/// Data types counted under their own number; records of any further type are
/// counted as `other`, so that agents cannot grow the series without bound.
pub const MAX_DATA_TYPES: usize = 128;

/// How many agents the top-N series name (by spool size, by records dropped).
pub const TOP_AGENTS: usize = 10;

/// Distinct agent-reported values (versions, plugin names) with series of their
/// own at one scrape; the rest are counted as `other`.
pub const MAX_LABEL_VALUES: usize = 128;

/// Plugins counted per agent.
pub const MAX_PLUGINS_PER_AGENT: usize = 64;

/// The label value of what is not counted under its own name.
const OTHER: &str = "other";

/// The plugin states the agent reports; anything else is `other`.
const PLUGIN_STATES: [&str; 6] = ["starting", "running", "backoff", "crashloop", "stopping", "stopped"];

fn plugin_state(state: &str) -> &'static str {
    PLUGIN_STATES.iter().find(|s| **s == state).copied().unwrap_or(OTHER)
}

/// A version as a label value: at most 64 characters of `[0-9A-Za-z.+~_-]`.
fn plain_version(v: &str) -> bool {
    !v.is_empty() && v.len() <= 64 && v.bytes().all(|b| b.is_ascii_alphanumeric() || b".+~_-".contains(&b))
}

/// `counts` with at most [`MAX_LABEL_VALUES`] keys: the largest counts keep
/// their names, the rest are summed under `other`.
fn bounded(counts: HashMap<&str, i64>) -> Vec<(&str, i64)> {
    let mut all: Vec<(&str, i64)> = counts.into_iter().collect();
    all.sort_unstable_by(|a, b| b.1.cmp(&a.1).then_with(|| a.0.cmp(b.0)));
    if all.len() > MAX_LABEL_VALUES {
        let rest: i64 = all.drain(MAX_LABEL_VALUES - 1..).map(|(_, n)| n).sum();
        all.push((OTHER, rest));
    }
    all
}

/// Latency buckets, seconds: 0.5 ms to about 16 s.
pub fn latency() -> Histogram {
    Histogram::new(exponential_buckets(0.0005, 2.0, 16))
}

/// A reason label.
#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct Reason {
    /// Why.
    pub reason: &'static str,
}

/// A listener and a reason.
#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct Refusal {
    /// `grpc` or `tunnel`.
    pub listener: &'static str,
    /// Why.
    pub reason: &'static str,
}

/// How an agent enrolled, and the outcome.
#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct Enrollment {
    /// `token` or `key`.
    pub method: &'static str,
    /// `accepted`, or why it was refused.
    pub outcome: &'static str,
}

/// A record data type, or `other` past [`MAX_DATA_TYPES`].
#[derive(Debug, Clone, Copy, Hash, PartialEq, Eq)]
pub struct DataType(Option<i32>);

impl EncodeLabelValue for DataType {
    fn encode(&self, encoder: &mut LabelValueEncoder<'_>) -> Result<(), std::fmt::Error> {
        use std::fmt::Write;
        match self.0 {
            Some(t) => write!(encoder, "{t}"),
            None => encoder.write_str("other"),
        }
    }
}

#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
struct TypeLabel {
    data_type: DataType,
}

/// An HTTP route (the matched pattern, not the path) and method.
#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct Route {
    /// The route pattern, e.g. `/api/v1/agents/{id}`; `unmatched` for none.
    pub route: String,
    /// The method.
    pub method: String,
}

#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
struct RouteStatus {
    route: String,
    method: String,
    status: u16,
}

#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
struct State {
    state: String,
}

#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
struct RolloutState {
    task: String,
    state: &'static str,
}

#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
struct TaskLabel {
    task: String,
}

#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
struct AgentLabel {
    agent_id: String,
}

#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
struct VersionLabel {
    version: String,
}

#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
struct PluginState {
    plugin: String,
    state: String,
}

#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
struct PluginLabel {
    plugin: String,
}

/// What the last heartbeats of one agent connected here said, kept small: one
/// of these lives for every agent connected.
#[derive(Debug, Default)]
struct AgentFigures {
    version: Box<str>,
    spool_bytes: i64,
    dropped: i64,
    /// Per plugin: name, state and restarts.
    plugins: Vec<(Box<str>, &'static str, i64)>,
}

/// A running or paused task's progress, read from the registry when scraped.
#[derive(Debug)]
pub struct RolloutProgress {
    /// Task ID.
    pub id: String,
    /// Subtasks by state.
    pub counts: Vec<(&'static str, i64)>,
    /// The failure threshold, a fraction of finished subtasks.
    pub failure_threshold: f64,
}

/// What the registry says when scraped.
#[derive(Debug, Default)]
pub struct RegistryFigures {
    /// Agents registered.
    pub agents_known: i64,
    /// Agents with a stream at a live instance.
    pub agents_online: i64,
    /// Tasks by state.
    pub tasks: Vec<(String, i64)>,
    /// Running and paused tasks.
    pub rollouts: Vec<RolloutProgress>,
}

/// The metrics.
#[derive(Debug)]
pub struct Metrics {
    registry: Registry,
    /// Streams accepted (a client certificate checked, before any batch).
    pub streams_opened: Counter,
    /// Streams closed, by reason.
    pub streams_closed: Family<Reason, Counter>,
    /// TLS handshakes refused, by listener and reason.
    pub handshakes_refused: Family<Refusal, Counter>,
    /// Enrollments, by method and outcome.
    pub enrollments: Family<Enrollment, Counter>,
    records: Family<TypeLabel, Counter>,
    /// Data types with series of their own, at most [`MAX_DATA_TYPES`].
    data_types: Mutex<usize>,
    record_bytes: Family<TypeLabel, Counter>,
    /// Batches acknowledged to agents.
    pub batches_acked: Counter,
    /// Time to write a batch to the sink, seconds.
    pub sink_write: Histogram,
    /// Sink writes refused (each try).
    pub sink_errors: Counter,
    /// Plugin records found missing by their sequence numbers.
    pub records_lost: Counter,
    http_requests: Family<RouteStatus, Counter>,
    http_seconds: Family<Route, Histogram, fn() -> Histogram>,
    agents_connected: Gauge,
    agents_known: Gauge,
    agents_online: Gauge,
    tasks: Family<State, Gauge>,
    rollout_subtasks: Family<RolloutState, Gauge>,
    rollout_threshold: Family<TaskLabel, Gauge<f64, AtomicU64>>,
    fleet: Mutex<HashMap<Box<str>, AgentFigures>>,
    fleet_spool_bytes: Gauge,
    fleet_dropped: Gauge,
    top_spool: Family<AgentLabel, Gauge>,
    top_dropped: Family<AgentLabel, Gauge>,
    by_version: Family<VersionLabel, Gauge>,
    plugins: Family<PluginState, Gauge>,
    plugin_restarts: Family<PluginLabel, Gauge>,
    /// One scrape at a time: the gauges read then are cleared and refilled.
    scrape: tokio::sync::Mutex<()>,
}

impl Metrics {
    /// The metrics of instance `instance`; `parts` registers the series that
    /// other parts (the store, the sink) keep themselves.
    pub fn new(instance: &str, parts: impl FnOnce(&mut Registry)) -> Self {
        let mut registry = Registry::with_prefix_and_labels(
            "keel",
            [("keel_instance".into(), instance.to_owned().into())].into_iter(),
        );
        let m = Self {
            streams_opened: Counter::default(),
            streams_closed: Family::default(),
            handshakes_refused: Family::default(),
            enrollments: Family::default(),
            records: Family::default(),
            data_types: Mutex::new(0),
            record_bytes: Family::default(),
            batches_acked: Counter::default(),
            sink_write: latency(),
            sink_errors: Counter::default(),
            records_lost: Counter::default(),
            http_requests: Family::default(),
            http_seconds: Family::new_with_constructor(latency),
            agents_connected: Gauge::default(),
            agents_known: Gauge::default(),
            agents_online: Gauge::default(),
            tasks: Family::default(),
            rollout_subtasks: Family::default(),
            rollout_threshold: Family::default(),
            fleet: Mutex::default(),
            fleet_spool_bytes: Gauge::default(),
            fleet_dropped: Gauge::default(),
            top_spool: Family::default(),
            top_dropped: Family::default(),
            by_version: Family::default(),
            plugins: Family::default(),
            plugin_restarts: Family::default(),
            scrape: tokio::sync::Mutex::new(()),
            registry: Registry::default(),
        };
        let r = &mut registry;
        r.register(
            "agents_connected",
            "Agent streams open at this instance",
            m.agents_connected.clone(),
        );
        r.register(
            "agents_online",
            "Agents with a stream at any live instance",
            m.agents_online.clone(),
        );
        r.register("agents_known", "Agents in the registry", m.agents_known.clone());
        r.register("streams_opened", "Agent streams opened here", m.streams_opened.clone());
        r.register(
            "streams_closed",
            "Agent streams closed here, by reason",
            m.streams_closed.clone(),
        );
        r.register(
            "tls_handshakes_refused",
            "TLS handshakes refused, by listener and reason",
            m.handshakes_refused.clone(),
        );
        r.register(
            "enrollments",
            "Enrollments, by method and outcome",
            m.enrollments.clone(),
        );
        r.register("records_received", "Records received, by data type", m.records.clone());
        r.register(
            "record_bytes_received",
            "Payload bytes received, by data type",
            m.record_bytes.clone(),
        );
        r.register(
            "batches_acknowledged",
            "Batches acknowledged to agents",
            m.batches_acked.clone(),
        );
        r.register(
            "sink_write_seconds",
            "Time to write a batch to the sink",
            m.sink_write.clone(),
        );
        r.register("sink_errors", "Sink writes refused (each try)", m.sink_errors.clone());
        r.register(
            "records_lost",
            "Plugin records found missing by their sequence numbers",
            m.records_lost.clone(),
        );
        r.register(
            "http_requests",
            "HTTP requests, by route, method and status",
            m.http_requests.clone(),
        );
        r.register(
            "http_request_seconds",
            "HTTP request latency, by route and method",
            m.http_seconds.clone(),
        );
        r.register("tasks", "Tasks by state", m.tasks.clone());
        r.register(
            "rollout_subtasks",
            "Subtasks of running and paused tasks, by state",
            m.rollout_subtasks.clone(),
        );
        r.register(
            "rollout_failure_threshold",
            "The failure threshold of running and paused tasks (fraction of finished subtasks)",
            m.rollout_threshold.clone(),
        );
        r.register(
            "fleet_spool_bytes",
            "Spool bytes summed over the agents connected here, from their heartbeats",
            m.fleet_spool_bytes.clone(),
        );
        r.register(
            "fleet_records_dropped",
            "Records dropped, summed over the agents connected here, from their heartbeats",
            m.fleet_dropped.clone(),
        );
        r.register(
            "agent_spool_bytes",
            "Spool bytes of the agents connected here with the largest spools (top 10)",
            m.top_spool.clone(),
        );
        r.register(
            "agent_records_dropped",
            "Records dropped by the agents connected here that dropped most (top 10)",
            m.top_dropped.clone(),
        );
        r.register(
            "agents_by_version",
            "Agents connected here, by version",
            m.by_version.clone(),
        );
        r.register(
            "plugins",
            "Plugins of the agents connected here, by state",
            m.plugins.clone(),
        );
        r.register(
            "plugin_restarts",
            "Plugin restarts summed over the agents connected here",
            m.plugin_restarts.clone(),
        );
        parts(r);
        Self { registry, ..m }
    }

    /// Counts one batch's records of one data type.
    pub fn received(&self, data_type: i32, records: u64, bytes: u64) {
        let known = TypeLabel {
            data_type: DataType(Some(data_type)),
        };
        let label = if self.records.get(&known).is_some() {
            known
        } else {
            // A type not seen yet: under the lock, so that two streams seeing
            // it at once count it once.
            let mut types = self
                .data_types
                .lock()
                .unwrap_or_else(std::sync::PoisonError::into_inner);
            if self.records.get(&known).is_some() || *types < MAX_DATA_TYPES {
                if self.records.get(&known).is_none() {
                    *types += 1;
                    drop(self.records.get_or_create(&known));
                }
                known
            } else {
                TypeLabel {
                    data_type: DataType(None),
                }
            }
        };
        self.records.get_or_create(&label).inc_by(records);
        self.record_bytes.get_or_create(&label).inc_by(bytes);
    }

    /// Counts one HTTP request.
    pub fn http_request(&self, route: Route, status: u16, seconds: f64) {
        self.http_seconds.get_or_create(&route).observe(seconds);
        let Route { route, method } = route;
        self.http_requests
            .get_or_create(&RouteStatus { route, method, status })
            .inc();
    }

    /// Notes an agent's heartbeat (data type 1000).
    pub fn agent_heartbeat(&self, agent_id: &str, version: &str, spool_bytes: i64, dropped: i64) {
        let version = if plain_version(version) { version } else { OTHER };
        update(&mut self.fleet_lock(), agent_id, |a| {
            if *a.version != *version {
                a.version = version.into();
            }
            a.spool_bytes = spool_bytes;
            a.dropped = dropped;
        });
    }

    /// Notes a plugin's heartbeat (data type 1001).
    /// A name that is not a plugin name, or a plugin past
    /// [`MAX_PLUGINS_PER_AGENT`], is not counted.
    pub fn plugin_heartbeat(&self, agent_id: &str, plugin: &str, state: &str, restarts: i64) {
        if !keel_common::ids::valid_plugin_name(plugin) {
            return;
        }
        let state = plugin_state(state);
        update(&mut self.fleet_lock(), agent_id, |a| {
            let full = a.plugins.len() >= MAX_PLUGINS_PER_AGENT;
            match a.plugins.iter_mut().find(|p| *p.0 == *plugin) {
                Some(p) => {
                    p.1 = state;
                    p.2 = restarts;
                }
                None if !full => a.plugins.push((plugin.into(), state, restarts)),
                None => {}
            }
        });
    }

    /// Notes which plugins an agent runs, from its heartbeat: the others are gone.
    pub fn plugins_present(&self, agent_id: &str, names: &[&str]) {
        if let Some(a) = self.fleet_lock().get_mut(agent_id) {
            a.plugins.retain(|p| names.contains(&&*p.0));
        }
    }

    /// Forgets an agent whose stream here closed.
    pub fn agent_gone(&self, agent_id: &str) {
        let mut fleet = self.fleet_lock();
        fleet.remove(agent_id);
        keel_common::maps::shrink_sparse(&mut *fleet);
    }

    fn fleet_lock(&self) -> std::sync::MutexGuard<'_, HashMap<Box<str>, AgentFigures>> {
        self.fleet.lock().unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    /// The text of a scrape: the gauges are set from `connected`, `registry`
    /// and the fleet's heartbeats, then everything is encoded.
    pub async fn scrape(&self, connected: usize, registry: RegistryFigures) -> Result<String, std::fmt::Error> {
        let _one = self.scrape.lock().await;
        self.agents_connected.set(i64::try_from(connected).unwrap_or(i64::MAX));
        self.agents_known.set(registry.agents_known);
        self.agents_online.set(registry.agents_online);
        self.tasks.clear();
        for (state, n) in registry.tasks {
            self.tasks.get_or_create(&State { state }).set(n);
        }
        self.rollout_subtasks.clear();
        self.rollout_threshold.clear();
        for r in registry.rollouts {
            for (state, n) in r.counts {
                self.rollout_subtasks
                    .get_or_create(&RolloutState {
                        task: r.id.clone(),
                        state,
                    })
                    .set(n);
            }
            self.rollout_threshold
                .get_or_create(&TaskLabel { task: r.id })
                .set(r.failure_threshold);
        }
        self.fleet_figures();
        let mut text = String::new();
        prometheus_client::encoding::text::encode(&mut text, &self.registry)?;
        Ok(text)
    }

    fn fleet_figures(&self) {
        let fleet = self.fleet_lock();
        let (mut spool, mut dropped) = (0_i64, 0_i64);
        let mut versions: HashMap<&str, i64> = HashMap::new();
        let mut plugin_agents: HashMap<&str, i64> = HashMap::new();
        for a in fleet.values() {
            spool = spool.saturating_add(a.spool_bytes);
            dropped = dropped.saturating_add(a.dropped);
            *versions.entry(&a.version).or_default() += 1;
            for (name, _, _) in &a.plugins {
                *plugin_agents.entry(name).or_default() += 1;
            }
        }
        // The most widely run plugins keep their names.
        let named: std::collections::HashSet<&str> = bounded(plugin_agents).into_iter().map(|(p, _)| p).collect();
        let mut plugins: HashMap<(&str, &str), i64> = HashMap::new();
        let mut restarts: HashMap<&str, i64> = HashMap::new();
        for a in fleet.values() {
            for (name, state, n) in &a.plugins {
                let name = if named.contains(&**name) { &**name } else { OTHER };
                *plugins.entry((name, state)).or_default() += 1;
                *restarts.entry(name).or_default() += n;
            }
        }
        self.fleet_spool_bytes.set(spool);
        self.fleet_dropped.set(dropped);
        let top = |family: &Family<AgentLabel, Gauge>, value: fn(&AgentFigures) -> i64| {
            family.clear();
            let mut all: Vec<(&Box<str>, i64)> =
                fleet.iter().map(|(id, a)| (id, value(a))).filter(|a| a.1 > 0).collect();
            all.sort_unstable_by(|a, b| b.1.cmp(&a.1).then_with(|| a.0.cmp(b.0)));
            for (id, v) in all.into_iter().take(TOP_AGENTS) {
                family
                    .get_or_create(&AgentLabel {
                        agent_id: id.to_string(),
                    })
                    .set(v);
            }
        };
        top(&self.top_spool, |a| a.spool_bytes);
        top(&self.top_dropped, |a| a.dropped);
        self.by_version.clear();
        for (version, n) in bounded(versions) {
            self.by_version
                .get_or_create(&VersionLabel {
                    version: version.to_owned(),
                })
                .set(n);
        }
        self.plugins.clear();
        for ((plugin, state), n) in plugins {
            self.plugins
                .get_or_create(&PluginState {
                    plugin: plugin.to_owned(),
                    state: state.to_owned(),
                })
                .set(n);
        }
        self.plugin_restarts.clear();
        for (plugin, n) in restarts {
            self.plugin_restarts
                .get_or_create(&PluginLabel {
                    plugin: plugin.to_owned(),
                })
                .set(n);
        }
    }
}

/// An agent's figures, made on its first heartbeat: the key is allocated only
/// then, not on every heartbeat.
fn update(fleet: &mut HashMap<Box<str>, AgentFigures>, agent_id: &str, f: impl FnOnce(&mut AgentFigures)) {
    if let Some(a) = fleet.get_mut(agent_id) {
        f(a);
        return;
    }
    let mut a = AgentFigures::default();
    f(&mut a);
    fleet.insert(agent_id.into(), a);
}

/// The outcome label of an enrollment answered with `status`.
pub fn enrollment_outcome(status: u16) -> &'static str {
    match status {
        200..=299 => "accepted",
        400 => "invalid",
        401 => "unauthorized",
        403 => "forbidden",
        404 => "unknown",
        409 => "conflict",
        429 => "rate_limited",
        500..=599 => "unavailable",
        _ => "other",
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    async fn metrics() -> (Metrics, tempfile::TempDir) {
        let dir = tempfile::tempdir().unwrap();
        let store = crate::store::Store::open("sqlite::memory:").await.unwrap();
        let sink = crate::sink::FileSink::open(dir.path(), 1 << 20, 2).unwrap();
        let m = Metrics::new("i1", |r| {
            store.register_metrics(r);
            crate::sink::Sink::register_metrics(&sink, r);
        });
        (m, dir)
    }

    #[tokio::test]
    async fn data_types_past_the_cap_count_as_other() {
        let (m, _dir) = metrics().await;
        for t in 0..i32::try_from(MAX_DATA_TYPES).unwrap() + 5 {
            m.received(t, 1, 10);
        }
        m.received(3, 2, 20);
        let text = m.scrape(0, RegistryFigures::default()).await.unwrap();
        assert!(
            text.contains("keel_records_received_total{keel_instance=\"i1\",data_type=\"3\"} 3"),
            "{text}"
        );
        assert!(
            text.contains("keel_records_received_total{keel_instance=\"i1\",data_type=\"other\"} 5"),
            "{text}"
        );
        assert!(!text.contains("data_type=\"130\""));
    }

    #[tokio::test]
    async fn fleet_figures_follow_heartbeats_and_forget_agents_that_leave() {
        let (m, _dir) = metrics().await;
        for i in 0..12 {
            m.agent_heartbeat(&format!("a{i:02}"), "1.0", 1000 * i, i);
        }
        m.agent_heartbeat("a00", "1.1", 0, 0);
        m.plugin_heartbeat("a01", "proxy", "running", 2);
        m.plugin_heartbeat("a02", "proxy", "running", 1);
        m.plugin_heartbeat("a02", "proxy", "stopped", 3);
        m.plugin_heartbeat("a03", "file-delivery", "running", 0);
        m.plugins_present("a03", &[]);
        m.agent_gone("a11");
        let text = m.scrape(11, RegistryFigures::default()).await.unwrap();
        let has = |s: &str| assert!(text.contains(s), "missing {s} in\n{text}");
        has("keel_agents_connected{keel_instance=\"i1\"} 11");
        // 1000 × (1 + … + 10)
        has("keel_fleet_spool_bytes{keel_instance=\"i1\"} 55000");
        has("keel_agent_spool_bytes{keel_instance=\"i1\",agent_id=\"a10\"} 10000");
        assert!(!text.contains("agent_id=\"a11\""), "a11 left");
        assert!(
            !text.contains("agent_spool_bytes{keel_instance=\"i1\",agent_id=\"a00\"}"),
            "top 10 of those with a spool"
        );
        has("keel_agents_by_version{keel_instance=\"i1\",version=\"1.0\"} 10");
        has("keel_agents_by_version{keel_instance=\"i1\",version=\"1.1\"} 1");
        has("keel_plugins{keel_instance=\"i1\",plugin=\"proxy\",state=\"running\"} 1");
        has("keel_plugins{keel_instance=\"i1\",plugin=\"proxy\",state=\"stopped\"} 1");
        has("keel_plugin_restarts{keel_instance=\"i1\",plugin=\"proxy\"} 5");
        assert!(
            !text.contains("file-delivery"),
            "a plugin no longer present is not counted"
        );
    }

    #[tokio::test]
    async fn what_agents_report_cannot_grow_the_series_without_bound() {
        let (m, _dir) = metrics().await;
        for i in 0..200 {
            m.agent_heartbeat(&format!("a{i}"), &format!("1.{i}"), 0, 0);
        }
        m.agent_heartbeat("b", "1.0 <script>", 0, 0);
        m.plugin_heartbeat("b", "../etc", "running", 1);
        m.plugin_heartbeat("b", "p", "weird", 1);
        for i in 0..70 {
            m.plugin_heartbeat("c", &format!("p{i}"), "running", 0);
        }
        let text = m.scrape(0, RegistryFigures::default()).await.unwrap();
        let series = |name: &str| text.lines().filter(|l| l.starts_with(&format!("{name}{{"))).count();
        assert_eq!(series("keel_agents_by_version"), MAX_LABEL_VALUES);
        let agents: i64 = text
            .lines()
            .filter(|l| l.starts_with("keel_agents_by_version{"))
            .filter_map(|l| l.rsplit(' ').next()?.parse::<i64>().ok())
            .sum();
        assert_eq!(agents, 202, "every agent counted, past the cap as other");
        assert!(text.contains("version=\"other\"}"), "{text}");
        assert!(!text.contains("script") && !text.contains("../etc"), "{text}");
        assert!(text.contains("plugin=\"p\",state=\"other\"} 1"), "{text}");
        // b's plugin p and c's first 64.
        assert_eq!(series("keel_plugin_restarts"), MAX_PLUGINS_PER_AGENT + 1);
    }

    #[tokio::test]
    async fn registry_figures_replace_the_last_scrapes() {
        let (m, _dir) = metrics().await;
        let figures = |rollouts: Vec<RolloutProgress>| RegistryFigures {
            agents_known: 5,
            agents_online: 3,
            tasks: vec![("running".into(), 1), ("succeeded".into(), 4)],
            rollouts,
        };
        let rollout = RolloutProgress {
            id: "t1".into(),
            counts: vec![("pending", 7), ("failed", 2)],
            failure_threshold: 0.25,
        };
        let text = m.scrape(0, figures(vec![rollout])).await.unwrap();
        let has = |text: &str, s: &str| assert!(text.contains(s), "missing {s} in\n{text}");
        has(&text, "keel_agents_online{keel_instance=\"i1\"} 3");
        has(&text, "keel_tasks{keel_instance=\"i1\",state=\"succeeded\"} 4");
        has(
            &text,
            "keel_rollout_subtasks{keel_instance=\"i1\",task=\"t1\",state=\"pending\"} 7",
        );
        has(
            &text,
            "keel_rollout_failure_threshold{keel_instance=\"i1\",task=\"t1\"} 0.25",
        );
        // The task ended: its rollout series go.
        let text = m.scrape(0, figures(Vec::new())).await.unwrap();
        assert!(!text.contains("task=\"t1\""), "{text}");
    }
}
