//! The proxy's configuration: a local TOML file that only root can change.
//!
//! The allow list decides which intranet addresses the server's audit jobs may
//! reach through this host, so it never comes from the server: `DETAIL` may only
//! name the file (`{"config": "/etc/keel/proxy.toml"}`), and the file must pass
//! [`keel_plugin_sdk::local::check_trusted`].

use std::net::{IpAddr, SocketAddr};
use std::path::{Path, PathBuf};
use std::time::Duration;

use ipnet::IpNet;
use serde::Deserialize;

/// Where the configuration is unless `DETAIL` says otherwise.
pub const DEFAULT_PATH: &str = "/etc/keel/proxy.toml";
/// The most allow-list entries.
pub const MAX_RULES: usize = 1024;

/// One allow-list entry: a network and a port range.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Rule {
    /// Addresses.
    pub net: IpNet,
    /// First port.
    pub first: u16,
    /// Last port.
    pub last: u16,
}

impl Rule {
    /// Parses `10.0.0.0/8:443`, `10.1.2.3:8000-8100`, `192.168.0.0/16:*`,
    /// `[fd00::/8]:443` (an address without a prefix is one host).
    pub fn parse(s: &str) -> Result<Rule, String> {
        let (addr, ports) = if let Some(rest) = s.strip_prefix('[') {
            let (a, p) = rest
                .split_once("]:")
                .ok_or_else(|| format!("{s:?}: an IPv6 entry is [net]:ports"))?;
            (a, p)
        } else {
            let (a, p) = s
                .rsplit_once(':')
                .ok_or_else(|| format!("{s:?}: an entry is net:ports, e.g. 10.0.0.0/8:443"))?;
            if a.contains(':') {
                return Err(format!("{s:?}: an IPv6 entry is [net]:ports"));
            }
            (a, p)
        };
        let net = match addr.parse::<IpNet>() {
            Ok(n) => n.trunc(),
            Err(_) => IpNet::from(
                addr.parse::<IpAddr>()
                    .map_err(|_| format!("{s:?}: {addr:?} is not an address or network (names are not allowed: the list is checked after DNS)"))?,
            ),
        };
        let port = |p: &str| {
            p.parse::<u16>()
                .ok()
                .filter(|p| *p > 0)
                .ok_or_else(|| format!("{s:?}: {p:?} is not a port (1-65535)"))
        };
        let (first, last) = match ports {
            "*" => (1, u16::MAX),
            p => match p.split_once('-') {
                Some((a, b)) => (port(a)?, port(b)?),
                None => (port(p)?, port(p)?),
            },
        };
        if first > last {
            return Err(format!("{s:?}: the port range is empty"));
        }
        Ok(Rule { net, first, last })
    }

    /// Whether `addr` is inside.
    pub fn allows(&self, addr: SocketAddr) -> bool {
        let ip = match addr.ip() {
            IpAddr::V6(v6) => v6.to_ipv4_mapped().map_or(addr.ip(), IpAddr::V4),
            v4 => v4,
        };
        self.net.contains(&ip) && (self.first..=self.last).contains(&addr.port())
    }
}

