//! The aggregator's listener: accepts TCP under a connection cap, runs the
//! TLS handshake with a deadline and the certificates and revocation list
//! in force (reloadable without dropping a connection), and caps the
//! connections of each identity and of callers without a certificate.
//! tonic serves only connections that passed all of it.
//!
//! Client certificates stay optional at the TLS layer, so that a caller
//! without one gets a gRPC status that says so; such a connection counts
//! against a small cap and is closed after a short lifetime.

use std::collections::HashMap;
use std::future::Future;
use std::io;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::{Arc, Mutex, RwLock};
use std::task::{Context, Poll};
use std::time::{Duration, Instant};

use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, CertificateRevocationListDer, PrivateKeyDer};
use rustls::server::WebPkiClientVerifier;
use rustls::{RootCertStore, ServerConfig};
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::mpsc;
use tokio_rustls::server::TlsStream;
use tokio_stream::wrappers::ReceiverStream;
use tonic::transport::server::Connected;

use super::auth::AUDIT;
use super::metrics::Metrics;
use crate::config::LimitsConfig;
use crate::tls::{Identity, TlsFiles};

/// Refusals of one kind are logged at most this often; each is counted.
const LOG_EVERY: Duration = Duration::from_secs(1);

/// Connections handed to tonic, at most this many waiting.
const READY_QUEUE: usize = 64;

#[derive(Debug, thiserror::Error)]
pub enum ListenError {
    #[error(transparent)]
    Files(#[from] crate::tls::TlsError),
    #[error("{path}: {what}")]
    Bad { path: String, what: String },
    #[error("TLS configuration: {0}")]
    Rustls(String),
}

/// The server's TLS configuration from its files: its certificate and key,
/// the CA that signs clients, and the CA's revocation list when there is one.
pub fn server_config(files: &TlsFiles) -> Result<ServerConfig, ListenError> {
    let (ca, cert, key) = files.read()?;
    let bad = |path: &std::path::Path, what: String| ListenError::Bad {
        path: path.display().to_string(),
        what,
    };
    let certs = |pem: &str, path: &std::path::Path| {
        CertificateDer::pem_slice_iter(pem.as_bytes())
            .collect::<Result<Vec<_>, _>>()
            .map_err(|e| bad(path, format!("not a PEM certificate: {e}")))
    };
    let mut roots = RootCertStore::empty();
    for c in certs(&ca, &files.ca)? {
        roots
            .add(c)
            .map_err(|e| bad(&files.ca, format!("not a CA certificate: {e}")))?;
    }
    let mut verifier = WebPkiClientVerifier::builder(Arc::new(roots)).allow_unauthenticated();
    if let Some(path) = &files.crl {
        let text = std::fs::read(path).map_err(|e| bad(path, e.to_string()))?;
        let crls = CertificateRevocationListDer::pem_slice_iter(&text)
            .collect::<Result<Vec<_>, _>>()
            .map_err(|e| bad(path, format!("not a PEM revocation list: {e}")))?;
        if crls.is_empty() {
            return Err(bad(path, "holds no revocation list".into()));
        }
        verifier = verifier.with_crls(crls).allow_unknown_revocation_status();
    }
    let verifier = verifier
        .build()
        .map_err(|e| ListenError::Rustls(e.to_string()))?;
    let key = PrivateKeyDer::from_pem_slice(key.as_bytes())
        .map_err(|e| bad(&files.key, format!("not a PEM private key: {e}")))?;
    let mut config = ServerConfig::builder()
        .with_client_cert_verifier(verifier)
        .with_single_cert(certs(&cert, &files.cert)?, key)
        .map_err(|e| ListenError::Rustls(e.to_string()))?;
    config.alpn_protocols = vec![b"h2".to_vec()];
    Ok(config)
}

/// What holds a connection slot.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
enum Slot {
    Connection,
    Unauthenticated,
    Identity(String),
}

#[derive(Default)]
struct Counts {
    connections: usize,
    unauthenticated: usize,
    per_identity: HashMap<String, usize>,
}

/// The listener's shared state.
pub struct Gate {
    tls: RwLock<Arc<ServerConfig>>,
    limits: LimitsConfig,
    counts: Mutex<Counts>,
    metrics: Arc<Metrics>,
    logged: Mutex<HashMap<&'static str, Instant>>,
    /// The day each identity was last warned of its certificate's expiry.
    warned: Mutex<HashMap<String, i64>>,
    /// Where the accept loop runs, once it does.
    accepting: Mutex<Option<SocketAddr>>,
    /// The last failed accept, and why.
    accept_failed: Mutex<Option<(Instant, String)>>,
}

/// A lock whose holder panicked still holds usable counts.
fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

/// An accept that failed this recently makes the listener not ready.
const ACCEPT_FAILED_FOR: Duration = Duration::from_secs(5);

impl Gate {
    pub fn new(
        files: TlsFiles,
        limits: LimitsConfig,
        metrics: Arc<Metrics>,
    ) -> Result<Arc<Gate>, ListenError> {
        let tls = RwLock::new(Arc::new(server_config(&files)?));
        let gate = Arc::new(Gate {
            tls,
            limits,
            counts: Mutex::default(),
            metrics,
            logged: Mutex::default(),
            warned: Mutex::default(),
            accepting: Mutex::default(),
            accept_failed: Mutex::default(),
        });
        gate.check_own(&files);
        Ok(gate)
    }

