//! Handler arguments, built from the [`Message`] in the axum style.

use bytes::Bytes;
use polybus_core::{ErrorKind, Event, Headers};
use serde::de::DeserializeOwned;

use crate::{HandlerError, Message};

/// Builds a handler argument from the message and the app state. A failure is a permanent
/// [`HandlerError`]: the event is dead-lettered without running the handler.
///
/// ```
/// use polybus_core::Event;
/// use polybus_runtime::{FromMessage, HandlerError, Message};
///
/// /// The tenant header, required.
/// struct Tenant(String);
///
/// impl<S> FromMessage<S> for Tenant {
///     fn from_message(msg: &Message, _: &S) -> Result<Self, HandlerError> {
///         msg.event().headers().get("tenant")
///             .map(|t| Tenant(t.to_owned()))
///             .ok_or_else(|| HandlerError::permanent("no tenant header"))
///     }
/// }
/// let ev = Event::builder().header("tenant", "eu").build()?;
/// let Tenant(t) = Tenant::from_message(&Message::new("t", ev), &())?;
/// assert_eq!(t, "eu");
/// # Ok::<(), HandlerError>(())
/// ```
pub trait FromMessage<S>: Sized {
    /// Builds the argument.
    ///
    /// # Errors
    /// The message does not have what the argument needs.
    fn from_message(msg: &Message, state: &S) -> Result<Self, HandlerError>;
}

impl<S> FromMessage<S> for Message {
    fn from_message(msg: &Message, _: &S) -> Result<Self, HandlerError> {
        Ok(msg.clone())
    }
}

impl<S> FromMessage<S> for Event {
    fn from_message(msg: &Message, _: &S) -> Result<Self, HandlerError> {
        Ok(msg.event().clone())
    }
}

impl<S> FromMessage<S> for Headers {
    fn from_message(msg: &Message, _: &S) -> Result<Self, HandlerError> {
        Ok(msg.event().headers().clone())
    }
}

/// The payload bytes (cheap: `Bytes` is reference counted).
#[derive(Debug, Clone)]
pub struct Data(pub Bytes);

impl<S> FromMessage<S> for Data {
    fn from_message(msg: &Message, _: &S) -> Result<Self, HandlerError> {
        Ok(Data(msg.event().data().clone()))
    }
}

/// The event's key, if it has one.
#[derive(Debug, Clone)]
pub struct Key(pub Option<Bytes>);

impl<S> FromMessage<S> for Key {
    fn from_message(msg: &Message, _: &S) -> Result<Self, HandlerError> {
        Ok(Key(msg.event().key_bytes().cloned()))
    }
}

/// The topic the event arrived on.
#[derive(Debug, Clone)]
pub struct Topic(pub String);

impl<S> FromMessage<S> for Topic {
    fn from_message(msg: &Message, _: &S) -> Result<Self, HandlerError> {
        Ok(Topic(msg.topic().to_owned()))
    }
}

/// Which attempt this is (1 the first time).
#[derive(Debug, Clone, Copy)]
pub struct Attempt(pub u32);

impl<S> FromMessage<S> for Attempt {
    fn from_message(msg: &Message, _: &S) -> Result<Self, HandlerError> {
        Ok(Attempt(msg.attempt()))
    }
}

/// The app's shared state (a clone of what [`App::with_state`](crate::App::with_state) got).
///
/// ```
/// use std::sync::Arc;
/// use std::sync::atomic::{AtomicU64, Ordering};
/// use polybus_runtime::{App, State};
///
/// async fn count(State(n): State<Arc<AtomicU64>>) {
///     n.fetch_add(1, Ordering::Relaxed);
/// }
/// let app = App::with_state(Arc::new(AtomicU64::new(0))).route("orders", count);
/// # let _ = app;
/// ```
#[derive(Debug, Clone)]
pub struct State<S>(pub S);

impl<S: Clone> FromMessage<S> for State<S> {
    fn from_message(_: &Message, state: &S) -> Result<Self, HandlerError> {
        Ok(State(state.clone()))
    }
}

/// A payload decoded with serde by its content type: JSON when the event says
/// `application/json`, any `+json` type, or nothing. Another content type, or bytes that do
/// not decode, is a permanent failure (`codec error`).
///
/// ```
/// use polybus_core::Event;
/// use polybus_runtime::{FromMessage, HandlerError, Json, Message};
/// #[derive(serde::Deserialize)]
/// struct Order { id: u32 }
/// let ev = Event::builder().data(br#"{"id":7}"#.as_slice()).content_type("application/json").build()?;
/// let Json(order) = Json::<Order>::from_message(&Message::new("orders", ev), &())?;
/// assert_eq!(order.id, 7);
/// # Ok::<(), HandlerError>(())
/// ```
#[derive(Debug, Clone)]
pub struct Json<T>(pub T);

/// Whether `content_type` names JSON (or is absent).
pub(crate) fn is_json(content_type: Option<&str>) -> bool {
    let Some(ct) = content_type else { return true };
    let essence = ct
        .split(';')
        .next()
        .unwrap_or("")
        .trim()
        .to_ascii_lowercase();
    essence == "application/json" || essence == "text/json" || essence.ends_with("+json")
}

impl<S, T: DeserializeOwned> FromMessage<S> for Json<T> {
    fn from_message(msg: &Message, _: &S) -> Result<Self, HandlerError> {
        let ct = msg.event().content_type();
        if !is_json(ct) {
            return Err(HandlerError::permanent(
                polybus_core::Error::new(ErrorKind::Codec, "runtime").with_message(format!(
                    "Json<T> cannot decode content type {}",
                    ct.unwrap_or_default()
                )),
            ));
        }
        serde_json::from_slice(msg.event().data())
            .map(Json)
            .map_err(|e| {
                HandlerError::permanent(
                    polybus_core::Error::new(ErrorKind::Codec, "runtime").with_source(e),
                )
            })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn json_content_types() {
        assert!(is_json(None));
        assert!(is_json(Some("application/json")));
        assert!(is_json(Some("Application/JSON; charset=utf-8")));
        assert!(is_json(Some("application/cloudevents+json")));
        assert!(!is_json(Some("application/avro")));
        assert!(!is_json(Some("text/plain")));
    }

    #[test]
    fn json_rejections_are_permanent_codec_errors() {
        let bad = Message::new("t", Event::new(b"{nope"));
        let e = Json::<serde_json::Value>::from_message(&bad, &()).unwrap_err();
        assert!(e.is_permanent());
        assert_eq!(e.kind(), "codec error");
        let mut ev = Event::new(b"{}");
        ev.set_content_type(Some("application/avro".into()));
        let e = Json::<serde_json::Value>::from_message(&Message::new("t", ev), &()).unwrap_err();
        assert!(e.to_string().contains("application/avro"), "{e}");
    }

    #[test]
    fn simple_extractors() {
        let ev = Event::builder().key("k").header("h", "v").build().unwrap();
        let msg = Message::new("orders", ev).with_attempt(3);
        let Key(k) = Key::from_message(&msg, &()).unwrap();
        assert_eq!(k.as_deref(), Some(&b"k"[..]));
        assert_eq!(Topic::from_message(&msg, &()).unwrap().0, "orders");
        assert_eq!(Attempt::from_message(&msg, &()).unwrap().0, 3);
        assert_eq!(
            Headers::from_message(&msg, &()).unwrap().get("h"),
            Some("v")
        );
        assert_eq!(State::from_message(&msg, &5u8).unwrap().0, 5);
    }
}
