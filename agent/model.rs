//! Domain types shared by the agent and the aggregator. Wire and storage
//! shapes are the generated protobuf types in `crate::proto`.

use std::fmt;
use std::sync::Arc;
use std::time::{SystemTime, UNIX_EPOCH};

use crate::proto;

/// A block hash as raw bytes; shown as 0x-prefixed hex.
#[derive(Clone, PartialEq, Eq, Hash, Default)]
pub struct Hash(pub Vec<u8>);

impl Hash {
    pub fn from_hex(s: &str) -> Option<Hash> {
        let s = s.strip_prefix("0x").unwrap_or(s).as_bytes();
        if s.len() % 2 != 0 || s.is_empty() {
            return None;
        }
        // By bytes: a node's text may hold characters of several bytes.
        let digit = |b: u8| (b as char).to_digit(16).map(|d| d as u8);
        s.chunks_exact(2)
            .map(|p| Some(digit(p[0])? << 4 | digit(p[1])?))
            .collect::<Option<Vec<u8>>>()
            .map(Hash)
    }
}

pub fn hex(bytes: &[u8]) -> String {
    let mut s = String::with_capacity(2 + bytes.len() * 2);
    s.push_str("0x");
    for b in bytes {
        s.push_str(&format!("{b:02x}"));
    }
    s
}

impl fmt::Display for Hash {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&hex(&self.0))
    }
}

impl fmt::Debug for Hash {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        fmt::Display::fmt(self, f)
    }
}

/// Height and hash: enough to say where a chain's head is.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct HeaderRef {
    pub height: u64,
    pub hash: Hash,
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Header {
    pub height: u64,
    pub hash: Hash,
    pub parent_hash: Hash,
    /// Seconds since the Unix epoch, as the chain reports it.
    pub timestamp: i64,
    /// The node's own reply for this header, kept in memory for the checks
    /// of validation levels `comprehensive` and `full`; never stored or sent.
    pub raw: Option<Arc<serde_json::Value>>,
}

impl Header {
    pub fn to_proto(&self) -> proto::Header {
        proto::Header {
            height: self.height,
            hash: self.hash.0.clone(),
            parent_hash: self.parent_hash.0.clone(),
            timestamp: self.timestamp,
        }
    }

    pub fn from_proto(p: &proto::Header) -> Header {
        Header {
            height: p.height,
            hash: Hash(p.hash.clone()),
            parent_hash: Hash(p.parent_hash.clone()),
            timestamp: p.timestamp,
            raw: None,
        }
    }
}

/// What a node says about itself besides its chain. Each field is `None`
/// when the node does not answer that question.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct NodeStatus {
    pub peers: Option<u64>,
    pub syncing: Option<bool>,
    pub sync_highest_block: Option<u64>,
    /// Transactions waiting in the node's mempool.
    pub mempool: Option<u64>,
    /// Branches the node knows of that compete with its active chain near
    /// the head (Bitcoin's `getchaintips`); empty where the chain has none
    /// or the source cannot tell.
    pub competing_tips: Vec<CompetingTip>,
}

/// The tip of a branch beside the node's active chain.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct CompetingTip {
    pub height: u64,
    pub hash: Hash,
    /// Blocks from the tip back to the active chain.
    pub branch_len: u64,
    /// The node's word for the branch (`valid-fork`, `valid-headers`, ...).
    pub status: String,
}

/// No chain is near this height: at ten blocks a second one takes about
/// 3,500 years to reach it. A node that reports more is broken or lying, and
/// the agent does not store it; the aggregator refuses events above it.
pub const MAX_HEIGHT: u64 = 1 << 40;

pub fn now_unix_ms() -> i64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_millis() as i64)
        .unwrap_or(0)
}

