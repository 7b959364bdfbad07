//! Certificate renewal over the stream.
//!
//! When 50–60 % of the certificate's lifetime has passed (a random point, so a
//! fleet enrolled together does not renew together), the agent makes a new key and
//! sends its CSR as a data_type 1100 record. The server answers in
//! `Command.renewal`. The new key and certificate are stored and the stream
//! reconnects with them; the old certificate stays valid until it expires.

use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, RwLock};
use std::time::{Duration, Instant};

use keel_common::secret::Secret;
use keel_common::time::now_ms;
use keel_proto::data_type;
use tokio::sync::Notify;
use tokio_util::sync::CancellationToken;
use tracing::{info, warn};

use crate::outbox::Outbox;
use crate::pki::{self, Identity};
use crate::record::Record;

/// An answer slower than this is given up on, and the request made again.
const ANSWER_TIMEOUT: Duration = Duration::from_secs(120);

/// Renews the agent's certificate.
#[derive(Debug)]
pub struct Renewer {
    /// State directory with `pki/`.
    pub state_dir: PathBuf,
    /// Current identity, replaced on success.
    pub identity: Arc<RwLock<Identity>>,
    /// Where the request goes.
    pub outbox: Outbox,
    /// Whether a stream is open.
    pub connected: Arc<AtomicBool>,
    /// Notified after a renewal, so the stream reconnects with the new certificate.
    pub reconnect: Arc<Notify>,
    /// Where in the lifetime to renew, in [0.5, 0.6).
    fraction: f64,
    waiting: Mutex<Option<(Secret, Instant)>>,
}

impl Renewer {
    /// A renewer for the given identity.
    pub fn new(
        state_dir: PathBuf,
        identity: Arc<RwLock<Identity>>,
        outbox: Outbox,
        connected: Arc<AtomicBool>,
        reconnect: Arc<Notify>,
    ) -> Self {
        let fraction = 0.5 + rand::random::<f64>() * 0.1;
        Self {
            state_dir,
            identity,
            outbox,
            connected,
            reconnect,
            fraction,
            waiting: Mutex::new(None),
        }
    }

    fn current(&self) -> Identity {
        self.identity.read().unwrap_or_else(|p| p.into_inner()).clone()
    }

    /// When the current certificate should be renewed, Unix ms.
    pub fn due_at(&self) -> i64 {
        let info = self.current().info;
        let life = (info.not_after_ms - info.not_before_ms).max(0);
        info.not_before_ms + (life as f64 * self.fraction) as i64
    }

    fn lifetime(&self) -> Duration {
        let info = self.current().info;
        Duration::from_millis(u64::try_from(info.not_after_ms - info.not_before_ms).unwrap_or(0))
    }

    /// Checks often enough to renew before two thirds of the lifetime.
    pub async fn run(self: Arc<Self>, shutdown: CancellationToken) {
        loop {
            let check = (self.lifetime() / 50).clamp(Duration::from_millis(200), Duration::from_secs(60));
            tokio::select! {
                _ = shutdown.cancelled() => return,
                _ = tokio::time::sleep(check) => {}
            }
            if now_ms() < self.due_at() || !self.connected.load(Ordering::Relaxed) {
                continue;
            }
            let in_flight = self
                .waiting
                .lock()
                .unwrap_or_else(|p| p.into_inner())
                .as_ref()
                .is_some_and(|(_, at)| at.elapsed() < ANSWER_TIMEOUT);
            if !in_flight {
                self.request().await;
            }
        }
    }

    async fn request(&self) {
        let agent_id = self.current().info.agent_id;
        let req = match tokio::task::spawn_blocking(move || pki::new_key_request(&agent_id)).await {
            Ok(Ok(r)) => r,
            Ok(Err(e)) => return warn!(error = %e, "cannot make a renewal key"),
            Err(e) => return warn!(error = %e, "renewal key task failed"),
        };
        *self.waiting.lock().unwrap_or_else(|p| p.into_inner()) = Some((req.key_pem, Instant::now()));
        info!("requesting certificate renewal");
        self.outbox
            .send(Record::new(data_type::CERT_RENEWAL, [("csr", req.csr_pem)]))
            .await;
    }

    /// Applies the server's answer.
    pub fn complete(&self, answer: Result<String, String>) {
        let Some((key, _)) = self.waiting.lock().unwrap_or_else(|p| p.into_inner()).take() else {
            warn!("renewal answer without a request; ignored");
            return;
        };
        let cert = match answer {
            Ok(c) => c,
            Err(e) => return warn!(reason = %e, "server refused certificate renewal"),
        };
        let agent_id = self.current().info.agent_id;
        if let Err(e) = pki::check_issued(&cert, &key, &agent_id) {
            return warn!(error = %e, "renewed certificate rejected");
        }
        if let Err(e) = pki::store_renewal(&self.state_dir, &key, &cert) {
            return warn!(error = %e, "cannot store the renewed certificate");
        }
        match pki::load(&self.state_dir) {
            Ok(id) => {
                info!(serial = %id.info.serial, "certificate renewed");
                *self.identity.write().unwrap_or_else(|p| p.into_inner()) = id;
                self.reconnect.notify_one();
            }
            Err(e) => warn!(error = %e, "cannot load the renewed certificate"),
        }
    }
}
