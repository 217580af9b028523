//! A Kafka record (timestamp, key, value, headers; length-prefixed frames) decoded as the
//! consumer does; what decodes must survive every binding's round trip.
#![no_main]
use libfuzzer_sys::fuzz_target;
use polybus_fuzz::{Frames, assert_decode_error, check, seeds::KAFKA_TOPIC};

fuzz_target!(|data: &[u8]| {
    let mut f = Frames::new(data);
    let timestamp = f.i64();
    let key = f.next_frame().flatten().map(check::bytes);
    let value = check::bytes(f.bytes());
    let mut owned = Vec::new();
    while let Some(name) = f.next_frame() {
        // Kafka header keys are strings (rdkafka hands them over as `&str`).
        let Ok(name) = std::str::from_utf8(name.unwrap_or_default()) else {
            return;
        };
        owned.push((name, f.next_frame().flatten()));
    }
    let (partition, offset) = check::KAFKA_AT;
    match polybus_kafka::fuzzing::decode(
        value,
        key,
        &owned,
        timestamp,
        KAFKA_TOPIC,
        partition,
        offset,
    ) {
        Ok(ev) => {
            if owned.iter().all(|(n, _)| !n.starts_with("ce_")) && !ev.id().starts_with("kafka:") {
                // Only structured records name themselves without ce_ headers.
                assert!(
                    owned
                        .iter()
                        .any(|(n, _)| n.eq_ignore_ascii_case("content-type")),
                    "a plain record must be named by its position, got id {:?}",
                    ev.id()
                );
            }
            check::all_bindings(&ev);
        }
        Err(e) => assert_decode_error("kafka decode", &e),
    }
});
