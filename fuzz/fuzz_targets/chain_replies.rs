//! Every chain's reply decoders on one JSON value: Ethereum blocks (and the
//! hash recomputed from them at level full), CometBFT blocks, TON headers,
//! Bitcoin chain tips and raw headers, Algorand hashes, JSON-RPC
//! quantities, and the WebSocket head notices.
#![no_main]

libfuzzer_sys::fuzz_target!(|bytes: &[u8]| outpost::fuzz::chain_replies(bytes));
