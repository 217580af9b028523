//! A NATS message (header block + payload, as the server delivers an `HMSG`) decoded as the
//! consumer does; what decodes must survive every binding's round trip.
#![no_main]
use libfuzzer_sys::fuzz_target;
use polybus_fuzz::{assert_decode_error, check, nats_message};

fuzz_target!(|data: &[u8]| {
    let Some((headers, payload)) = nats_message(data) else {
        return;
    };
    match polybus_nats::decode_event(headers.as_ref(), payload, "nats") {
        Ok(ev) => check::all_bindings(&ev),
        Err(e) => assert_decode_error("nats decode", &e),
    }
});