    /// Exports and logs the expiry of the aggregator's own certificate and
    /// of its CA; called at start, on reload and daily.
    pub fn check_own(&self, files: &TlsFiles) {
        let now = crate::model::now_unix_ms() / 1000;
        for (role, path) in [("aggregator", &files.cert), ("ca", &files.ca)] {
            if let Some(t) = crate::tls::pem_not_after(path) {
                self.metrics.cert_expiry(role, role, t);
                crate::tls::log_expiry(&format!("the {role} certificate"), path, t, now);
            }
        }
    }

    /// Exports a client certificate's expiry, and warns once a day per
    /// identity inside 30 days of it.
    fn check_client(&self, id: &Identity, der: &[u8]) {
        let Some(t) = crate::tls::not_after(der) else {
            return;
        };
        let (role, name) = match id {
            Identity::Agent(n) => ("agent", n),
            Identity::Operator(n) => ("operator", n),
        };
        self.metrics.cert_expiry(role, name, t);
        let now = crate::model::now_unix_ms() / 1000;
        let left = t - now;
        if left > crate::tls::EXPIRY_WARN_SECS {
            return;
        }
        let mut warned = lock(&self.warned);
        let today = now.div_euclid(86_400);
        if warned.get(&id.to_string()) == Some(&today) {
            return;
        }
        warned.insert(id.to_string(), today);
        tracing::warn!(
            target: AUDIT,
            identity = %id,
            days_left = left.div_euclid(86_400),
            "the certificate of {id} expires in {} days",
            left.div_euclid(86_400)
        );
    }

    /// Reads the certificate, key, CA and revocation list `files` names.
    /// New handshakes use them; connections already up are kept. On an
    /// error the files in force stay.
    pub fn reload(&self, files: &TlsFiles) -> Result<(), ListenError> {
        let fresh = server_config(files)?;
        *self.tls.write().unwrap_or_else(|p| p.into_inner()) = Arc::new(fresh);
        self.check_own(files);
        Ok(())
    }

    fn counts(&self) -> std::sync::MutexGuard<'_, Counts> {
        lock(&self.counts)
    }

    /// Takes a slot, or None when its limit is reached.
    fn take(self: &Arc<Self>, slot: Slot) -> Option<Held> {
        let l = &self.limits;
        let mut c = self.counts();
        let ok = match &slot {
            Slot::Connection => bump(&mut c.connections, l.max_connections),
            Slot::Unauthenticated => bump(&mut c.unauthenticated, l.max_unauthenticated),
            Slot::Identity(id) => bump(
                c.per_identity.entry(id.clone()).or_default(),
                l.max_connections_per_identity,
            ),
        };
        ok.then(|| Held {
            gate: self.clone(),
            slot,
        })
    }

    fn give_back(&self, slot: &Slot) {
        let mut c = self.counts();
        match slot {
            Slot::Connection => c.connections = c.connections.saturating_sub(1),
            Slot::Unauthenticated => c.unauthenticated = c.unauthenticated.saturating_sub(1),
            Slot::Identity(id) => {
                if let Some(n) = c.per_identity.get_mut(id) {
                    *n = n.saturating_sub(1);
                    if *n == 0 {
                        c.per_identity.remove(id);
                    }
                }
            }
        }
    }

    /// Counts a refusal; logs it to the audit target unless one of its kind
    /// was logged within `LOG_EVERY`.
    fn refused(&self, reason: &'static str, remote: Option<SocketAddr>, detail: &str) {
        self.metrics.refused(reason);
        let now = Instant::now();
        let mut logged = lock(&self.logged);
        if logged
            .get(reason)
            .is_some_and(|t| now.duration_since(*t) < LOG_EVERY)
        {
            return;
        }
        logged.insert(reason, now);
        tracing::warn!(target: AUDIT, remote = ?remote, reason, "refused a connection: {detail}");
    }

    /// Accepts connections on `listener` until it is dropped, and yields
    /// those that passed the handshake and the caps.
    pub fn incoming(self: Arc<Self>, listener: TcpListener) -> ReceiverStream<io::Result<Conn>> {
        let (tx, rx) = mpsc::channel(READY_QUEUE);
        tokio::spawn(async move {
            *lock(&self.accepting) = listener.local_addr().ok();
            loop {
                let (tcp, remote) = match listener.accept().await {
                    Ok(c) => c,
                    Err(e) => {
                        *lock(&self.accept_failed) = Some((Instant::now(), e.to_string()));
                        // Out of file descriptors, say: back off instead of
                        // spinning on the error.
                        self.refused("accept-error", None, &e.to_string());
                        tokio::time::sleep(Duration::from_millis(100)).await;
                        continue;
                    }
                };
                let Some(slot) = self.take(Slot::Connection) else {
                    self.refused(
                        "connections",
                        Some(remote),
                        &format!(
                            "{} connections open, the limit (limits.max_connections)",
                            self.limits.max_connections
                        ),
                    );
                    continue;
                };
                let _ = tcp.set_nodelay(true);
                if tx.is_closed() {
                    *lock(&self.accepting) = None;
                    return;
                }
                let (gate, ready) = (self.clone(), tx.clone());
                tokio::spawn(async move {
                    if let Some(conn) = gate.handshake(tcp, remote, slot).await {
                        let _ = ready.send(Ok(conn)).await;
                    }
                });
            }
        });
        ReceiverStream::new(rx)
    }

