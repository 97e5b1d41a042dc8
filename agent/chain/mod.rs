//! Chain sources. Each file here speaks one node API and turns it into
//! heads, headers and status; nothing else in the agent knows the chain.

pub mod algorand;
pub mod bitcoin;
pub mod cometbft;
pub mod ethereum;
pub mod prometheus;
pub mod rpc;
pub mod sim;
pub mod ton;

use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;

use serde::{Deserialize, Serialize};

use crate::config::SourceConfig;
use crate::latency::RpcTimings;
use crate::model::{Hash, Header, HeaderRef, NodeStatus};

/// The chains a source speaks: `source.kind` in the agent config. A new
/// chain adds its file here, a variant, and a line in `build`.
#[derive(Debug, Clone, Copy, Deserialize, Serialize, PartialEq, Eq)]
#[serde(rename_all = "kebab-case")]
pub enum SourceKind {
    Ethereum,
    Bitcoin,
    Cometbft,
    Ton,
    Algorand,
    Prometheus,
}

impl SourceKind {
    /// The header that carries the token from `source.token_file`.
    pub fn token_header(self) -> &'static str {
        match self {
            SourceKind::Algorand => algorand::TOKEN_HEADER,
            _ => ton::KEY_HEADER,
        }
    }
}

/// The source `cfg.kind` names, with its RPC client.
pub fn build(cfg: &SourceConfig, timings: RpcTimings) -> Result<Arc<dyn ChainSource>, String> {
    let rpc = rpc::JsonRpcClient::new(&cfg.url, cfg.timeout, cfg.max_reply_bytes, timings)
        .with_auth(cfg.auth());
    Ok(match cfg.kind {
        SourceKind::Ethereum => Arc::new(ethereum::EthereumSource::new(rpc)),
        SourceKind::Bitcoin => Arc::new(bitcoin::BitcoinSource::new(rpc)),
        SourceKind::Cometbft => Arc::new(cometbft::CometBftSource::new(rpc)),
        SourceKind::Ton => Arc::new(ton::TonSource::new(rpc)),
        SourceKind::Algorand => Arc::new(algorand::AlgorandSource::new(rpc)),
        SourceKind::Prometheus => {
            let map = cfg.metrics.as_ref().ok_or_else(|| {
                "source.metrics: kind prometheus needs a [source.metrics] table".to_string()
            })?;
            Arc::new(
                prometheus::PrometheusSource::new(rpc, map)
                    .map_err(|e| format!("source.metrics: {e}"))?,
            )
        }
    })
}

#[derive(Debug, Clone, thiserror::Error, PartialEq)]
pub enum SourceError {
    #[error("node unreachable: {0}")]
    Unreachable(String),
    /// Nothing accepted the connection at the RPC address.
    #[error("node refused the connection: {0}")]
    Refused(String),
    #[error("node did not answer within {0:?}")]
    Timeout(std::time::Duration),
    #[error("reply larger than the {limit}-byte cap")]
    TooLarge { limit: usize },
    #[error("malformed reply: {0}")]
    Malformed(String),
    #[error("HTTP status {0}")]
    Http(u16),
    #[error("the node answered HTTP {status} redirecting to {to:?}; redirects are not followed, so credentials never leave for another address: point source.url at the node itself")]
    Redirected { status: u16, to: String },
    #[error("RPC error {code}: {message}")]
    Rpc { code: i64, message: String },
    #[error("no block at height {0}")]
    NotFound(u64),
}

impl SourceError {
    /// True when the node answered but does not implement the call.
    pub fn is_method_not_found(&self) -> bool {
        matches!(self, SourceError::Rpc { code: -32601, .. })
    }

    /// What kind of failure this is, for telling whose fault an
    /// unreachable node is.
    pub fn cause(&self) -> Cause {
        match self {
            SourceError::Refused(_) => Cause::Refused,
            SourceError::Timeout(_) => Cause::TimedOut,
            // REST sources carry the HTTP status as the code of an error reply.
            SourceError::Http(s @ (401 | 403)) => Cause::Denied(*s),
            SourceError::Rpc {
                code: c @ (401 | 403),
                ..
            } => Cause::Denied(*c as u16),
            _ => Cause::Other,
        }
    }
}

/// The kinds of RPC failure whose fault can be told apart.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Cause {
    /// Nothing listens at the RPC address.
    Refused,
    /// The connection was made but no answer came in time.
    TimedOut,
    /// The node refused the agent's credentials (HTTP 401 or 403).
    Denied(u16),
    /// Anything else: a name that does not resolve, a reset, a bad reply.
    Other,
}

/// Whether a header's served hash matches its contents (validation level
/// `full`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Verification {
    /// This chain's source cannot recompute hashes.
    NotSupported,
    Match,
    /// The contents hash to `computed`, not to the served hash.
    Mismatch {
        computed: Hash,
    },
    /// The reply lacks what the recomputation needs; says what.
    Unreadable(String),
    /// The hash matches, but the contents break a rule of the chain (say,
    /// proof of work above its target); says which.
    Invalid(String),
}

/// `header` as the source's answer for `height`, or an error if the node
/// answered for another block.
pub fn at_height(header: Header, height: u64) -> Result<Header, SourceError> {
    if header.height != height {
        return Err(SourceError::Malformed(format!(
            "asked for block {height}, got block {}",
            header.height
        )));
    }
    Ok(header)
}

pub type SourceFuture<'a, T> = Pin<Box<dyn Future<Output = Result<T, SourceError>> + Send + 'a>>;

/// What every chain source gives.
pub trait ChainSource: Send + Sync {
    /// Short chain family name ("ethereum", "bitcoin", ...).
    fn chain(&self) -> &'static str;
    fn head(&self) -> SourceFuture<'_, HeaderRef>;
    fn header(&self, height: u64) -> SourceFuture<'_, Header>;
    fn status(&self) -> SourceFuture<'_, NodeStatus>;
    /// Which network the node is on (Ethereum: the decimal chain id).
    fn network_id(&self) -> SourceFuture<'_, String>;
    /// Level `full`: recomputes the header's hash from its contents
    /// (`Header::raw`) and compares it with the served one.
    fn verify(&self, _header: &Header) -> Verification {
        Verification::NotSupported
    }
    /// False for sources that see heights but no block hashes (Prometheus
    /// scrapes): the agent then reads only the head, and hash linkage and
    /// fork checks have nothing to compare.
    fn has_hashes(&self) -> bool {
        true
    }
    /// The JSON-RPC request that subscribes to new heads over a WebSocket
    /// (`source.ws_url`), for chains whose nodes offer one.
    fn head_subscription(&self) -> Option<serde_json::Value> {
        None
    }
    /// True when a message on that WebSocket announces a new head.
    fn is_head_notice(&self, _msg: &serde_json::Value) -> bool {
        false
    }
    /// True for chains whose blocks are final once committed (CometBFT): a
    /// replaced block is then a critical finding whatever its depth.
    fn final_on_commit(&self) -> bool {
        false
    }
    /// True when `verify` does more than answer `NotSupported`.
    fn can_verify(&self) -> bool {
        false
    }
    /// Level `comprehensive`: the header's own fields against the protocol's
    /// bounds, one line per field out of bounds.
    fn check_fields(&self, _header: &Header) -> Vec<String> {
        Vec::new()
    }
}
