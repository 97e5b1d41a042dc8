//! A Prometheus scrape as the prometheus source reads it: the text
//! exposition format, then the configured series looked up in it.
#![no_main]

libfuzzer_sys::fuzz_target!(|bytes: &[u8]| outpost::fuzz::prometheus_scrape(bytes));
