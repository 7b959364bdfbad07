//! Discovery: a sweep of what the allow list permits, for services that accept a
//! TCP connection, so the server can scan them for TLS.
//!
//! Only the allow list's own addresses and ports are tried, never beyond it. A
//! rule's ports are all tried when the range is small ([`MAX_RANGE_PORTS`]);
//! from a wider range (`*`, `1-65535`) only the ports asked for (by default
//! [`TLS_PORTS`]). A network larger than [`MAX_NET_HOSTS`] addresses is skipped
//! and named in the answer, and at most [`MAX_CANDIDATES`] endpoints are tried
//! per sweep, [`CONCURRENCY`] at a time, each connect bounded by
//! [`CONNECT_TIMEOUT`]; a connection is closed as soon as it is made. The answer
//! (the task result's message) is JSON: `open` (at most [`MAX_OPEN`]), `tried`,
//! `skipped`.

use std::net::SocketAddr;
use std::time::Duration;

use serde::{Deserialize, Serialize};

use crate::config::{Config, Rule};

/// Ports tried in a wide range when the request names none: where TLS services
/// usually listen.
pub const TLS_PORTS: [u16; 14] = [
    443, 465, 636, 853, 989, 990, 992, 993, 995, 5061, 5671, 6443, 8443, 9443,
];
/// A range of at most this many ports is tried whole.
pub const MAX_RANGE_PORTS: u32 = 64;
/// A network of more addresses than this is skipped.
pub const MAX_NET_HOSTS: u128 = 4096;
/// Endpoints tried in one sweep at most.
pub const MAX_CANDIDATES: usize = 16_384;
/// Open endpoints reported at most.
pub const MAX_OPEN: usize = 1024;
/// Connects at once.
pub const CONCURRENCY: usize = 128;
/// How long one connect may take.
pub const CONNECT_TIMEOUT: Duration = Duration::from_secs(1);

/// A discovery request (the task's data): the ports to try in wide ranges.
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Request {
    /// Ports to try where a rule allows a wide range; default [`TLS_PORTS`].
    #[serde(default)]
    pub ports: Vec<u16>,
}

impl Request {
    /// Parses the task's data (empty: the defaults).
    pub fn parse(data: &str) -> Result<Request, String> {
        if data.trim().is_empty() {
            return Ok(Request::default());
        }
        let r: Request = serde_json::from_str(data).map_err(|e| format!("discovery request: {e}"))?;
        if r.ports.len() > 256 || r.ports.contains(&0) {
            return Err("discovery request: ports: give at most 256 ports, each 1-65535".into());
        }
        Ok(r)
    }
}

/// What a sweep found.
#[derive(Debug, Serialize, Deserialize, PartialEq, Eq)]
pub struct Found {
    /// Endpoints that accepted a connection, `address:port`.
    pub open: Vec<String>,
    /// Endpoints tried.
    pub tried: usize,
    /// What was not swept, and why.
    pub skipped: Vec<String>,
}

/// The endpoints a sweep tries, and what it skips.
pub fn candidates(rules: &[Rule], ports: &[u16]) -> (Vec<SocketAddr>, Vec<String>) {
    let wide: &[u16] = if ports.is_empty() { &TLS_PORTS } else { ports };
    let mut out = Vec::new();
    let mut skipped = Vec::new();
    for rule in rules {
        let hosts: u128 = match rule.net {
            ipnet::IpNet::V4(n) => 1u128 << (32 - u32::from(n.prefix_len())),
            ipnet::IpNet::V6(n) => 1u128.checked_shl(128 - u32::from(n.prefix_len())).unwrap_or(u128::MAX),
        };
        if hosts > MAX_NET_HOSTS {
            skipped.push(format!("{}: {hosts} addresses, more than {MAX_NET_HOSTS}", rule.net));
            continue;
        }
        let span = u32::from(rule.last) - u32::from(rule.first) + 1;
        let rule_ports: Vec<u16> = if span <= MAX_RANGE_PORTS {
            (rule.first..=rule.last).collect()
        } else {
            wide.iter()
                .copied()
                .filter(|p| (rule.first..=rule.last).contains(p))
                .collect()
        };
        // `hosts()` leaves out an IPv4 network's own and broadcast addresses
        // (not a /31 or /32's).
        for ip in rule.net.hosts() {
            for p in &rule_ports {
                if out.len() == MAX_CANDIDATES {
                    skipped.push(format!("the rest: more than {MAX_CANDIDATES} endpoints"));
                    return (out, skipped);
                }
                out.push(SocketAddr::new(ip, *p));
            }
        }
    }
    out.sort_unstable();
    out.dedup();
    (out, skipped)
}

