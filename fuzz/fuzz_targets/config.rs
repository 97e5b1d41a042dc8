//! A config file as `outpost check-config` reads it: either kind, with its
//! error lines (which point at a line and column of the text).
#![no_main]

libfuzzer_sys::fuzz_target!(|bytes: &[u8]| outpost::fuzz::config(bytes));
