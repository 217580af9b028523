//! Header name/value validation (`name NUL value`): a refusal is `InvalidHeader`; an accepted
//! header is stored as given, and an event carrying it goes through every binding (or is refused
//! there with a typed error).
#![no_main]
use libfuzzer_sys::fuzz_target;
use polybus_core::{ErrorKind, Event, Headers};
use polybus_fuzz::check;

fuzz_target!(|data: &[u8]| {
    let Ok(s) = std::str::from_utf8(data) else {
        return;
    };
    let (name, value) = s.split_once('\0').unwrap_or((s, ""));
    if let Err(e) = polybus_core::validate_header(name, value) {
        assert_eq!(e.kind(), ErrorKind::InvalidHeader, "{e:?}");
        let mut h = Headers::new();
        assert!(h.insert(name, value).is_err() && h.is_empty());
        return;
    }
    let mut h = Headers::new();
    h.insert(name, value)
        .expect("insert accepts a valid header");
    assert_eq!(h.get(&name.to_ascii_uppercase()), Some(value));
    let ev = Event::builder()
        .id("h-1")
        .source("urn:fuzz")
        .kind("header")
        .header(name, value)
        .data("x")
        .build();
    match ev {
        Ok(ev) => check::all_bindings(&ev),
        Err(e) => assert_eq!(e.kind(), ErrorKind::InvalidHeader, "{e:?}"),
    }
});
