//! A snapshot file as `outpost snapshot verify` and start-up recovery read
//! it: header, manifest, sections and checksums.
#![no_main]

use std::io::Write;

use libfuzzer_sys::fuzz_target;

fuzz_target!(|bytes: &[u8]| {
    let mut f = tempfile::NamedTempFile::new().expect("temp file");
    f.write_all(bytes).expect("write");
    let _ = outpost::store::snapshot::verify(f.path());
});