    /// Readiness: the accept loop runs and accepting has not failed lately.
    pub fn check(&self) -> crate::health::Check {
        use crate::health::Check;
        let Some(addr) = *lock(&self.accepting) else {
            return Check::failed("listener", "not accepting connections");
        };
        match &*lock(&self.accept_failed) {
            Some((at, why)) if at.elapsed() < ACCEPT_FAILED_FOR => Check::failed(
                "listener",
                format!(
                    "accepting on {addr} failed {:.1} s ago: {why}",
                    at.elapsed().as_secs_f64()
                ),
            ),
            _ => Check::ok("listener", format!("accepting on {addr}")),
        }
    }

    async fn handshake(
        self: &Arc<Self>,
        tcp: TcpStream,
        remote: SocketAddr,
        connection: Held,
    ) -> Option<Conn> {
        let config = self.tls.read().unwrap_or_else(|p| p.into_inner()).clone();
        let accept = tokio_rustls::TlsAcceptor::from(config).accept(tcp);
        let tls = match tokio::time::timeout(self.limits.handshake_timeout, accept).await {
            Ok(Ok(tls)) => tls,
            Ok(Err(e)) => {
                self.refused(
                    "handshake",
                    Some(remote),
                    &format!("TLS handshake failed: {e}"),
                );
                return None;
            }
            Err(_) => {
                self.refused(
                    "handshake-timeout",
                    Some(remote),
                    &format!(
                        "no TLS handshake within {:?} (limits.handshake_timeout)",
                        self.limits.handshake_timeout
                    ),
                );
                return None;
            }
        };
        let first = tls
            .get_ref()
            .1
            .peer_certificates()
            .and_then(|certs| certs.first());
        let identity = first.and_then(|c| Identity::from_der(c));
        if let (Some(id), Some(der)) = (&identity, first) {
            self.check_client(id, der);
        }
        let (slot, deadline) = match &identity {
            Some(id) => (Slot::Identity(id.to_string()), None),
            None => (
                Slot::Unauthenticated,
                Some(Box::pin(tokio::time::sleep(
                    self.limits.unauthenticated_lifetime,
                ))),
            ),
        };
        let Some(held) = self.take(slot) else {
            let what = match &identity {
                Some(id) => format!(
                    "{id} already has {} connections open (limits.max_connections_per_identity)",
                    self.limits.max_connections_per_identity
                ),
                None => format!(
                    "{} connections without a client certificate are open (limits.max_unauthenticated)",
                    self.limits.max_unauthenticated
                ),
            };
            self.refused("identity-connections", Some(remote), &what);
            return None;
        };
        Some(Conn {
            io: tls,
            _slots: [connection, held],
            deadline,
        })
    }
}

fn bump(n: &mut usize, limit: usize) -> bool {
    if *n >= limit {
        return false;
    }
    *n += 1;
    true
}

/// A slot, given back when the connection closes.
pub struct Held {
    gate: Arc<Gate>,
    slot: Slot,
}

impl Drop for Held {
    fn drop(&mut self) {
        self.gate.give_back(&self.slot);
    }
}

/// One connection that passed the listener.
pub struct Conn {
    io: TlsStream<TcpStream>,
    _slots: [Held; 2],
    /// Set for a connection without a client certificate: when it passes,
    /// reads fail and the connection closes.
    deadline: Option<Pin<Box<tokio::time::Sleep>>>,
}

impl AsyncRead for Conn {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        if let Some(d) = self.deadline.as_mut() {
            if d.as_mut().poll(cx).is_ready() {
                return Poll::Ready(Err(io::Error::new(
                    io::ErrorKind::TimedOut,
                    "a connection without a client certificate reached its lifetime",
                )));
            }
        }
        Pin::new(&mut self.io).poll_read(cx, buf)
    }
}

impl AsyncWrite for Conn {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.io).poll_write(cx, buf)
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.io).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.io).poll_shutdown(cx)
    }

    fn poll_write_vectored(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.io).poll_write_vectored(cx, bufs)
    }

    fn is_write_vectored(&self) -> bool {
        self.io.is_write_vectored()
    }
}

impl Connected for Conn {
    type ConnectInfo = <TlsStream<TcpStream> as Connected>::ConnectInfo;

    fn connect_info(&self) -> Self::ConnectInfo {
        self.io.connect_info()
    }
}
