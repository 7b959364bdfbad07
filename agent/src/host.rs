//! Facts about the host and this process, read from /proc, uname and os-release.

use std::collections::BTreeMap;
use std::net::IpAddr;
use std::path::Path;

use procfs::{Current, CurrentSI};

/// The host's addresses, split the way `PackagedData` wants them.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Addresses {
    /// Private IPv4 (RFC 1918, CGNAT).
    pub intranet_ipv4: Vec<String>,
    /// Other IPv4.
    pub extranet_ipv4: Vec<String>,
    /// Unique-local IPv6.
    pub intranet_ipv6: Vec<String>,
    /// Global IPv6.
    pub extranet_ipv6: Vec<String>,
}

fn private_v4(ip: std::net::Ipv4Addr) -> bool {
    let o = ip.octets();
    ip.is_private() || (o[0] == 100 && (o[1] & 0xc0) == 64)
}

/// The host's interface addresses, without loopback and link-local ones.
pub fn addresses() -> Addresses {
    let mut out = Addresses::default();
    let Ok(ifaddrs) = nix::ifaddrs::getifaddrs() else {
        return out;
    };
    for ifa in ifaddrs {
        let Some(addr) = ifa.address else { continue };
        let ip = if let Some(v4) = addr.as_sockaddr_in() {
            IpAddr::V4(v4.ip())
        } else if let Some(v6) = addr.as_sockaddr_in6() {
            IpAddr::V6(v6.ip())
        } else {
            continue;
        };
        let list = match ip {
            IpAddr::V4(v4) if v4.is_loopback() || v4.is_link_local() || v4.is_unspecified() => {
                continue;
            }
            IpAddr::V4(v4) if private_v4(v4) => &mut out.intranet_ipv4,
            IpAddr::V4(_) => &mut out.extranet_ipv4,
            IpAddr::V6(v6) if v6.is_loopback() || v6.is_unicast_link_local() || v6.is_unspecified() => {
                continue;
            }
            IpAddr::V6(v6) if v6.is_unique_local() => &mut out.intranet_ipv6,
            IpAddr::V6(_) => &mut out.extranet_ipv6,
        };
        let s = ip.to_string();
        if !list.contains(&s) {
            list.push(s);
        }
    }
    out
}

/// The host name.
pub fn hostname() -> String {
    nix::unistd::gethostname()
        .ok()
        .and_then(|h| h.into_string().ok())
        .unwrap_or_default()
}

/// Facts that do not change while the agent runs.
#[derive(Debug, Clone, Default)]
pub struct Platform {
    /// `uname -r`.
    pub kernel_version: String,
    /// `uname -m`.
    pub arch: String,
    /// os-release `ID`.
    pub platform: String,
    /// os-release `ID_LIKE` (or `ID`).
    pub platform_family: String,
    /// os-release `VERSION_ID`.
    pub platform_version: String,
    /// Boot time, Unix seconds.
    pub boot_time: u64,
    /// Logical CPUs.
    pub nproc: usize,
}

fn os_release(host_root: &Path) -> BTreeMap<String, String> {
    let text = ["etc/os-release", "usr/lib/os-release"]
        .iter()
        .find_map(|p| std::fs::read_to_string(host_root.join(p)).ok())
        .unwrap_or_default();
    text.lines()
        .filter_map(|l| l.split_once('='))
        .map(|(k, v)| (k.trim().to_owned(), v.trim().trim_matches('"').to_owned()))
        .collect()
}

/// Reads the platform facts.
pub fn platform(host_root: &Path) -> Platform {
    let uname = nix::sys::utsname::uname().ok();
    let field = |f: fn(&nix::sys::utsname::UtsName) -> &std::ffi::OsStr| {
        uname
            .as_ref()
            .map(|u| f(u).to_string_lossy().into_owned())
            .unwrap_or_default()
    };
    let os = os_release(host_root);
    let id = os.get("ID").cloned().unwrap_or_default();
    Platform {
        kernel_version: field(nix::sys::utsname::UtsName::release),
        arch: field(nix::sys::utsname::UtsName::machine),
        platform_family: os.get("ID_LIKE").cloned().unwrap_or_else(|| id.clone()),
        platform: id,
        platform_version: os.get("VERSION_ID").cloned().unwrap_or_default(),
        boot_time: procfs::boot_time_secs().unwrap_or_default(),
        nproc: std::thread::available_parallelism().map(usize::from).unwrap_or(1),
    }
}

