//! `cargo +nightly fuzz run config`: see `keygate::fuzzing::config` for what it exercises.
#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    keygate::fuzzing::config(data);
});
