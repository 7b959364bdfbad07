//! A network a test can cut: a network namespace of its own joined to the host by
//! a veth pair with a /30 of private addresses. Removed when dropped (deleting the
//! namespace deletes the pair). Needs root and `ip` (iproute2).

use std::process::Command;
use std::sync::atomic::{AtomicU32, Ordering};

static NEXT: AtomicU32 = AtomicU32::new(0);

/// A namespace with one link to the host.
#[derive(Debug)]
pub struct NetNs {
    /// The namespace, for `ip netns exec`.
    pub name: String,
    /// The host's end of the link.
    pub host_if: String,
    /// The host's address on the link.
    pub host_ip: String,
    /// The namespace's address on the link.
    pub ns_ip: String,
}

fn ip(args: &[&str]) {
    let out = Command::new("ip").args(args).output().expect("run ip (iproute2)");
    assert!(
        out.status.success(),
        "ip {}: {}",
        args.join(" "),
        String::from_utf8_lossy(&out.stderr)
    );
}

impl NetNs {
    /// Makes the namespace and its link, both ends up.
    pub fn create() -> NetNs {
        let n = NEXT.fetch_add(1, Ordering::Relaxed);
        let pid = std::process::id();
        let tag = format!("{:x}{n}", pid % 0xffff);
        let name = format!("keelns{tag}");
        let host_if = format!("kh{tag}");
        let ns_if = format!("kn{tag}");
        // 10.123.<pid>.<4n>/30: distinct per process and per namespace in it.
        let (c, d) = (pid % 250, (n % 60) * 4);
        let host_ip = format!("10.123.{c}.{}", d + 1);
        let ns_ip = format!("10.123.{c}.{}", d + 2);
        let _ = Command::new("ip").args(["netns", "del", &name]).output();
        ip(&["netns", "add", &name]);
        let ns = NetNs {
            name,
            host_if,
            host_ip,
            ns_ip,
        };
        ip(&["link", "add", &ns.host_if, "type", "veth", "peer", "name", &ns_if]);
        ip(&["link", "set", &ns_if, "netns", &ns.name]);
        ip(&["addr", "add", &format!("{}/30", ns.host_ip), "dev", &ns.host_if]);
        ip(&["link", "set", &ns.host_if, "up"]);
        let in_ns = |args: &[&str]| {
            let mut all = vec!["netns", "exec", &ns.name, "ip"];
            all.extend_from_slice(args);
            ip(&all);
        };
        in_ns(&["addr", "add", &format!("{}/30", ns.ns_ip), "dev", &ns_if]);
        in_ns(&["link", "set", &ns_if, "up"]);
        in_ns(&["link", "set", "lo", "up"]);
        ns
    }

    /// Cuts the link: nothing crosses it, in either direction, until [`restore`](Self::restore).
    pub fn cut(&self) {
        ip(&["link", "set", &self.host_if, "down"]);
    }

    /// Joins the link again.
    pub fn restore(&self) {
        ip(&["link", "set", &self.host_if, "up"]);
    }
}

impl Drop for NetNs {
    fn drop(&mut self) {
        let _ = Command::new("ip").args(["netns", "del", &self.name]).output();
        let _ = Command::new("ip").args(["link", "del", &self.host_if]).output();
    }
}
