//! The polybus runtime: write handlers, not consumer loops.
//!
//! A polybus consumer is a stream of [`Delivery`](polybus_core::Delivery)s; every service
//! used to write the same loop around it (decode, call the business code, ack or nack, retry
//! with backoff, park poison messages, run several at once without breaking per-key order,
//! stop cleanly on SIGTERM). This crate is that loop, once, generic over
//! [`Publisher`](polybus_core::Publisher) and [`Consumer`](polybus_core::Consumer), so the
//! same [`App`] runs on memory, NATS, JetStream, Kafka and MQTT unchanged.
//!
//! * **Handlers** ([`Handler`]): `async fn`s whose arguments are extractors
//!   ([`FromMessage`]: the [`Event`](polybus_core::Event), [`Json<T>`], [`Headers`](polybus_core::Headers),
//!   [`Key`], [`Data`], [`Topic`], [`Attempt`], [`State<S>`], the whole [`Message`]) and
//!   whose result becomes an [`Outcome`]: ack, publish then ack ([`Outbound`]), reply to a
//!   request's `x-reply-to` topic ([`Reply`]), retry after a
//!   delay, terminate, or fail. [`HandlerError`] states which errors are retried and which
//!   are permanent. A panic in a handler is caught (`catch_unwind`) and is a transient
//!   failure with kind `panic`: it never takes the app down.
//! * **Routing**: by topic, and optionally by CloudEvents `type` ([`Route::kind`]).
//! * **Batches**: [`App::batch_route`] hands a handler up to `max` events, or what arrived
//!   within `max_wait`, and takes an outcome per event ([`Batch`], [`BatchHandler`]).
//! * **Retry and dead letters**: exponential backoff with jitter ([`RetryPolicy`]), by the
//!   broker's delayed redelivery where the consumer's `Capabilities::nack_delay` says it has
//!   one, in process where not ([`RetryMode`] says why). After the last attempt the event goes
//!   to a dead-letter topic (same backend, or another publisher) in the
//!   [`polybus_core::dlq`] format the composed bus writes too; [`redrive`] moves dead letters
//!   back, with a filter. A dead letter keeps the event's id; where the backend reports that
//!   id as a duplicate (a dead-letter topic in the original's JetStream stream), it is written
//!   again under a fresh id with the event's id in `x-original-id`, never dropped.
//! * **Ordered concurrency**: [`App::concurrency`] handlers at once in per-key lanes (one key
//!   strictly in order, different keys in parallel); a bounded number of deliveries held,
//!   backpressure by not pulling more.
//! * **Lifecycle**: [`App::run`] until SIGTERM/SIGINT, [`App::run_until`] a future; drain
//!   with a timeout, unfinished deliveries handed back for redelivery, publishers flushed and
//!   closed. [`App::status`] tells where the app is, [`App::health`] what it holds
//!   (liveness, readiness, handlers running, deliveries held) for health checks.
//! * **Middleware**: tower [`Layer`](tower::Layer)s around handlers ([`layers`]: tower's
//!   timeout and concurrency limit, an in-call [`RetryLayer`](layers::RetryLayer), or your
//!   own).
//! * **Metrics**: settlements by outcome, handler durations and panics through the `metrics`
//!   facade ([`metrics`]).
//! * **Health over HTTP** (feature `http`): `http::HealthServer` serves `/healthz`, `/readyz`
//!   and `/metrics`.
//! * **Testing**: [`TestApp`] runs an app on the in-memory broker and records what it did.
//!
//! ```
//! use std::time::Duration;
//! use polybus_core::Event;
//! use polybus_runtime::layers::TimeoutLayer;
//! use polybus_runtime::{App, Json, Key, Outbound, RetryPolicy, Settlement, State, TestApp};
//!
//! #[derive(serde::Deserialize)]
//! struct Order { id: u64, amount: u64 }
//!
//! #[derive(Clone)]
//! struct Limits { max_amount: u64 }
//!
//! async fn on_order(
//!     Json(order): Json<Order>,
//!     Key(customer): Key,
//!     State(limits): State<Limits>,
//! ) -> anyhow::Result<Outbound> {
//!     anyhow::ensure!(customer.is_some(), "orders are keyed by customer");
//!     anyhow::ensure!(order.amount <= limits.max_amount, "amount over the limit");
//!     Ok(Outbound::new("invoices", Event::new(format!("{{\"order\":{}}}", order.id))))
//! }
//!
//! # #[tokio::main(flavor = "current_thread", start_paused = true)]
//! # async fn main() -> anyhow::Result<()> {
//! let app = App::with_state(Limits { max_amount: 100 })
//!     .route("orders", on_order)
//!     .layer(TimeoutLayer::new(Duration::from_secs(5)))
//!     .retry(RetryPolicy::exponential(Duration::from_millis(100)).max_attempts(3))
//!     .concurrency(8);
//!
//! // In production: app.run(consumer, publisher).await? on any backend.
//! let mut t = TestApp::start(app).await?;
//! let ok = Event::builder().key("c-1").data(br#"{"id":1,"amount":5}"#.as_slice()).build()?;
//! let too_big = Event::builder().key("c-2").data(br#"{"id":2,"amount":500}"#.as_slice()).build()?;
//! let (ok_id, big_id) = (ok.id().to_owned(), too_big.id().to_owned());
//! t.publish("orders", ok).await?;
//! t.publish("orders", too_big).await?;
//! assert_eq!(t.settled(&ok_id).await?.settlement(), &Settlement::Acked);
//! assert!(matches!(t.settled(&big_id).await?.settlement(), Settlement::DeadLettered { .. }));
//! assert_eq!(t.published("invoices").len(), 1);
//! assert_eq!(t.dead_letters("orders").len(), 1);
//! t.stop().await?;
//! # Ok(()) }
//! ```
//!
//! # Semantics per backend
//!
//! | backend | retry | released at drain timeout |
//! |---|---|---|
//! | memory, JetStream, Kafka | `nack(delay)`: redelivered by the broker/adapter, `attempt` = `delivery_count` | `nack(0)` |
//! | core NATS, MQTT | in process, in the key's lane | dropped (at-most-once: the backend already considers it delivered) |
//!
//! # From a hand-written loop
//!
//! ```text
//! let mut deliveries = pin!(consumer.subscribe("orders"));      App::new()
//! while let Some(d) = deliveries.next().await {                   .route("orders", handle)
//!     let d = d?;                                                 .retry(RetryPolicy::default())
//!     let order: Order = serde_json::from_slice(d.payload())?;    .concurrency(8)
//!     match handle(order).await {                                 .run(consumer, publisher)
//!         Ok(()) => d.ack().await?,                               .await?;
//!         Err(_) if d.delivery_count() < 5 =>
//!             d.nack(backoff(d.delivery_count())).await?,     async fn handle(Json(order): Json<Order>)
//!         Err(e) => { publish_dead_letter(&d, e).await?;          -> anyhow::Result<()> { ... }
//!                     d.term().await? }
//!     }
//! }
//! ```
//!
//! The body of the loop becomes the handler; decoding becomes an extractor; the `match`
//! becomes the handler's `Result` and the app's [`RetryPolicy`] and dead-letter topic; the
//! loop's one-at-a-time becomes [`App::concurrency`] without losing per-key order; and the
//! app adds what loops usually lack: a caught panic, a drain on SIGTERM, a test harness.
#![cfg_attr(docsrs, feature(doc_cfg))]
#![doc(test(attr(deny(warnings))))]

mod app;
mod batch;
mod extract;
mod handler;
mod harness;
#[cfg(feature = "http")]
#[cfg_attr(docsrs, doc(cfg(feature = "http")))]
pub mod http;
pub mod layers;
mod message;
pub mod metrics;
mod outcome;
mod redrive;
mod report;
mod retry;

pub use app::{App, Route, RouteService, shutdown_signal};
pub use batch::{Batch, BatchHandler, IntoBatchOutcomes};
pub use extract::{Attempt, Data, FromMessage, Json, Key, State, Topic};
pub use handler::{Handler, HandlerService};
pub use harness::{TEST_GROUP, TestApp};
pub use message::Message;
pub use outcome::{CORRELATION_ID, HandlerError, IntoOutcome, Outbound, Outcome, REPLY_TO, Reply};
/// The retry policy of apps and [`RetryLayer`](layers::RetryLayer), shared with the composed
/// bus (defined in `polybus-core`).
pub use polybus_core::RetryPolicy;
pub use redrive::{RedriveOptions, RedriveReport, redrive};
pub use report::{Health, Report, Settlement, Status};
pub use retry::RetryMode;
