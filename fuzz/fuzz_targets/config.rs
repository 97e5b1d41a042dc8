//! A config file as `outpost check-config` reads it: either kind, with its
//! error lines (which point at a line and column of the text).
#![no_main]

use std::io::Write;

use libfuzzer_sys::fuzz_target;

fuzz_target!(|bytes: &[u8]| {
    let mut f = tempfile::NamedTempFile::new().expect("temp file");
    f.write_all(bytes).expect("write");
    let _ = outpost::config::load_any(f.path());
});
