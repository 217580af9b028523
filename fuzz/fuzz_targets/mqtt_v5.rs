//! An MQTT 5 PUBLISH (Content Type property, payload, User Properties; length-prefixed
//! frames) decoded as the consumer does; what decodes must survive every binding's round trip.
#![no_main]
use libfuzzer_sys::fuzz_target;
use polybus_fuzz::{Frames, assert_decode_error, check};

fuzz_target!(|data: &[u8]| {
    let mut f = Frames::new(data);
    // MQTT strings are UTF-8 (the client refuses a packet with anything else).
    let content_type = match f.next_frame().flatten().map(std::str::from_utf8) {
        None => None,
        Some(Ok(ct)) => Some(ct),
        Some(Err(_)) => return,
    };
    let payload = check::bytes(f.bytes());
    let mut props = Vec::new();
    while let Some(name) = f.next_frame() {
        let value = f.bytes();
        let (Ok(n), Ok(v)) = (
            std::str::from_utf8(name.unwrap_or_default()),
            std::str::from_utf8(value),
        ) else {
            return;
        };
        props.push((n.to_owned(), v.to_owned()));
    }
    match polybus_mqtt::fuzzing::decode(payload, props, content_type) {
        Ok(ev) => check::all_bindings(&ev),
        Err(e) => assert_decode_error("mqtt 5 decode", &e),
    }
});
