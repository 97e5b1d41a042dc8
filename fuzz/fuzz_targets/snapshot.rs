//! A snapshot file as `outpost snapshot verify` and start-up recovery read
//! it: header, manifest, sections and checksums.
#![no_main]

libfuzzer_sys::fuzz_target!(|bytes: &[u8]| outpost::fuzz::snapshot(bytes));
