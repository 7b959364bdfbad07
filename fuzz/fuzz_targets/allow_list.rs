//! The proxy plugin's inputs: allow-list entries (`Rule::parse`), its TOML
//! configuration (`config::parse`) and the 6100 task that asks for a tunnel
//! (`job::Request::parse`, data from the server). Each must refuse, never panic,
//! and what it accepts must satisfy the documented limits.
#![no_main]

use std::net::{IpAddr, SocketAddr};
use std::path::Path;

use keel_plugin_proxy::config::{self, MAX_RULES, Rule};
use keel_plugin_proxy::job::Request;
use libfuzzer_sys::fuzz_target;

fn check_rule(line: &str, rule: &Rule) {
    assert!(
        rule.first >= 1 && rule.first <= rule.last,
        "{line:?} gave ports {}-{}",
        rule.first,
        rule.last
    );
    assert_eq!(rule.net, rule.net.trunc(), "{line:?} gave an untruncated network");
    let inside = rule.net.network();
    // An IPv4-mapped IPv6 network is compared after the address is unmapped: it
    // never matches (see the report); only other networks must allow their own base.
    let mapped = matches!(inside, IpAddr::V6(v6) if v6.to_ipv4_mapped().is_some());
    if !mapped {
        assert!(
            rule.allows(SocketAddr::new(inside, rule.first)),
            "{line:?} refuses its own network"
        );
        assert!(
            rule.allows(SocketAddr::new(inside, rule.last)),
            "{line:?} refuses its own network"
        );
    }
    if rule.first > 1 {
        assert!(!rule.allows(SocketAddr::new(inside, rule.first - 1)));
    }
}

fuzz_target!(|data: &[u8]| {
    let text = String::from_utf8_lossy(data);
    for line in text.lines().take(64) {
        if let Ok(rule) = Rule::parse(line) {
            check_rule(line, &rule);
        }
    }
    if let Ok(cfg) = config::parse(Path::new("/etc/keel/proxy.toml"), &text) {
        assert!(cfg.allow.len() <= MAX_RULES);
        assert!((1..=256).contains(&cfg.max_jobs));
        assert!(cfg.max_job_bytes >= 1 && cfg.max_job_bytes <= 1 << 30);
        for r in &cfg.allow {
            check_rule("(config)", r);
        }
    }
    if let Ok(req) = Request::parse(&text) {
        assert!(!req.job.is_empty() && req.job.len() <= 64);
        assert!(req.token.len() == 64 && req.token.bytes().all(|b| b.is_ascii_hexdigit()));
        let (host, port) = req.target.rsplit_once(':').expect("an accepted target has a port");
        assert!(!host.is_empty() && port.parse::<u16>().is_ok_and(|p| p > 0));
    }
});
