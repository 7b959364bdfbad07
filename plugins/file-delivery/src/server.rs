//! The local file server: hands delivered files to sibling components on the same
//! host, over HTTP on a loopback address (port 2080 by default).
//!
//! - `GET /v1/files` lists the files the caller may read: `[{name, version, digest}]`.
//! - `GET /v1/files/{name}` returns one file's content.
//!
//! The caller is known by its user ID: the server looks the connection's client end
//! up in the kernel's socket table (`/proc/net/tcp`, `/proc/net/tcp6`), which
//! names the user that owns the socket. A file is served to root and to the users
//! its delivery lists in `readers`, and to no one else (403). Names are checked as
//! in deliveries and read beneath the files directory without following links, so
//! `..`, absolute names, encoded slashes and planted links all fail (400 or 404).

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};
use std::sync::Arc;

use axum::Router;
use axum::extract::{ConnectInfo, Path, State};
use axum::http::{HeaderValue, StatusCode, header};
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use serde::Serialize;

use crate::envelope;
use crate::store::{Store, StoreError};

/// What the handlers share.
#[derive(Debug)]
struct Shared {
    store: Arc<Store>,
    local: SocketAddr,
}

/// Binds `addr` (before the plugin says it is ready, so that a taken port is an
/// error at start-up) and returns the bound address and the server to run.
pub async fn bind(
    addr: SocketAddr,
    store: Arc<Store>,
) -> std::io::Result<(SocketAddr, impl std::future::Future<Output = std::io::Result<()>>)> {
    let listener = tokio::net::TcpListener::bind(addr).await?;
    let local = listener.local_addr()?;
    let app = Router::new()
        .route("/v1/files", get(list))
        .route("/v1/files/{*name}", get(file))
        .with_state(Arc::new(Shared { store, local }));
    let serve = axum::serve(listener, app.into_make_service_with_connect_info::<SocketAddr>());
    Ok((local, async move { serve.await }))
}

fn refuse(status: StatusCode, msg: impl Into<String>) -> Response {
    (
        status,
        [(header::CACHE_CONTROL, "no-store")],
        format!("{}\n", msg.into()),
    )
        .into_response()
}

#[derive(Debug, Serialize)]
struct Listed {
    name: String,
    version: u64,
    digest: String,
}

async fn list(State(s): State<Arc<Shared>>, ConnectInfo(peer): ConnectInfo<SocketAddr>) -> Response {
    let Some(uid) = peer_uid(peer, s.local) else {
        return refuse(StatusCode::FORBIDDEN, "the caller's user is unknown");
    };
    let files: Vec<Listed> = s
        .store
        .entries()
        .into_iter()
        .filter(|(_, e)| may_read(uid, &e.readers))
        .map(|(name, e)| Listed {
            name,
            version: e.version,
            digest: e.digest,
        })
        .collect();
    ([(header::CACHE_CONTROL, "no-store")], axum::Json(files)).into_response()
}

async fn file(
    State(s): State<Arc<Shared>>,
    ConnectInfo(peer): ConnectInfo<SocketAddr>,
    Path(name): Path<String>,
) -> Response {
    if let Err(e) = envelope::check_name(&name) {
        return refuse(StatusCode::BAD_REQUEST, e);
    }
    let Some(uid) = peer_uid(peer, s.local) else {
        return refuse(StatusCode::FORBIDDEN, "the caller's user is unknown");
    };
    let Some(entry) = s.store.entry(&name) else {
        return refuse(StatusCode::NOT_FOUND, format!("{name}: no such delivered file"));
    };
    if !may_read(uid, &entry.readers) {
        return refuse(StatusCode::FORBIDDEN, format!("uid {uid} is not a reader of {name}"));
    }
    let store = Arc::clone(&s.store);
    let read = tokio::task::spawn_blocking(move || store.read(&name)).await;
    match read {
        Ok(Ok((content, _))) => {
            let mut resp = (
                [
                    (header::CONTENT_TYPE, "application/octet-stream"),
                    (header::CACHE_CONTROL, "no-store"),
                ],
                content,
            )
                .into_response();
            if let Ok(v) = HeaderValue::from_str(&entry.version.to_string()) {
                resp.headers_mut().insert("x-keel-version", v);
            }
            resp
        }
        Ok(Err(e @ (StoreError::NotFound(_) | StoreError::NotBeneath(_) | StoreError::NotRegular(_)))) => {
            refuse(StatusCode::NOT_FOUND, e.to_string())
        }
        Ok(Err(e)) => {
            tracing::warn!(error = %e, "file server: read failed");
            refuse(StatusCode::INTERNAL_SERVER_ERROR, "read failed")
        }
        Err(_) => refuse(StatusCode::INTERNAL_SERVER_ERROR, "read failed"),
    }
}

