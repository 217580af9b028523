//! `traceparent` values as consumers parse them: anything parsed formats to a version-00 value
//! that parses to the same context; a lowercase version-00 value formats to itself.
#![no_main]
use libfuzzer_sys::fuzz_target;
use polybus_core::telemetry::TraceContext;

fuzz_target!(|data: &[u8]| {
    let Ok(s) = std::str::from_utf8(data) else {
        return;
    };
    let Some(tc) = TraceContext::parse(s) else {
        return;
    };
    assert_ne!(tc.trace_id, [0; 16], "an all-zero trace id is invalid");
    assert_ne!(tc.span_id, [0; 8], "an all-zero span id is invalid");
    let v = tc.to_header_value();
    assert_eq!(v.len(), TraceContext::LEN);
    assert_eq!(TraceContext::parse(&v), Some(tc), "{v} does not parse back");
    if s.starts_with("00-") {
        assert_eq!(v, s, "a version-00 value formats to itself");
    } else {
        // A later version: the first 55 characters are the version-00 fields.
        assert_eq!(
            v[3..],
            s[3..TraceContext::LEN],
            "fields of a future version"
        );
    }
    let child = tc.child();
    assert_eq!(child.trace_id, tc.trace_id);
    assert_eq!(child.flags, tc.flags);
});
