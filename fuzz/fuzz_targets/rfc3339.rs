//! RFC 3339 times as the CloudEvents `time` attribute is parsed: anything parsed formats to a
//! UTC value with microseconds that parses to the same instant (truncated to microseconds).
#![no_main]
use libfuzzer_sys::fuzz_target;
use polybus_core::time::{format_rfc3339, parse_rfc3339};
use polybus_fuzz::micros;

fuzz_target!(|data: &[u8]| {
    let Ok(s) = std::str::from_utf8(data) else {
        return;
    };
    let Some(t) = parse_rfc3339(s) else {
        return;
    };
    let f = format_rfc3339(t);
    assert_eq!(
        parse_rfc3339(&f),
        Some(micros(t)),
        "{s:?} parsed, formatted as {f:?}, which does not parse back to the same instant"
    );
    assert_eq!(f.len(), 27, "{f:?} is not YYYY-MM-DDTHH:MM:SS.ffffffZ");
    assert_eq!(format_rfc3339(micros(t)), f);
});
