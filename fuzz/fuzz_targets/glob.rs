//! Match patterns: the first line is the pattern, the rest the value.
#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let Ok(text) = std::str::from_utf8(data) else { return };
    let (pattern, value) = text.split_once('\n').unwrap_or((text, ""));
    let _ = latchkey::fuzzing::glob(pattern, value);
});
