//! The agent heartbeat (data_type 1000): at every connect and every interval.
//!
//! Field names follow Elkeid's agent heartbeat where it has one; Keel adds
//! `threads`, the pending/spool counters and the address lists.

use std::path::PathBuf;
use std::sync::atomic::Ordering;
use std::sync::{Arc, RwLock};
use std::time::{Duration, Instant};

use keel_proto::data_type;
use tokio::sync::Notify;
use tokio_util::sync::CancellationToken;

use crate::host::{self, CpuSampler, Platform};
use crate::outbox::Outbox;
use crate::plugin::Runtime;
use crate::record::{Header, Record};
use crate::spool::Spool;
use crate::tasks::MetadataStore;
use crate::transport::TransferStats;

/// What the heartbeat reads.
#[derive(Debug, Clone)]
pub struct Heartbeat {
    /// Host root for platform facts.
    pub host_root: PathBuf,
    /// Period.
    pub interval: Duration,
    /// Where heartbeats go.
    pub outbox: Outbox,
    /// Spool counters.
    pub spool: Arc<Spool>,
    /// Transfer counters.
    pub stats: Arc<TransferStats>,
    /// idc/region.
    pub metadata: MetadataStore,
    /// Header, refreshed here with hostname and addresses.
    pub header: Arc<RwLock<Header>>,
    /// Notified when a stream opens.
    pub connected: Arc<Notify>,
    /// The plugins, for their heartbeats (1001).
    pub plugins: Runtime,
    /// `deb`, `rpm` or empty: how the agent can be upgraded.
    pub package_type: String,
}

struct Rates {
    at: Instant,
    tx_bytes: u64,
    rx_bytes: u64,
    tx_records: u64,
}

fn f(v: f64) -> String {
    format!("{v:.4}")
}

impl Heartbeat {
    /// Runs until `shutdown`.
    pub async fn run(self, shutdown: CancellationToken) {
        let platform = host::platform(&self.host_root);
        let mut sampler = CpuSampler::default();
        sampler.sample(platform.boot_time);
        let mut rates = self.rates();
        let mut plugin_rates_since = rates.at;
        let mut ticker = tokio::time::interval(self.interval);
        ticker.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            let with_plugins = tokio::select! {
                _ = shutdown.cancelled() => return,
                _ = ticker.tick() => true,
                _ = self.connected.notified() => false,
                () = self.plugins.changed() => true,
            };
            let mut records = vec![self.beat(&platform, &mut sampler, &mut rates)];
            if with_plugins {
                records.extend(self.plugins.heartbeats(rates.at.duration_since(plugin_rates_since)));
                plugin_rates_since = rates.at;
            }
            if !self.outbox.send_all(records).await {
                return;
            }
        }
    }

    fn rates(&self) -> Rates {
        Rates {
            at: Instant::now(),
            tx_bytes: self.stats.tx_bytes.load(Ordering::Relaxed),
            rx_bytes: self.stats.rx_bytes.load(Ordering::Relaxed),
            tx_records: self.stats.tx_records.load(Ordering::Relaxed),
        }
    }

    fn beat(&self, platform: &Platform, sampler: &mut CpuSampler, prev: &mut Rates) -> Record {
        let addresses = host::addresses();
        let hostname = host::hostname();
        {
            let mut h = self.header.write().unwrap_or_else(|p| p.into_inner());
            h.hostname = hostname.clone();
            h.addresses = addresses.clone();
        }
        let s = sampler.sample(platform.boot_time);
        let now = self.rates();
        let secs = now.at.duration_since(prev.at).as_secs_f64().max(0.001);
        let per_sec = |a: u64, b: u64| f(a.saturating_sub(b) as f64 / secs);
        let spool = self.spool.stats();
        let meta = self.metadata.get();
        let fields: Vec<(&str, String)> = vec![
            ("hostname", hostname),
            ("kernel_version", platform.kernel_version.clone()),
            ("arch", platform.arch.clone()),
            ("platform", platform.platform.clone()),
            ("platform_family", platform.platform_family.clone()),
            ("platform_version", platform.platform_version.clone()),
            ("boot_time", platform.boot_time.to_string()),
            ("nproc", platform.nproc.to_string()),
            ("idc", meta.idc.unwrap_or_default()),
            ("region", meta.region.unwrap_or_default()),
            ("pid", std::process::id().to_string()),
            ("cpu", f(s.cpu)),
            ("rss", s.rss.to_string()),
            ("nfd", s.nfd.to_string()),
            ("threads", s.threads.to_string()),
            ("start_time", s.start_time.to_string()),
            ("tx_speed", per_sec(now.tx_bytes, prev.tx_bytes)),
            ("rx_speed", per_sec(now.rx_bytes, prev.rx_bytes)),
            ("tx_tps", per_sec(now.tx_records, prev.tx_records)),
            ("spool_bytes", spool.bytes.to_string()),
            ("spool_batches", spool.batches.to_string()),
            ("dropped", (spool.dropped_records + self.outbox.dropped()).to_string()),
            ("resent", spool.resent_batches.to_string()),
            ("connects", self.stats.connects.load(Ordering::Relaxed).to_string()),
            ("plugins", self.plugins.names().join(",")),
            ("package_type", self.package_type.clone()),
            ("load_1", f(f64::from(s.load.0))),
            ("load_5", f(f64::from(s.load.1))),
            ("load_15", f(f64::from(s.load.2))),
            ("total_mem", s.total_mem.to_string()),
            ("mem_usage", f(s.mem_usage)),
            ("cpu_usage", f(s.cpu_usage)),
            ("intranet_ipv4", addresses.intranet_ipv4.join(",")),
            ("extranet_ipv4", addresses.extranet_ipv4.join(",")),
            ("intranet_ipv6", addresses.intranet_ipv6.join(",")),
            ("extranet_ipv6", addresses.extranet_ipv6.join(",")),
        ];
        *prev = now;
        Record::new(data_type::AGENT_HEARTBEAT, fields)
    }
}
