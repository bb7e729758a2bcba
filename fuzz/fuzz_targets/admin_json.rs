//! `cargo +nightly fuzz run admin_json`: see `keygate::fuzzing::admin_json` for what it exercises.
#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    keygate::fuzzing::admin_json(data);
});
