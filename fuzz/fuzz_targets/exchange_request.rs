//! `POST /v1/token` bodies: the first byte picks JSON (odd) or form (even), the rest is the body.
#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let Some((first, body)) = data.split_first() else { return };
    let _ = latchkey::fuzzing::exchange_request(first & 1 == 1, body);
});