/// Root, and the users a file names as readers (by name or numeric ID).
fn may_read(uid: u32, readers: &[String]) -> bool {
    uid == 0
        || readers.iter().any(|r| match r.parse::<u32>() {
            Ok(n) => n == uid,
            Err(_) => nix::unistd::User::from_name(r)
                .ok()
                .flatten()
                .is_some_and(|u| u.uid.as_raw() == uid),
        })
}

/// The user owning the client end of a loopback connection from `peer` to `local`.
pub fn peer_uid(peer: SocketAddr, local: SocketAddr) -> Option<u32> {
    let tables: &[&str] = match (peer.ip(), local.ip()) {
        (IpAddr::V4(_), _) => &["/proc/net/tcp", "/proc/net/tcp6"],
        (IpAddr::V6(_), _) => &["/proc/net/tcp6"],
    };
    tables.iter().find_map(|t| {
        let text = std::fs::read_to_string(t).ok()?;
        find_uid(&text, peer, local)
    })
}

/// In a `/proc/net/tcp{,6}` table, the uid of the socket whose local end is
/// `from` and remote end is `to`.
fn find_uid(table: &str, from: SocketAddr, to: SocketAddr) -> Option<u32> {
    table.lines().skip(1).find_map(|line| {
        let cols: Vec<&str> = line.split_whitespace().collect();
        let (local, remote, uid) = (cols.get(1)?, cols.get(2)?, cols.get(7)?);
        (same(parse_addr(local)?, from) && same(parse_addr(remote)?, to)).then(|| uid.parse().ok())?
    })
}

/// Equal, counting an IPv4-mapped IPv6 address as its IPv4 address.
fn same(a: SocketAddr, b: SocketAddr) -> bool {
    let canon = |ip: IpAddr| match ip {
        IpAddr::V6(v6) => v6.to_ipv4_mapped().map_or(ip, IpAddr::V4),
        v4 => v4,
    };
    a.port() == b.port() && canon(a.ip()) == canon(b.ip())
}

/// `0100007F:1F90` (IPv4) or 32 hex digits `:PORT` (IPv6), as the kernel prints
/// them: each 32-bit word in the machine's byte order.
fn parse_addr(s: &str) -> Option<SocketAddr> {
    let (ip, port) = s.split_once(':')?;
    let port = u16::from_str_radix(port, 16).ok()?;
    let word = |i: usize| {
        u32::from_str_radix(ip.get(i * 8..i * 8 + 8)?, 16)
            .ok()
            .map(u32::to_ne_bytes)
    };
    let ip = match ip.len() {
        8 => IpAddr::V4(Ipv4Addr::from(word(0)?)),
        32 => {
            let mut b = [0u8; 16];
            for i in 0..4 {
                b[i * 4..i * 4 + 4].copy_from_slice(&word(i)?);
            }
            IpAddr::V6(Ipv6Addr::from(b))
        }
        _ => return None,
    };
    Some(SocketAddr::new(ip, port))
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    #[test]
    fn the_socket_table_names_the_owner() {
        let lo = |port| SocketAddr::new(IpAddr::V4(Ipv4Addr::LOCALHOST), port);
        // Addresses as a little-endian kernel prints them.
        if cfg!(target_endian = "little") {
            let table = "  sl  local_address rem_address   st tx_queue rx_queue tr tm->when retrnsmt   uid  timeout inode\n\
               0: 0100007F:0820 00000000:0000 0A 00000000:00000000 00:00000000 00000000     0        0 1 1\n\
               1: 0100007F:A2B4 0100007F:0820 01 00000000:00000000 00:00000000 00000000  1000        0 2 1\n\
               2: 0100007F:0820 0100007F:A2B4 01 00000000:00000000 00:00000000 00000000     0        0 3 1\n";
            assert_eq!(find_uid(table, lo(0xA2B4), lo(0x0820)), Some(1000));
            assert_eq!(find_uid(table, lo(0xA2B5), lo(0x0820)), None);
            let v6 = "x\n 0: 00000000000000000000000001000000:0820 00000000000000000000000001000000:A2B4 01 0 0 0 65534 0 1\n";
            let one = SocketAddr::new(IpAddr::V6(Ipv6Addr::LOCALHOST), 0x0820);
            let peer = SocketAddr::new(IpAddr::V6(Ipv6Addr::LOCALHOST), 0xA2B4);
            assert_eq!(find_uid(v6, one, peer), Some(65534));
        }
        assert!(may_read(0, &[]));
        assert!(!may_read(1000, &[]));
        assert!(may_read(1000, &["1000".into()]));
        assert!(may_read(0, &["nobody".into()]));
        assert!(!may_read(1000, &["root".into()]));
    }

    #[test]
    fn a_live_connection_is_attributed_to_this_process_s_user() {
        let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let local = listener.local_addr().unwrap();
        let client = std::net::TcpStream::connect(local).unwrap();
        let (_conn, peer) = listener.accept().unwrap();
        assert_eq!(peer, client.local_addr().unwrap());
        assert_eq!(peer_uid(peer, local), Some(nix::unistd::geteuid().as_raw()));
    }
}
