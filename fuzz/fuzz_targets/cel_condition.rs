//! A policy `condition`: compiled under the loader's caps, then evaluated against fixed claims.
#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    if let Ok(source) = std::str::from_utf8(data) {
        let _ = latchkey::fuzzing::cel_condition(source);
    }
});