/// Samples CPU use over time: each call reports use since the previous one.
#[derive(Debug, Default)]
pub struct CpuSampler {
    host: Option<(u64, u64)>,
    process: Option<(u64, std::time::Instant)>,
}

/// One sample of the changing facts.
#[derive(Debug, Clone, Default)]
pub struct Sample {
    /// Load averages.
    pub load: (f32, f32, f32),
    /// Total memory, bytes.
    pub total_mem: u64,
    /// Fraction of memory in use.
    pub mem_usage: f64,
    /// Fraction of all CPUs busy since the last sample.
    pub cpu_usage: f64,
    /// This process: fraction of one CPU used since the last sample.
    pub cpu: f64,
    /// This process: resident set, bytes.
    pub rss: u64,
    /// This process: open file descriptors.
    pub nfd: usize,
    /// This process: threads.
    pub threads: i64,
    /// This process: start time, Unix seconds.
    pub start_time: u64,
}

impl CpuSampler {
    /// Takes a sample.
    pub fn sample(&mut self, boot_time: u64) -> Sample {
        let mut s = Sample::default();
        if let Ok(l) = procfs::LoadAverage::current() {
            s.load = (l.one, l.five, l.fifteen);
        }
        if let Ok(m) = procfs::Meminfo::current() {
            s.total_mem = m.mem_total;
            let available = m.mem_available.unwrap_or(m.mem_free + m.cached + m.buffers);
            if m.mem_total > 0 {
                s.mem_usage = m.mem_total.saturating_sub(available) as f64 / m.mem_total as f64;
            }
        }
        if let Ok(k) = procfs::KernelStats::current() {
            let t = &k.total;
            let idle = t.idle + t.iowait.unwrap_or(0);
            let total =
                t.user + t.nice + t.system + idle + t.irq.unwrap_or(0) + t.softirq.unwrap_or(0) + t.steal.unwrap_or(0);
            if let Some((prev_total, prev_idle)) = self.host {
                let dt = total.saturating_sub(prev_total);
                if dt > 0 {
                    s.cpu_usage = 1.0 - idle.saturating_sub(prev_idle) as f64 / dt as f64;
                }
            }
            self.host = Some((total, idle));
        }
        if let Ok(me) = procfs::process::Process::myself() {
            if let Ok(stat) = me.stat() {
                let ticks = stat.utime + stat.stime;
                let now = std::time::Instant::now();
                if let Some((prev, at)) = self.process {
                    let secs = now.duration_since(at).as_secs_f64();
                    if secs > 0.0 {
                        s.cpu = ticks.saturating_sub(prev) as f64 / procfs::ticks_per_second() as f64 / secs;
                    }
                }
                self.process = Some((ticks, now));
                s.rss = stat.rss * procfs::page_size();
                s.threads = stat.num_threads;
                s.start_time = boot_time + stat.starttime / procfs::ticks_per_second().max(1);
            }
            s.nfd = me.fd_count().unwrap_or(0);
        }
        s
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn classifies_addresses() {
        assert!(private_v4("10.1.2.3".parse().unwrap()));
        assert!(private_v4("100.64.0.1".parse().unwrap()));
        assert!(!private_v4("100.128.0.1".parse().unwrap()));
        assert!(!private_v4("8.8.8.8".parse().unwrap()));
    }

    #[test]
    fn samples_this_process() {
        let mut c = CpuSampler::default();
        let p = platform(Path::new("/"));
        let s = c.sample(p.boot_time);
        assert!(s.rss > 0 && s.nfd > 0 && s.threads >= 1);
        assert!(s.total_mem > 0);
        assert!(!p.kernel_version.is_empty() && !p.arch.is_empty());
        assert!(s.start_time >= p.boot_time);
    }
}