/// The configuration, checked.
#[derive(Debug, Clone)]
pub struct Config {
    /// The file it came from.
    pub path: PathBuf,
    /// What the server may reach through this host.
    pub allow: Vec<Rule>,
    /// The server's tunnel endpoint, `host:port`.
    pub tunnel: String,
    /// The Keel CA (to check the tunnel endpoint).
    pub ca_file: PathBuf,
    /// The agent's certificate and key (this host's identity at the tunnel endpoint).
    pub cert_file: PathBuf,
    /// See `cert_file`.
    pub key_file: PathBuf,
    /// Jobs at once; more are refused.
    pub max_jobs: usize,
    /// The longest a tunnel stays open.
    pub max_job_time: Duration,
    /// The most bytes a tunnel carries, both ways together.
    pub max_job_bytes: u64,
    /// Connecting to a target or to the tunnel endpoint.
    pub connect_timeout: Duration,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct Raw {
    allow: Vec<String>,
    tunnel: String,
    #[serde(default = "default_ca")]
    ca_file: PathBuf,
    #[serde(default = "default_cert")]
    cert_file: PathBuf,
    #[serde(default = "default_key")]
    key_file: PathBuf,
    #[serde(default = "default_max_jobs")]
    max_jobs: usize,
    #[serde(default = "default_max_job_seconds")]
    max_job_seconds: u64,
    #[serde(default = "default_max_job_bytes")]
    max_job_bytes: u64,
    #[serde(default = "default_connect_timeout")]
    connect_timeout_seconds: u64,
}

fn default_ca() -> PathBuf {
    PathBuf::from("/var/lib/keel-agent/pki/ca.pem")
}
fn default_cert() -> PathBuf {
    PathBuf::from("/var/lib/keel-agent/pki/agent.pem")
}
fn default_key() -> PathBuf {
    PathBuf::from("/var/lib/keel-agent/pki/agent.key")
}
fn default_max_jobs() -> usize {
    8
}
fn default_max_job_seconds() -> u64 {
    60
}
fn default_max_job_bytes() -> u64 {
    16 << 20
}
fn default_connect_timeout() -> u64 {
    5
}

/// The configuration file `DETAIL` names, or the default.
pub fn path_from_detail(detail: &str) -> Result<PathBuf, String> {
    keel_plugin_sdk::local::config_path(detail, DEFAULT_PATH).map_err(|e| e.to_string())
}

/// Reads and checks the configuration at `path`.
pub fn load(path: &Path) -> Result<Config, String> {
    let text = keel_plugin_sdk::local::read_trusted(path).map_err(|e| e.to_string())?;
    parse(path, &text)
}

/// Checks the configuration `text` of `path`.
pub fn parse(path: &Path, text: &str) -> Result<Config, String> {
    let at = |key: &str, msg: String| format!("{}: {key}: {msg}", path.display());
    let raw: Raw = toml::from_str(text).map_err(|e| format!("{}: {}", path.display(), e.message()))?;
    if raw.allow.len() > MAX_RULES {
        return Err(at("allow", format!("more than {MAX_RULES} entries")));
    }
    let allow = raw
        .allow
        .iter()
        .enumerate()
        .map(|(i, r)| Rule::parse(r).map_err(|m| at(&format!("allow[{i}]"), m)))
        .collect::<Result<Vec<_>, _>>()?;
    if raw
        .tunnel
        .rsplit_once(':')
        .and_then(|(_, p)| p.parse::<u16>().ok())
        .is_none()
    {
        return Err(at("tunnel", format!("{:?} is not host:port", raw.tunnel)));
    }
    let bounded = |key: &str, v: u64, max: u64| {
        if v == 0 || v > max {
            Err(at(key, format!("must be 1-{max}")))
        } else {
            Ok(v)
        }
    };
    let max_jobs = bounded("max_jobs", raw.max_jobs as u64, 256)? as usize;
    let max_job_seconds = bounded("max_job_seconds", raw.max_job_seconds, 3600)?;
    let max_job_bytes = bounded("max_job_bytes", raw.max_job_bytes, 1 << 30)?;
    let connect = bounded("connect_timeout_seconds", raw.connect_timeout_seconds, 60)?;
    Ok(Config {
        path: path.to_owned(),
        allow,
        tunnel: raw.tunnel,
        ca_file: raw.ca_file,
        cert_file: raw.cert_file,
        key_file: raw.key_file,
        max_jobs,
        max_job_time: Duration::from_secs(max_job_seconds),
        max_job_bytes,
        connect_timeout: Duration::from_secs(connect),
    })
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    fn sa(s: &str) -> SocketAddr {
        s.parse().unwrap()
    }

    #[test]
    fn rules_parse_and_match() {
        let r = Rule::parse("10.0.0.0/8:443").unwrap();
        assert!(r.allows(sa("10.9.8.7:443")));
        assert!(!r.allows(sa("10.9.8.7:444")));
        assert!(!r.allows(sa("11.0.0.1:443")));
        assert!(r.allows(sa("[::ffff:10.1.1.1]:443")), "IPv4-mapped counts as IPv4");
        let r = Rule::parse("10.1.2.3:8000-8100").unwrap();
        assert!(r.allows(sa("10.1.2.3:8050")) && !r.allows(sa("10.1.2.4:8050")));
        let r = Rule::parse("192.168.1.77/16:*").unwrap();
        assert_eq!(r.net.to_string(), "192.168.0.0/16");
        assert!(r.allows(sa("192.168.200.1:1")));
        let r = Rule::parse("[fd00::/8]:443").unwrap();
        assert!(r.allows(sa("[fd12::1]:443")) && !r.allows(sa("[fe80::1]:443")));
        for (bad, why) in [
            ("db.internal:5432", "names are not allowed"),
            ("10.0.0.0/8", "an entry is net:ports"),
            ("10.0.0.0/8:0", "is not a port"),
            ("10.0.0.0/8:443-80", "range is empty"),
            ("10.0.0.0/33:443", "not an address or network"),
            ("fd00::/8:443", "an IPv6 entry is [net]:ports"),
            ("[fd00::/8:443", "an IPv6 entry is [net]:ports"),
            ("nothing", "an entry is net:ports"),
        ] {
            let e = Rule::parse(bad).unwrap_err();
            assert!(e.contains(why), "{bad}: {e}");
        }
    }

    #[test]
    fn configuration_errors_name_the_key() {
        let p = Path::new("/etc/keel/proxy.toml");
        let c = parse(p, "allow = [\"10.0.0.0/8:443\"]\ntunnel = \"keel:6753\"\n").unwrap();
        assert_eq!(c.max_jobs, 8);
        assert_eq!(c.max_job_time, Duration::from_secs(60));
        for (text, want) in [
            ("allow = [\"x\"]\ntunnel = \"keel:6753\"", "allow[0]:"),
            ("allow = []\ntunnel = \"keel\"", "tunnel: \"keel\" is not host:port"),
            ("allow = []\ntunnel = \"k:1\"\nmax_jobs = 0", "max_jobs: must be 1-256"),
            (
                "allow = []\ntunnel = \"k:1\"\nmax_job_seconds = 99999",
                "max_job_seconds: must be 1-3600",
            ),
            ("allow = []\ntunnel = \"k:1\"\nextra = 1", "unknown field `extra`"),
            ("tunnel = \"k:1\"", "missing field `allow`"),
        ] {
            let e = parse(p, text).unwrap_err();
            assert!(e.contains(want) && e.starts_with("/etc/keel/proxy.toml"), "{text}: {e}");
        }
        assert!(
            path_from_detail(r#"{"allow":["0.0.0.0/0:*"]}"#)
                .unwrap_err()
                .contains("unknown field")
        );
    }
}