impl proto::FindingKind {
    /// The lower-case name used on the command line and in logs.
    pub fn label(self) -> &'static str {
        match self {
            proto::FindingKind::Unspecified => "unspecified",
            proto::FindingKind::Reorg => "reorg",
            proto::FindingKind::Stall => "stall",
            proto::FindingKind::Unreachable => "unreachable",
            proto::FindingKind::Syncing => "syncing",
            proto::FindingKind::Linkage => "linkage",
            proto::FindingKind::HeightRegression => "height-regression",
            proto::FindingKind::EventsDropped => "events-dropped",
            proto::FindingKind::Divergence => "divergence",
            proto::FindingKind::Lag => "lag",
            proto::FindingKind::AgentSilent => "agent-silent",
            proto::FindingKind::NetworkStall => "network-stall",
            proto::FindingKind::InvalidHeader => "invalid-header",
            proto::FindingKind::StoreRecovered => "store-recovered",
            proto::FindingKind::HostCpu => "host-cpu",
            proto::FindingKind::HostMemory => "host-memory",
            proto::FindingKind::HostDisk => "host-disk",
            proto::FindingKind::SlowRpc => "slow-rpc",
            proto::FindingKind::RpcErrors => "rpc-errors",
            proto::FindingKind::CompetingTip => "competing-tip",
            proto::FindingKind::ImplausibleHead => "implausible-head",
            proto::FindingKind::SeqGap => "seq-gap",
            proto::FindingKind::DuplicateAgent => "duplicate-agent",
            proto::FindingKind::CertExpiry => "cert-expiry",
            proto::FindingKind::StorePaused => "store-paused",
            proto::FindingKind::AgentPaused => "agent-paused",
            proto::FindingKind::AheadAlone => "ahead-alone",
        }
    }

    pub fn from_label(s: &str) -> Option<proto::FindingKind> {
        ALL_KINDS.iter().copied().find(|k| k.label() == s)
    }
}

pub const ALL_KINDS: [proto::FindingKind; 26] = [
    proto::FindingKind::Reorg,
    proto::FindingKind::Stall,
    proto::FindingKind::Unreachable,
    proto::FindingKind::Syncing,
    proto::FindingKind::Linkage,
    proto::FindingKind::HeightRegression,
    proto::FindingKind::EventsDropped,
    proto::FindingKind::Divergence,
    proto::FindingKind::Lag,
    proto::FindingKind::AgentSilent,
    proto::FindingKind::NetworkStall,
    proto::FindingKind::InvalidHeader,
    proto::FindingKind::StoreRecovered,
    proto::FindingKind::HostCpu,
    proto::FindingKind::HostMemory,
    proto::FindingKind::HostDisk,
    proto::FindingKind::SlowRpc,
    proto::FindingKind::RpcErrors,
    proto::FindingKind::CompetingTip,
    proto::FindingKind::ImplausibleHead,
    proto::FindingKind::SeqGap,
    proto::FindingKind::DuplicateAgent,
    proto::FindingKind::CertExpiry,
    proto::FindingKind::StorePaused,
    proto::FindingKind::AgentPaused,
    proto::FindingKind::AheadAlone,
];

impl proto::Verdict {
    pub fn label(self) -> &'static str {
        match self {
            proto::Verdict::Unspecified => "undecided",
            proto::Verdict::Node => "node",
            proto::Verdict::Network => "network",
            proto::Verdict::MonitoringPath => "monitoring-path",
        }
    }
}

impl proto::Severity {
    pub fn label(self) -> &'static str {
        match self {
            proto::Severity::Unspecified => "unspecified",
            proto::Severity::Info => "info",
            proto::Severity::Warning => "warning",
            proto::Severity::Critical => "critical",
        }
    }
}

impl proto::FindingState {
    pub fn label(self) -> &'static str {
        match self {
            proto::FindingState::Unspecified => "unspecified",
            proto::FindingState::Open => "open",
            proto::FindingState::Resolved => "resolved",
            proto::FindingState::Occurred => "occurred",
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn hash_hex_round_trip() {
        let h = Hash::from_hex("0x00ff10").unwrap();
        assert_eq!(h.0, vec![0, 255, 16]);
        assert_eq!(h.to_string(), "0x00ff10");
        assert!(Hash::from_hex("0x0").is_none());
        assert!(Hash::from_hex("zz").is_none());
        // Found by fuzzing (chain_replies): a two-byte character across a
        // digit pair aborted the agent.
        assert!(Hash::from_hex("0x(\u{70a}\n\u{70a}").is_none());
        assert!(Hash::from_hex("\u{e9}a").is_none());
    }

    #[test]
    fn kind_labels_round_trip() {
        for k in ALL_KINDS {
            assert_eq!(proto::FindingKind::from_label(k.label()), Some(k));
        }
        assert_eq!(proto::FindingKind::from_label("nope"), None);
    }
}
