//! What the aggregator does with a message off the delivery stream before
//! it stores anything: count its nested messages on the wire, decode it
//! only within the limit, and check a batch.
#![no_main]

use libfuzzer_sys::fuzz_target;
use outpost::proto::{agent_message::Body, AgentMessage};
use prost::Message;

fuzz_target!(|bytes: &[u8]| {
    let Ok(n) = outpost::wire::agent_message_elements(bytes) else {
        return;
    };
    if n > outpost::wire::MAX_AGENT_MESSAGE_ELEMENTS {
        return;
    }
    if let Ok(AgentMessage {
        body: Some(Body::Batch(batch)),
    }) = AgentMessage::decode(bytes)
    {
        let _ = outpost::aggregator::ingest::check_batch(&batch);
    }
});
