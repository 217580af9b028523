//! An MQTT 3.1.1 PUBLISH (a payload, no properties: a structured JSON CloudEvent or a plain
//! message) decoded as the consumer does; what decodes must survive every binding's round trip.
#![no_main]
use libfuzzer_sys::fuzz_target;
use polybus_fuzz::{assert_decode_error, check};

fuzz_target!(|data: &[u8]| {
    match polybus_mqtt::fuzzing::decode(check::bytes(data), Vec::new(), None) {
        Ok(ev) => check::all_bindings(&ev),
        Err(e) => assert_decode_error("mqtt 3.1.1 decode", &e),
    }
});
