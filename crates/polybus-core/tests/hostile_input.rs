//! Arbitrary input to the public constructors and decoders: typed errors, never a panic, and
//! nothing else lost.

use bytes::Bytes;
use polybus_core::cloudevents::{BinaryDecoder, from_structured, to_structured};
use polybus_core::{ErrorKind, Event, Headers, MemoryBroker, Publisher, topic};
use proptest::prelude::*;

proptest! {
    #![proptest_config(ProptestConfig::with_cases(2_000))]

    #[test]
    fn headers_accept_or_reject_with_invalid_header(name in "\\PC{0,40}|[ -~]{0,300}", value in "\\PC{0,40}|[\\x00-\\x1f]{0,3}") {
        let mut h = Headers::new();
        h.insert("keep", "me").unwrap();
        match h.insert(name.clone(), value.clone()) {
            Ok(()) => prop_assert_eq!(h.get(&name), Some(value.as_str())),
            Err(e) => {
                prop_assert_eq!(e.kind(), ErrorKind::InvalidHeader);
                prop_assert_eq!(h.len(), 1, "a rejected header changed the map");
            }
        }
        prop_assert_eq!(h.get("keep"), Some("me"));
    }

    #[test]
    fn event_builder_is_total(id in "\\PC{0,20}", source in "\\PC{0,20}", kind in "\\PC{0,20}", hname in "\\PC{0,10}") {
        match Event::builder().id(id).source(source).kind(kind).header(hname, "v").build() {
            Ok(ev) => prop_assert!(ev.validate().is_ok()),
            Err(e) => prop_assert!(matches!(e.kind(), ErrorKind::InvalidHeader | ErrorKind::Codec)),
        }
    }

    #[test]
    fn binary_decoder_is_total(attrs in proptest::collection::vec(("\\PC{0,12}", "\\PC{0,30}"), 0..8), data in proptest::collection::vec(any::<u8>(), 0..64)) {
        let mut dec = BinaryDecoder::new();
        for (n, v) in attrs {
            dec.attribute(&n, v);
        }
        if let Err(e) = dec.finish(Bytes::from(data), "t") {
            prop_assert_eq!(e.kind(), ErrorKind::Codec);
        }
    }

    #[test]
    fn topic_validation_is_total_and_states_its_rules(name in "\\PC{0,12}|[\\x00-\\x7f]{0,12}|[a-z./+#*> ]{0,300}") {
        let common = topic::validate_common(&name, "t", 255);
        let concrete = topic::validate_name(&name, "t", 255);
        let clean = !name.is_empty()
            && name.len() <= 255
            && !name.chars().any(|c| c.is_whitespace() || c.is_control());
        prop_assert_eq!(common.is_ok(), clean, "{:?}", name);
        prop_assert_eq!(
            concrete.is_ok(),
            clean && !name.chars().any(|c| topic::WILDCARDS.contains(&c)),
            "{:?}", name
        );
        for e in [common.err(), concrete.err()].into_iter().flatten() {
            prop_assert_eq!(e.kind(), ErrorKind::InvalidTopic);
        }
    }

    #[test]
    fn structured_decoder_is_total_on_json_shaped_input(
        keys in proptest::collection::vec("specversion|id|source|type|time|data|data_base64|datacontenttype|[a-z]{1,8}", 0..8),
        values in proptest::collection::vec("\"1\\.0\"|\"[ -~]{0,12}\"|-?[0-9]{1,5}|true|null|\\[\\]|\\{\\}", 0..8),
    ) {
        let body: Vec<String> = keys
            .iter()
            .zip(values.iter())
            .map(|(k, v)| format!("\"{k}\":{v}"))
            .collect();
        let doc = format!("{{{}}}", body.join(","));
        if let Err(e) = from_structured(doc.as_bytes(), "t") {
            prop_assert_eq!(e.kind(), ErrorKind::Codec, "{}", doc);
        }
    }

    #[test]
    fn structured_round_trip(id in "[a-zA-Z0-9-]{1,20}", kind in "[a-z.]{1,20}", data in proptest::collection::vec(any::<u8>(), 0..64), ext in "[a-z0-9]{1,10}") {
        // A header named like a context attribute (`id`, `time`, ...) is no extension: it
        // travels beside the JSON document as a broker header, not in it.
        prop_assume!(polybus_core::cloudevents::is_extension_name(&ext));
        let ev = Event::builder().id(id).kind(kind).header(ext.clone(), "x").data(data).build().unwrap();
        let (bytes, _) = to_structured(&ev, "t").unwrap();
        let back = from_structured(&bytes, "t").unwrap();
        prop_assert_eq!(back.id(), ev.id());
        prop_assert_eq!(back.kind(), ev.kind());
        prop_assert_eq!(back.data(), ev.data());
        prop_assert_eq!(back.headers().get(&ext), Some("x"));
    }
}

#[tokio::test]
async fn a_bad_publish_does_not_sink_its_neighbours() {
    let broker = MemoryBroker::new();
    let p = broker.publisher();
    let consumer = broker.consumer();
    let mut s = std::pin::pin!(polybus_core::Consumer::subscribe(&consumer, "t"));
    futures_util::future::poll_immediate(futures_util::StreamExt::next(&mut s)).await;
    p.publish("t", Event::new(b"1")).await.unwrap();
    assert_eq!(
        p.publish("", Event::new(b"bad")).await.unwrap_err().kind(),
        ErrorKind::InvalidTopic
    );
    assert_eq!(
        p.publish("t", Event::new(vec![0u8; 2 * 1024 * 1024]))
            .await
            .unwrap_err()
            .kind(),
        ErrorKind::PayloadTooLarge
    );
    p.publish("t", Event::new(b"2")).await.unwrap();
    for want in [&b"1"[..], b"2"] {
        let d = futures_util::StreamExt::next(&mut s)
            .await
            .unwrap()
            .unwrap();
        assert_eq!(d.payload(), want);
        d.ack().await.unwrap();
    }
}
