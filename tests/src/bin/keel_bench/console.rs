//! `keel-bench console [agents]`: what the console asks of the API, against a
//! registry of `agents` agents (default 50,000) on PostgreSQL, through a real
//! server. The baseline is the same requests against 500 agents, measured in
//! the same run: a page should cost about the same at any fleet size; a search
//! reads every agent's row once.
//!
//! The agents are written into the registry with SQL (one statement), not
//! connected: the console reads the registry, and connecting 50,000 agents is
//! `keel-bench scale`'s work. One agent has a day of heartbeat samples and 50
//! streams, as its page would show.

use std::time::{Duration, Instant};

use keel_tests::{Server, ServerOptions};

/// Requests timed per figure; the median is reported.
const RUNS: usize = 15;
/// The baseline's fleet.
const BASELINE_AGENTS: usize = 500;

/// The median time of each request, ms.
#[derive(Debug, Clone, Copy)]
struct Figures {
    page: f64,
    deep_page: f64,
    search_tag: f64,
    search_address: f64,
    filter: f64,
    activity: f64,
    metrics: f64,
}

pub async fn run(agents: usize) {
    let base = measure(BASELINE_AGENTS).await;
    let fleet = measure(agents).await;
    println!(
        "{:<44} {:>12} {:>12} {:>8}",
        "request",
        format!("{BASELINE_AGENTS} agents"),
        format!("{agents} agents"),
        "ratio"
    );
    let rows = [
        ("first page (100)", base.page, fleet.page),
        ("a page in the middle (cursor)", base.deep_page, fleet.deep_page),
        ("search by tag (?q=, 1 in 100 match)", base.search_tag, fleet.search_tag),
        (
            "search by address (?q=, one match)",
            base.search_address,
            fleet.search_address,
        ),
        ("filter by version (1 in 10 match)", base.filter, fleet.filter),
        ("an agent's page (activity: 288 samples)", base.activity, fleet.activity),
        ("/metrics", base.metrics, fleet.metrics),
    ];
    for (name, b, f) in rows {
        println!("{name:<44} {:>9.2} ms {:>9.2} ms {:>7.2}x", b, f, f / b.max(0.001));
    }
    println!(
        "console agents={agents} page_ms={:.2} deep_page_ms={:.2} search_ms={:.2} address_search_ms={:.2} filter_ms={:.2} activity_ms={:.2} metrics_ms={:.2} page_ratio={:.2}",
        fleet.page,
        fleet.deep_page,
        fleet.search_tag,
        fleet.search_address,
        fleet.filter,
        fleet.activity,
        fleet.metrics,
        fleet.page / base.page.max(0.001)
    );
}

async fn measure(agents: usize) -> Figures {
    let url = keel_tests::postgres_schema().await;
    let store = keel_server::store::Store::open(&url).await.expect("the registry");
    populate(store.pool(), agents).await;
    let server = Server::start(ServerOptions {
        database_url: Some(url),
        ..ServerOptions::default()
    })
    .await;
    let api = server.api();
    let middle = format!("agent-{:06}", agents / 2);
    let time = |path: String| {
        let api = &api;
        async move {
            let mut times = Vec::with_capacity(RUNS);
            for _ in 0..RUNS {
                let started = Instant::now();
                let (status, body) = api.get(&path).await;
                times.push(started.elapsed());
                assert_eq!(status, 200, "{path}: {body}");
            }
            median_ms(&mut times)
        }
    };
    let base = server.base_url();
    let metrics = {
        let open = keel_tests::Api::new(&base, "");
        let mut times = Vec::with_capacity(RUNS);
        for _ in 0..RUNS {
            let started = Instant::now();
            let (status, _, _) = open.send_raw(open.client().get(format!("{base}/metrics"))).await;
            times.push(started.elapsed());
            assert_eq!(status, 200);
        }
        median_ms(&mut times)
    };
    // What the searches time is a real search: each finds what was written.
    let address = format!(
        "/api/v1/agents?limit=100&q=10.0.{}.{}",
        (agents / 3) / 256 % 256,
        (agents / 3) % 256
    );
    for (path, want) in [
        (address.as_str(), 1),
        ("/api/v1/agents?limit=100&q=canary", (agents / 100).min(100)),
    ] {
        let (_, body) = api.get(path).await;
        assert_eq!(body.as_array().map(Vec::len), Some(want), "{path}");
    }
    Figures {
        page: time("/api/v1/agents?limit=100".into()).await,
        deep_page: time(format!("/api/v1/agents?limit=100&cursor={middle}")).await,
        search_tag: time("/api/v1/agents?limit=100&q=canary".into()).await,
        search_address: time(address.clone()).await,
        filter: time("/api/v1/agents?limit=100&version=1.1".into()).await,
        activity: time("/api/v1/agents/agent-000001/activity".into()).await,
        metrics,
    }
}

fn median_ms(times: &mut [Duration]) -> f64 {
    times.sort_unstable();
    times[times.len() / 2].as_secs_f64() * 1000.0
}

/// `agents` agents, every tenth of version 1.1, every hundredth tagged
/// `canary`, each with an address; agent 1 with a day of samples and 50 streams.
async fn populate(pool: &sqlx::AnyPool, agents: usize) {
    let n = i64::try_from(agents).expect("a count");
    let statements = [
        "INSERT INTO agents (id, hostname, version, product, addresses, address_text, first_seen, last_seen, heartbeat) \
         SELECT 'agent-' || lpad(g::text, 6, '0'), 'host-' || g, CASE WHEN g % 10 = 0 THEN '1.1' ELSE '1.0' END, \
         'keel-agent', '{\"intranet_ipv4\":[\"10.0.' || (g / 256 % 256) || '.' || (g % 256) || '\"],\"extranet_ipv4\":[],\
         \"intranet_ipv6\":[],\"extranet_ipv6\":[]}', '10.0.' || (g / 256 % 256) || '.' || (g % 256), 0, 0, \
         '{\"cpu\":\"0.5\",\"rss\":\"20000000\"}' \
         FROM generate_series(1, $1) g",
        "INSERT INTO agent_tags (agent_id, tag) SELECT 'agent-' || lpad(g::text, 6, '0'), 'canary' \
         FROM generate_series(100, $1, 100) g",
        "INSERT INTO agent_samples (agent_id, at, cpu_centi, rss, records_milli, spool_bytes) \
         SELECT 'agent-000001', (extract(epoch from now())::bigint * 1000) - g * 300000, g % 50, 20000000 + g, g * 10, 0 \
         FROM generate_series(0, 287) g WHERE $1 > 0",
        "INSERT INTO agent_sessions (agent_id, connected_at, disconnected_at, instance) \
         SELECT 'agent-000001', g * 1000, g * 1000 + 500, 'old' FROM generate_series(1, 50) g WHERE $1 > 0",
    ];
    for sql in statements {
        sqlx::query(sql)
            .bind(n)
            .execute(pool)
            .await
            .unwrap_or_else(|e| panic!("{sql}: {e}"));
    }
}
