//! New-head subscriptions over WebSocket (`source.ws_url`), for chains whose
//! nodes push them (Ethereum `eth_subscribe newHeads`, CometBFT `NewBlock`).
//! A notice only wakes Ingest for an immediate poll: headers still come
//! through the same RPC calls, walk and checks as with polling, and the
//! poll timer stays as the fallback and the consistency check. A lost
//! connection is retried with backoff while polling goes on.

use std::sync::Arc;
use std::time::Duration;

use actix::prelude::*;
use futures_util::{SinkExt, StreamExt};
use serde_json::Value;
use tokio_tungstenite::tungstenite::protocol::WebSocketConfig;
use tokio_tungstenite::tungstenite::Message as WsMessage;

use crate::chain::ChainSource;

/// The node announced a new head.
#[derive(Message)]
#[rtype(result = "()")]
pub struct HeadNotice;

/// Where and how to subscribe.
pub struct Subscription {
    pub url: String,
    /// The chain's subscribe request.
    pub request: Value,
    pub source: Arc<dyn ChainSource>,
    /// Largest message accepted (`source.max_reply_bytes`).
    pub max_bytes: usize,
    pub timeout: Duration,
    /// Longest wait between reconnection attempts.
    pub backoff_max: Duration,
}

/// Follows the node's heads until the owning actor stops; never returns.
pub async fn follow(sub: Subscription, wake: Recipient<HeadNotice>) {
    let first = Duration::from_millis(200);
    let mut delay = first;
    loop {
        match session(&sub, &wake).await {
            Ok(notices) => {
                tracing::warn!(
                    url = %sub.url,
                    notices,
                    "head subscription closed by the node; polling continues, reconnecting"
                );
                if notices > 0 {
                    delay = first;
                }
            }
            Err(e) => tracing::warn!(
                url = %sub.url,
                retry_in_ms = delay.as_millis() as u64,
                "head subscription failed: {e}; polling continues"
            ),
        }
        tokio::time::sleep(delay).await;
        delay = (delay * 2).min(sub.backoff_max.max(first));
    }
}

/// Wakes Ingest. A full mailbox already holds notices that will each poll
/// the head, so this one is dropped; only an Ingest that is gone ends the
/// subscription.
fn deliver(wake: &Recipient<HeadNotice>) -> Result<(), String> {
    match wake.try_send(HeadNotice) {
        Ok(()) | Err(SendError::Full(_)) => Ok(()),
        Err(SendError::Closed(_)) => Err("ingest is gone".into()),
    }
}

/// One connection: subscribes, then wakes Ingest at each head notice.
/// Returns the number of notices when the node closes the connection.
async fn session(sub: &Subscription, wake: &Recipient<HeadNotice>) -> Result<u64, String> {
    let config = WebSocketConfig::default()
        .max_message_size(Some(sub.max_bytes))
        .max_frame_size(Some(sub.max_bytes));
    let (mut ws, _) = tokio::time::timeout(
        sub.timeout,
        tokio_tungstenite::connect_async_with_config(sub.url.as_str(), Some(config), true),
    )
    .await
    .map_err(|_| format!("no connection within {:?}", sub.timeout))?
    .map_err(|e| crate::error_chain(&e))?;
    ws.send(WsMessage::text(sub.request.to_string()))
        .await
        .map_err(|e| crate::error_chain(&e))?;
    let id = sub.request.get("id").cloned().unwrap_or(Value::Null);
    let mut notices = 0u64;
    let mut confirmed = false;
    while let Some(msg) = ws.next().await {
        let text = match msg.map_err(|e| crate::error_chain(&e))? {
            WsMessage::Text(t) => t,
            WsMessage::Close(_) => break,
            _ => continue,
        };
        let v: Value = serde_json::from_str(text.as_str())
            .map_err(|e| format!("malformed message from the node: {e}"))?;
        if sub.source.is_head_notice(&v) {
            notices += 1;
            deliver(wake)?;
        } else if v.get("id") == Some(&id) {
            if let Some(err) = v.get("error").filter(|e| !e.is_null()) {
                return Err(format!("the node refused the subscription: {err}"));
            }
            if !confirmed {
                confirmed = true;
                tracing::info!(url = %sub.url, "head subscription active");
            }
        }
    }
    Ok(notices)
}

#[cfg(test)]
mod tests {
    use super::*;

    struct Sleeper;
    impl Actor for Sleeper {
        type Context = Context<Self>;
    }
    impl Handler<HeadNotice> for Sleeper {
        type Result = ();
        fn handle(&mut self, _: HeadNotice, _: &mut Context<Self>) {}
    }

    #[actix::test]
    async fn a_burst_of_notices_into_a_full_mailbox_keeps_the_subscription() {
        // A context that is not run yet: its mailbox only fills.
        let mut ctx = Context::<Sleeper>::new();
        ctx.set_mailbox_capacity(1);
        let wake = ctx.address().recipient();
        for _ in 0..5 {
            assert_eq!(deliver(&wake), Ok(()));
        }
        assert!(
            matches!(wake.try_send(HeadNotice), Err(SendError::Full(_))),
            "the mailbox is full"
        );
        drop(ctx);
        assert!(deliver(&wake).is_err(), "an ingest that is gone ends it");
    }
}
