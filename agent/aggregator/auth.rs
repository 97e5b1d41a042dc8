//! Who is calling: the identity in the verified client certificate, never
//! what a message claims. Refusals are logged to the `outpost::audit` target.

use tonic::{Request, Status};

use crate::tls::Identity;

pub const AUDIT: &str = "outpost::audit";

fn remote<T>(req: &Request<T>) -> String {
    req.remote_addr()
        .map(|a| a.to_string())
        .unwrap_or_else(|| "unknown".into())
}

/// The caller's identity, or Unauthenticated with a message that says why.
pub fn identity<T>(req: &Request<T>) -> Result<Identity, Status> {
    let Some(certs) = req.peer_certs() else {
        tracing::warn!(target: AUDIT, remote = %remote(req), "refused: no client certificate");
        return Err(Status::unauthenticated(
            "no client certificate: connect with an Outpost agent or operator certificate issued by this aggregator's CA",
        ));
    };
    match certs.first().and_then(|c| Identity::from_der(c)) {
        Some(id) => Ok(id),
        None => {
            tracing::warn!(target: AUDIT, remote = %remote(req), "refused: certificate has no outpost:// identity");
            Err(Status::unauthenticated(
                "client certificate carries no outpost://agent/ or outpost://operator/ identity",
            ))
        }
    }
}

/// Interceptor for operator-only services (query, reflection).
#[allow(clippy::result_large_err)]
pub fn operator_only(req: Request<()>) -> Result<Request<()>, Status> {
    match identity(&req)? {
        Identity::Operator(_) => Ok(req),
        Identity::Agent(node) => {
            tracing::warn!(target: AUDIT, remote = %remote(&req), node_id = %node, "refused: agent certificate on the query API");
            Err(Status::permission_denied(format!(
                "agent certificate ({node}) may not use the query API; use an operator certificate"
            )))
        }
    }
}