/// Sweeps what the allow list permits.
pub async fn sweep(config: &Config, req: &Request) -> Found {
    let (candidates, skipped) = candidates(&config.allow, &req.ports);
    let tried = candidates.len();
    let allow = std::sync::Arc::new(config.allow.clone());
    let mut open: Vec<SocketAddr> = Vec::new();
    let mut running = tokio::task::JoinSet::new();
    let mut queue = candidates.into_iter();
    loop {
        while running.len() < CONCURRENCY {
            let Some(addr) = queue.next() else { break };
            let allow = std::sync::Arc::clone(&allow);
            running.spawn(async move {
                // Each one checked again, as a job's connect is: the list decides.
                if !allow.iter().any(|r| r.allows(addr)) {
                    return None;
                }
                match tokio::time::timeout(CONNECT_TIMEOUT, tokio::net::TcpStream::connect(addr)).await {
                    Ok(Ok(_)) => Some(addr),
                    _ => None,
                }
            });
        }
        match running.join_next().await {
            Some(Ok(Some(addr))) => open.push(addr),
            Some(_) => {}
            None => break,
        }
    }
    open.sort_unstable();
    let mut skipped = skipped;
    if open.len() > MAX_OPEN {
        skipped.push(format!(
            "{} open endpoints past the first {MAX_OPEN}",
            open.len() - MAX_OPEN
        ));
        open.truncate(MAX_OPEN);
    }
    Found {
        open: open.iter().map(SocketAddr::to_string).collect(),
        tried,
        skipped,
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    fn rules(list: &[&str]) -> Vec<Rule> {
        list.iter().map(|r| Rule::parse(r).unwrap()).collect()
    }

    #[test]
    fn only_what_the_list_allows_is_tried() {
        let (c, skipped) = candidates(&rules(&["127.0.0.1:8000-8002", "10.0.0.0/30:*", "10.0.0.0/8:443"]), &[]);
        let c: Vec<String> = c.iter().map(ToString::to_string).collect();
        assert!(c.contains(&"127.0.0.1:8000".to_owned()) && c.contains(&"127.0.0.1:8002".to_owned()));
        assert!(!c.contains(&"127.0.0.1:8003".to_owned()));
        // A /30 has two hosts; from `*` only the TLS ports.
        assert!(c.contains(&"10.0.0.1:443".to_owned()) && c.contains(&"10.0.0.2:8443".to_owned()));
        assert!(!c.iter().any(|a| a.starts_with("10.0.0.3:") || a.ends_with(":22")));
        assert_eq!(c.len(), 3 + 2 * TLS_PORTS.len());
        assert_eq!(skipped.len(), 1, "{skipped:?}");
        assert!(skipped[0].contains("10.0.0.0/8"), "{skipped:?}");
        let all = rules(&["127.0.0.1:8000-8002", "10.0.0.0/30:*"]);
        let (c, _) = candidates(&all, &[22, 8001]);
        assert!(c.iter().all(|a| all.iter().any(|r| r.allows(*a))));
        assert!(c.contains(&"10.0.0.1:22".parse().unwrap()));
    }

    #[test]
    fn a_sweep_is_bounded() {
        let (c, skipped) = candidates(&rules(&["10.0.0.0/20:1-64", "10.1.0.0/20:1-64"]), &[]);
        assert_eq!(c.len(), MAX_CANDIDATES);
        assert!(skipped.iter().any(|s| s.contains("more than")), "{skipped:?}");
        assert!(Request::parse("").unwrap().ports.is_empty());
        assert_eq!(Request::parse(r#"{"ports":[443]}"#).unwrap().ports, [443]);
        assert!(Request::parse(r#"{"ports":[0]}"#).is_err());
        assert!(Request::parse(r#"{"x":1}"#).unwrap_err().contains("unknown field"));
    }
}
