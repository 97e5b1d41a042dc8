//! What the aggregator does with a message off the delivery stream before
//! it stores anything: count its nested messages on the wire, decode it
//! only within the limit, and check a batch.
#![no_main]

libfuzzer_sys::fuzz_target!(|bytes: &[u8]| outpost::fuzz::agent_message(bytes));
