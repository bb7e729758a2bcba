//! `cargo +nightly fuzz run request_head`: see `keygate::fuzzing::request_head` for what it exercises.
#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    keygate::fuzzing::request_head(data);
});
