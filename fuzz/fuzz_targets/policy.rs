//! Policy TOML through the real loader (parse, compile, every check).
#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    if let Ok(text) = std::str::from_utf8(data) {
        let _ = latchkey::fuzzing::policy(text);
    }
});
