//! Subject-token parsing before any key: size, segments, base64url, header rules, payload JSON.
#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    if let Ok(token) = std::str::from_utf8(data) {
        let _ = latchkey::fuzzing::jwt_header(token);
    }
});
