//! A Prometheus scrape as the prometheus source reads it: the text
//! exposition format, then the configured series looked up in it.
#![no_main]

use libfuzzer_sys::fuzz_target;
use outpost::chain::prometheus::{parse_scrape, Selector};

fuzz_target!(|bytes: &[u8]| {
    let Ok(text) = std::str::from_utf8(bytes) else {
        return;
    };
    let Ok(scrape) = parse_scrape(text) else {
        return;
    };
    for s in ["height", "h{chain=\"main\"}", "peers{a=\"1\",b=\"2\"}"] {
        if let Ok(sel) = Selector::parse(s) {
            let _ = sel.value(&scrape);
            let _ = sel.count(&scrape);
        }
    }
});
