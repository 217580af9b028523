//! A spool record as read back from disk: decoding is a typed error or a record that encodes
//! to bytes which decode to the same record (and encode to the same bytes again).
#![no_main]
use libfuzzer_sys::fuzz_target;
use polybus_compose::fuzzing::{decode, encode};
use polybus_fuzz::assert_decode_error;

fuzz_target!(|data: &[u8]| {
    let rec = match decode(data) {
        Ok(rec) => rec,
        Err(e) => return assert_decode_error("spool decode", &e),
    };
    let bytes = rec.encode();
    let again = decode(&bytes).expect("the spool reads what it wrote");
    assert_eq!(again, rec, "spool record changed in a round trip");
    assert_eq!(again.encode(), bytes, "spool encoding is not stable");
    // A fresh record of the same event round-trips too.
    let fresh = encode("s", "t", rec.event().clone(), 1, false, None);
    let back = decode(&fresh).expect("the spool reads a fresh record");
    assert!(
        back.event() == rec.event(),
        "event changed in a fresh record"
    );
});
