//! A NATS message in structured mode: the payload is read as a JSON CloudEvent
//! (`Content-Type: application/cloudevents+json` is set on whatever headers the input has).
#![no_main]
use libfuzzer_sys::fuzz_target;
use polybus_fuzz::{assert_decode_error, check, nats_message};

fuzz_target!(|data: &[u8]| {
    let Some((headers, payload)) = nats_message(data) else {
        return;
    };
    let headers = check::structured(headers);
    match polybus_nats::decode_event(Some(&headers), payload, "nats") {
        Ok(ev) => check::all_bindings(&ev),
        Err(e) => assert_decode_error("nats structured decode", &e),
    }
});
