//! Outpost: an agent that runs beside a blockchain node and an aggregator
//! that keeps the fleet's truth, joined by a durable mutual-TLS gRPC stream.
#![forbid(unsafe_code)]

pub mod aggregator;
pub mod chain;
pub mod cli;
pub mod config;
pub mod demo;
pub mod fuzz;
pub mod health;
pub mod latency;
pub mod logging;
pub mod manual;
pub mod model;
pub mod node;
pub mod operator;
pub mod reload;
pub mod service;
pub mod snapshot_cmd;
pub mod store;
pub mod tls;
pub mod wire;

/// Generated protobuf and gRPC types of `proto/outpost/v1`.
pub mod proto {
    tonic::include_proto!("outpost.v1");
}

/// An error and its sources on one line: transport errors hide the useful
/// part (refused, unknown CA, ...) several sources deep.
pub fn error_chain(e: &dyn std::error::Error) -> String {
    let mut s = e.to_string();
    let mut cur = e.source();
    while let Some(inner) = cur {
        let msg = inner.to_string();
        if !s.contains(&msg) {
            s.push_str(": ");
            s.push_str(&msg);
        }
        cur = inner.source();
    }
    s
}
