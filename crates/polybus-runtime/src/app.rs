//! The application: routes, settings, and the run loop (dispatcher, per-key lanes, retry,
//! dead letters, drain).

use std::collections::{HashMap, VecDeque};
use std::convert::Infallible;
use std::fmt;
use std::future::Future;
use std::panic::AssertUnwindSafe;
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;

use bytes::Bytes;
use futures_util::future::BoxFuture;
use futures_util::stream::{self, BoxStream, FuturesUnordered};
use futures_util::{FutureExt as _, StreamExt as _};
use polybus_core::dlq::{DeadLetter, DeadLetterTopic};
use polybus_core::{
    BoxError, BoxPublisher, Consumer, Delivery, ErrorKind, Event, Publisher, Result,
};
use tokio::sync::{OwnedSemaphorePermit, Semaphore, watch};
use tokio::task::JoinSet;
use tower::util::BoxCloneSyncService;
use tower::{Layer, Service, ServiceExt as _};
use tracing::Instrument as _;

use crate::batch::{self, BatchFn};
use crate::handler::ErrorsAsFailures;
use crate::report::{Counted, HealthCounters};
use crate::{
    Batch, BatchHandler, Handler, HandlerError, Health, Message, Outbound, Outcome, Report,
    RetryMode, RetryPolicy, Settlement, Status,
};

/// A route's handler with its layers: what the dispatcher calls.
pub type RouteService = BoxCloneSyncService<Message, Outcome, Infallible>;

type LayerFn = Arc<dyn Fn(RouteService) -> RouteService + Send + Sync>;
/// A route's handler called straight: the handler's own future, nothing around it.
type DirectFn = Arc<dyn Fn(Message) -> BoxFuture<'static, Outcome> + Send + Sync>;

/// A route's handler as the dispatcher calls it: straight when the route has no layers (no
/// tower service cloned and no second boxed future per event), else the layered service.
#[derive(Clone)]
enum RouteSvc {
    Direct(DirectFn),
    Layered(RouteService),
}

impl RouteSvc {
    /// The handler as a tower service, for layers to wrap.
    fn into_service(self) -> RouteService {
        match self {
            RouteSvc::Direct(f) => BoxCloneSyncService::new(DirectService(f)),
            RouteSvc::Layered(s) => s,
        }
    }
}

/// A [`DirectFn`] as a tower service.
#[derive(Clone)]
struct DirectService(DirectFn);

impl Service<Message> for DirectService {
    type Response = Outcome;
    type Error = Infallible;
    type Future = futures_util::future::Map<
        BoxFuture<'static, Outcome>,
        fn(Outcome) -> std::result::Result<Outcome, Infallible>,
    >;

    fn poll_ready(
        &mut self,
        _: &mut std::task::Context<'_>,
    ) -> std::task::Poll<std::result::Result<(), Infallible>> {
        std::task::Poll::Ready(Ok(()))
    }

    fn call(&mut self, msg: Message) -> Self::Future {
        (self.0)(msg).map(Ok as fn(Outcome) -> std::result::Result<Outcome, Infallible>)
    }
}
type Observer = Arc<dyn Fn(&Report) + Send + Sync>;

fn boxed_layer<L>(layer: L) -> LayerFn
where
    L: Layer<RouteService> + Send + Sync + 'static,
    L::Service: Service<Message, Response = Outcome> + Clone + Send + Sync + 'static,
    <L::Service as Service<Message>>::Error: Into<BoxError>,
    <L::Service as Service<Message>>::Future: Send + 'static,
{
    Arc::new(move |svc| BoxCloneSyncService::new(ErrorsAsFailures::new(layer.layer(svc))))
}

/// One topic (optionally one CloudEvents `type` on it) and its handler.
///
/// ```
/// use std::time::Duration;
/// use polybus_runtime::layers::TimeoutLayer;
/// use polybus_runtime::{App, Route};
///
/// async fn created() {}
/// async fn anything_else() {}
/// let app = App::new()
///     .add_route(Route::new("orders", created).kind("order.created")
///         .layer(TimeoutLayer::new(Duration::from_secs(2))))
///     .route("orders", anything_else);
/// # let _ = app;
/// ```
pub struct Route<S> {
    topic: String,
    kind: Option<String>,
    make: Box<dyn FnOnce(S) -> RouteSvc + Send>,
}

impl<S: Clone + Send + Sync + 'static> Route<S> {
    /// `handler` for every event on `topic` (a NATS subject may have wildcards).
    pub fn new<H, T>(topic: impl Into<String>, handler: H) -> Self
    where
        H: Handler<T, S>,
        T: 'static,
    {
        Route {
            topic: topic.into(),
            kind: None,
            make: Box::new(move |state: S| {
                RouteSvc::Direct(Arc::new(move |msg| {
                    handler.clone().call(msg, state.clone())
                }))
            }),
        }
    }

    /// Only events whose CloudEvents `type` is `kind`. Routes with a kind are tried first, in
    /// the order they were added; a route without one takes the rest of its topic.
    pub fn kind(mut self, kind: impl Into<String>) -> Self {
        self.kind = Some(kind.into());
        self
    }

    /// Wraps this route's handler in `layer` (inside the app-wide layers).
    pub fn layer<L>(self, layer: L) -> Self
    where
        L: Layer<RouteService> + Send + Sync + 'static,
        L::Service: Service<Message, Response = Outcome> + Clone + Send + Sync + 'static,
        <L::Service as Service<Message>>::Error: Into<BoxError>,
        <L::Service as Service<Message>>::Future: Send + 'static,
    {
        let wrap = boxed_layer(layer);
        let make = self.make;
        Route {
            topic: self.topic,
            kind: self.kind,
            make: Box::new(move |state| RouteSvc::Layered(wrap(make(state).into_service()))),
        }
    }
}

impl<S> fmt::Debug for Route<S> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Route")
            .field("topic", &self.topic)
            .field("kind", &self.kind)
            .finish()
    }
}

/// Where dead letters go.
#[derive(Debug, Clone)]
enum DeadLetters {
    Off,
    SameBackend(DeadLetterTopic),
    To(DeadLetterTopic, BoxPublisher),
}

/// An event-driven application: routes from topics to handlers, layers, a retry policy, a
/// dead-letter topic and a concurrency, run over any [`Consumer`] and [`Publisher`].
///
/// * **Routing**: [`route`](Self::route) a topic to a handler, or [`add_route`](Self::add_route) a
///   [`Route`] filtered by CloudEvents `type`. An event no route takes is a permanent failure
///   (`x-exception-kind: unrouted`).
/// * **Retry**: a failure (see [`HandlerError`] for which are retried) is tried again after
///   the [`RetryPolicy`]'s backoff, by redelivery or in process ([`RetryMode`]); after the
///   last attempt, or at once for a permanent failure, the event goes to the dead-letter
///   topic (`<topic>.dlq` by default, on the app's publisher) in the
///   [`polybus_core::dlq`] format, and the delivery is settled with `term`.
/// * **Order and concurrency**: [`concurrency(n)`](Self::concurrency) runs up to `n`
///   handlers at once; events with the same key go through one lane, strictly in order;
///   events without a key are not ordered. At most `n` + [`buffer`](Self::buffer) deliveries
///   are held; when they are, the app stops pulling from the consumer (backpressure).
/// * **Lifecycle**: [`run`](Self::run) until SIGTERM or SIGINT, or
///   [`run_until`](Self::run_until) a future: stop pulling, let in-flight handlers finish
///   within the [`drain_timeout`](Self::drain_timeout), hand back what did not finish (nack
///   or drop unsettled, so the backend redelivers it where it can), flush and close the
///   publishers.
///
/// ```
/// use polybus_core::{MemoryBroker, PublisherExt};
/// use polybus_runtime::{App, Json};
///
/// #[derive(serde::Deserialize)]
/// struct Order { id: u64 }
///
/// async fn on_order(Json(order): Json<Order>) -> anyhow::Result<()> {
///     anyhow::ensure!(order.id > 0, "order ids start at 1");
///     Ok(())
/// }
///
/// # #[tokio::main(flavor = "current_thread")] async fn main() -> anyhow::Result<()> {
/// let broker = MemoryBroker::new();
/// let app = App::new().route("orders", on_order).concurrency(8);
/// let mut status = app.status();
/// let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
/// let running = tokio::spawn(app.run_until(
///     broker.consumer_group("billing"),
///     broker.publisher(),
///     async { let _ = stopped.await; },
/// ));
/// status.wait_for(|s| *s == polybus_runtime::Status::Running).await?;
/// broker.publisher().publish_json("orders", &serde_json::json!({"id": 1})).await?;
/// # let _ = stop.send(());
/// # running.await??;
/// # Ok(()) }
/// ```
pub struct App<S = ()> {
    state: S,
    routes: Vec<Route<S>>,
    batch_routes: Vec<BatchRoute<S>>,
    layers: Vec<LayerFn>,
    concurrency: usize,
    buffer: Option<usize>,
    retry: RetryPolicy,
    retry_mode: RetryMode,
    dead_letters: DeadLetters,
    drain_timeout: Duration,
    observer: Option<Observer>,
    status: watch::Sender<Status>,
    counters: Arc<HealthCounters>,
}

impl<S> fmt::Debug for App<S> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("App")
            .field("routes", &self.routes)
            .field("batch_routes", &self.batch_routes.len())
            .field("layers", &self.layers.len())
            .field("concurrency", &self.concurrency)
            .field("buffer", &self.buffer)
            .field("retry", &self.retry)
            .field("retry_mode", &self.retry_mode)
            .field("dead_letters", &self.dead_letters)
            .field("drain_timeout", &self.drain_timeout)
            .finish()
    }
}

impl App<()> {
    /// An app without state.
    pub fn new() -> Self {
        App::with_state(())
    }
}

impl Default for App<()> {
    fn default() -> Self {
        App::new()
    }
}

impl<S: Clone + Send + Sync + 'static> App<S> {
    /// An app whose handlers can take `State<S>`.
    pub fn with_state(state: S) -> Self {
        App {
            state,
            routes: Vec::new(),
            batch_routes: Vec::new(),
            layers: Vec::new(),
            concurrency: 1,
            buffer: None,
            retry: RetryPolicy::default(),
            retry_mode: RetryMode::Auto,
            dead_letters: DeadLetters::SameBackend(DeadLetterTopic::default()),
            drain_timeout: Duration::from_secs(10),
            observer: None,
            status: watch::Sender::new(Status::Starting),
            counters: Arc::default(),
        }
    }

    /// Routes every event on `topic` to `handler`.
    pub fn route<H, T>(self, topic: impl Into<String>, handler: H) -> Self
    where
        H: Handler<T, S>,
        T: 'static,
    {
        self.add_route(Route::new(topic, handler))
    }

    /// Adds a [`Route`].
    pub fn add_route(mut self, route: Route<S>) -> Self {
        self.routes.push(route);
        self
    }

    /// Routes every event on `topic` to a batch handler: it gets up to `batch.max()` events,
    /// or what arrived within `batch.max_wait()` of the first, and returns an outcome per
    /// event, settled one by one like a single handler's (ack, publish, retry, dead letter).
    ///
    /// Batches of one route run one at a time, in arrival order, so the topic's order is kept;
    /// failed events of a batch that are retried in process ([`RetryMode::InProcess`]) come
    /// back together as a smaller batch after the longest of their delays. A batch route takes
    /// every event of its topic (other routes on that topic are not used), and layers do not
    /// apply to it. The app holds up to `max` more deliveries per batch route, on top of
    /// `concurrency + buffer`.
    pub fn batch_route<H>(mut self, topic: impl Into<String>, batch: Batch, handler: H) -> Self
    where
        H: BatchHandler<S>,
    {
        self.batch_routes.push(BatchRoute {
            topic: topic.into(),
            batch,
            make: Box::new(move |state| batch::bind(handler, state)),
        });
        self
    }

    /// Wraps every route's handler in `layer`. Each call wraps what is there, so the last
    /// layer added is the outermost.
    pub fn layer<L>(mut self, layer: L) -> Self
    where
        L: Layer<RouteService> + Send + Sync + 'static,
        L::Service: Service<Message, Response = Outcome> + Clone + Send + Sync + 'static,
        <L::Service as Service<Message>>::Error: Into<BoxError>,
        <L::Service as Service<Message>>::Future: Send + 'static,
    {
        self.layers.push(boxed_layer(layer));
        self
    }

    /// Runs up to `n` handlers at once (default 1), in per-key lanes.
    ///
    /// At 1 the lanes run on the app's own task (no task per event); above 1 every lane is a
    /// tokio task, so handlers run in parallel on a multi-thread runtime.
    pub fn concurrency(mut self, n: usize) -> Self {
        self.concurrency = n.clamp(1, Semaphore::MAX_PERMITS / 4);
        self
    }

    /// How many deliveries may wait in lanes beyond the `n` running (default `n`). The app
    /// holds at most `n + buffer` deliveries (plus `max` per batch route); a deeper buffer
    /// keeps more pulled ahead of a slow handler, at that much more memory and, on brokers
    /// with an ack deadline (JetStream's `ack_wait`), that much longer for the last one to wait.
    pub fn buffer(mut self, n: usize) -> Self {
        self.buffer = Some(n.min(Semaphore::MAX_PERMITS / 4));
        self
    }

    /// Sets the retry policy (default: 5 attempts, 200 ms doubling, 20 % jitter).
    pub fn retry(mut self, policy: RetryPolicy) -> Self {
        self.retry = policy;
        self
    }

    /// Sets how retries are made (default [`RetryMode::Auto`]).
    pub fn retry_mode(mut self, mode: RetryMode) -> Self {
        self.retry_mode = mode;
        self
    }

    /// Dead letters go to `naming`'s topic on the app's publisher (the default, with
    /// `<topic>.dlq`).
    pub fn dead_letter_topic(mut self, naming: DeadLetterTopic) -> Self {
        self.dead_letters = DeadLetters::SameBackend(naming);
        self
    }

    /// Dead letters go to `naming`'s topic on `publisher` (another backend).
    pub fn dead_letter_publisher(
        mut self,
        naming: DeadLetterTopic,
        publisher: BoxPublisher,
    ) -> Self {
        self.dead_letters = DeadLetters::To(naming, publisher);
        self
    }

    /// No dead-letter topic: an event that is given up on is settled with `term` (and lost
    /// where the backend cannot keep it).
    pub fn without_dead_letters(mut self) -> Self {
        self.dead_letters = DeadLetters::Off;
        self
    }

    /// The dead-letter topic of `topic`, if the app has dead letters.
    pub fn dead_letter_topic_for(&self, topic: &str) -> Option<String> {
        match &self.dead_letters {
            DeadLetters::Off => None,
            DeadLetters::SameBackend(n) | DeadLetters::To(n, _) => Some(n.topic_for(topic)),
        }
    }

    /// How long in-flight handlers may finish after shutdown starts (default 10 s).
    pub fn drain_timeout(mut self, timeout: Duration) -> Self {
        self.drain_timeout = timeout;
        self
    }

    /// Calls `observer` with a [`Report`] on every settlement (keep it quick: it runs on the
    /// handling task).
    pub fn on_report(mut self, observer: impl Fn(&Report) + Send + Sync + 'static) -> Self {
        let previous = self.observer.take();
        self.observer = Some(Arc::new(move |r: &Report| {
            if let Some(p) = &previous {
                p(r);
            }
            observer(r);
        }));
        self
    }

    /// The app's [`Status`], to wait for `Running` (subscribed) or `Stopped`.
    pub fn status(&self) -> watch::Receiver<Status> {
        self.status.subscribe()
    }

    /// A live view of the app for health checks ([`Health`]).
    pub fn health(&self) -> Health {
        Health {
            status: self.status.subscribe(),
            counters: self.counters.clone(),
        }
    }

    /// Runs until SIGTERM or SIGINT (see [`run_until`](Self::run_until)).
    ///
    /// # Errors
    /// As [`run_until`](Self::run_until).
    pub async fn run<C, P>(self, consumer: C, publisher: P) -> Result<()>
    where
        C: Consumer,
        P: Publisher + 'static,
    {
        self.run_until(consumer, publisher, shutdown_signal()).await
    }

    /// Subscribes to every route's topic and handles deliveries until `shutdown` resolves or
    /// every subscription has ended; then drains (see the type's docs), flushes and closes
    /// `publisher` (and the dead-letter publisher).
    ///
    /// # Errors
    /// A subscription failed for good (invalid topic, unauthorized, unsupported, not found):
    /// the app drains and returns it. Other stream errors are logged and the app goes on; if
    /// every subscription then ends, the last of them is returned.
    pub async fn run_until<C, P, F>(self, consumer: C, publisher: P, shutdown: F) -> Result<()>
    where
        C: Consumer,
        P: Publisher + 'static,
        F: Future<Output = ()> + Send,
    {
        crate::metrics::describe();
        let caps = consumer.capabilities();
        let redeliver = match self.retry_mode {
            RetryMode::Redeliver => true,
            RetryMode::InProcess => false,
            _ => caps.nack_delay,
        };
        let batch_capacity: usize = self.batch_routes.iter().map(|b| b.batch.max()).sum();
        let tables = build_tables(self.routes, self.batch_routes, &self.layers, &self.state);
        let (cancel_tx, cancel_rx) = watch::channel(false);
        let concurrency = self.concurrency;
        let pending = Arc::new(Semaphore::new(
            (concurrency + self.buffer.unwrap_or(concurrency) + batch_capacity)
                .min(Semaphore::MAX_PERMITS),
        ));
        let ctx = Arc::new(Ctx {
            publisher: Arc::new(publisher),
            dead_letters: self.dead_letters,
            retry: self.retry,
            redeliver,
            release_by_nack: caps.redelivery_on_nack,
            observer: self.observer,
            running: Semaphore::new(concurrency),
            counters: self.counters.clone(),
            cancel: cancel_rx,
            lanes: Mutex::new(HashMap::new()),
            recording: polybus_core::metrics::recorder_installed(),
        });

        let mut streams: Vec<BoxStream<'_, (usize, Result<Delivery>)>> = tables
            .iter()
            .enumerate()
            .map(|(i, t)| consumer.subscribe(&t.topic).map(move |r| (i, r)).boxed())
            .collect();
        // One topic (the common case) needs no merging.
        let mut deliveries = match streams.pop() {
            Some(only) if streams.is_empty() => only,
            last => {
                streams.extend(last);
                stream::select_all(streams).boxed()
            }
        };
        // Concurrency 1 without batch routes: a delivery that finds nothing in flight is
        // handled right here on the run loop, to its settlement, like a hand-written loop (no
        // lane, no handler slot, no future boxed per event). Only an in-process retry goes to
        // a lane, so other keys go on during its wait.
        let inline = concurrency == 1 && tables.iter().all(|t| t.batch.is_none());
        // Set when the shutdown came during an inline delivery, which was drained there.
        let mut drain_deadline = None;
        self.status.send_replace(Status::Running);
        tracing::info!(
            routes = tables.len(),
            concurrency,
            redeliver,
            "polybus runtime running"
        );

        let mut shutdown = std::pin::pin!(shutdown);
        let mut tasks = Runner::new(concurrency);
        let mut fatal = None;
        let mut last_error = None;
        let mut batches: HashMap<usize, Buffered> = HashMap::new();
        'run: loop {
            // The run loop's one way of waiting for `$next` (a slot, or the next delivery): the
            // app goes on meanwhile (batches whose wait is over start, finished lanes are
            // collected) and a shutdown leaves the run loop. `$next` is one future polled
            // across the turns, so a slot waited for keeps its place in the semaphore's queue.
            // A macro, not an `async fn`: expanded in place, it moves no future and no delivery
            // in or out of one more state machine per event (the `async fn` cost ~200
            // instructions and ~3 `memcpy` calls per event in runtime.c1, callgrind).
            macro_rules! serve_until {
                ($next:expr) => {{
                    let mut next = std::pin::pin!($next);
                    loop {
                        let next_flush = batches.values().map(|b| b.deadline).min();
                        tokio::select! {
                            biased;
                            () = &mut shutdown => break 'run,
                            // Made only when polled: no clock read and no timer per turn
                            // without batches.
                            () = async {
                                tokio::time::sleep_until(next_flush.unwrap_or_else(far_future))
                                    .await
                            },
                                if next_flush.is_some() =>
                            {
                                flush_due(&ctx, &tables, &mut batches, &mut tasks, false);
                            }
                            Some(()) = tasks.next(), if !tasks.is_empty() => {}
                            item = &mut next => break item,
                        }
                    }
                }};
            }
            // A slot for one more delivery: what the app holds is bounded. The inline path
            // needs none: with nothing in flight the app holds only the delivery it handles
            // (a retry it hands to a lane takes a slot then).
            // (Nothing is spawned between here and the dispatch below, so `handle_here` holds
            // there too.)
            let handle_here = inline && tasks.is_empty();
            let permit = if handle_here {
                None
            } else if let Ok(p) = pending.clone().try_acquire_owned() {
                Some(p)
            } else {
                match serve_until!(pending.clone().acquire_owned()) {
                    Ok(p) => Some(p),
                    // The semaphore closed.
                    Err(_) => break 'run,
                }
            };
            let item = serve_until!(deliveries.next());
            match item {
                None => {
                    // Every subscription ended: if one ended on an error, that is the answer.
                    fatal = last_error.take();
                    break;
                }
                Some((i, Err(e))) => {
                    if matches!(
                        e.kind(),
                        ErrorKind::InvalidTopic
                            | ErrorKind::Unauthorized
                            | ErrorKind::Unsupported
                            | ErrorKind::NotFound
                    ) {
                        tracing::error!(topic = %tables[i].topic, error = %e, "subscription failed");
                        fatal = Some(e);
                        break;
                    }
                    self.counters
                        .subscription_errors
                        .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                    tracing::warn!(topic = %tables[i].topic, error = %e, "subscription error");
                    last_error = Some(e);
                }
                Some((i, Ok(delivery))) => {
                    // The job is made once, with its route: a delivery is large, and every
                    // move of it is a copy.
                    let service = match &tables[i].batch {
                        Some(_) => None,
                        None => tables[i].route_for(delivery.event().kind()),
                    };
                    let job = Job {
                        service,
                        delivery,
                        _permit: permit,
                        _held: Counted::new(&ctx.counters, |c| &c.held),
                    };
                    if let Some(route) = &tables[i].batch {
                        let buffered = batches.entry(i).or_insert_with(|| Buffered {
                            jobs: Vec::with_capacity(route.batch.max()),
                            deadline: tokio::time::Instant::now() + route.batch.max_wait(),
                        });
                        buffered.jobs.push(job);
                        if buffered.jobs.len() >= route.batch.max()
                            && let Some(full) = batches.remove(&i)
                        {
                            tasks.spawn(run_batch(
                                ctx.clone(),
                                route.handler.clone(),
                                route.order.clone(),
                                full.jobs,
                            ));
                        }
                    } else {
                        if !handle_here {
                            dispatch(&ctx, &mut tasks, job);
                            continue;
                        }
                        // A panic outside the handler (which `call` catches) loses this
                        // delivery unsettled, as a lane's would, not the app.
                        // Pinned where it is made; the panic guard wraps the pinned
                        // reference, so the (large) future is not moved into it.
                        let mut process = std::pin::pin!(process(&ctx, job, None, true));
                        let mut work = AssertUnwindSafe(process.as_mut()).catch_unwind();
                        let handed_back = tokio::select! {
                            biased;
                            r = &mut work => r,
                            () = &mut shutdown => {
                                // Stop pulling; this delivery gets the drain as if in flight.
                                let deadline = tokio::time::Instant::now() + self.drain_timeout;
                                drain_deadline = Some(deadline);
                                self.status.send_replace(Status::Draining);
                                let r = match tokio::time::timeout_at(deadline, &mut work).await {
                                    Ok(r) => r,
                                    Err(_) => {
                                        tracing::warn!("drain timeout: handing back the unfinished delivery");
                                        cancel_tx.send_replace(true);
                                        tokio::time::timeout(RELEASE_GRACE, &mut work).await.unwrap_or(Ok(None))
                                    }
                                };
                                if let Ok(Some(retry)) = r {
                                    start_retry(&ctx, &pending, &mut tasks, retry);
                                }
                                break 'run;
                            }
                        };
                        match handed_back {
                            Ok(Some(retry)) => start_retry(&ctx, &pending, &mut tasks, retry),
                            Ok(None) => {}
                            Err(_) => tracing::error!(
                                "a lane panicked; its deliveries are released unsettled"
                            ),
                        }
                    }
                }
            }
        }
        // What batches collected is handled within the drain.
        flush_due(&ctx, &tables, &mut batches, &mut tasks, true);

        // Drain: no more pulls; in-flight and queued deliveries get until the deadline.
        self.status.send_replace(Status::Draining);
        let drain = async { while tasks.next().await.is_some() {} };
        let deadline =
            drain_deadline.unwrap_or_else(|| tokio::time::Instant::now() + self.drain_timeout);
        if tokio::time::timeout_at(deadline, drain).await.is_err() {
            tracing::warn!(
                in_flight = tasks.len(),
                "drain timeout: handing back unfinished deliveries"
            );
            cancel_tx.send_replace(true);
            let release = async { while tasks.next().await.is_some() {} };
            if tokio::time::timeout(RELEASE_GRACE, release).await.is_err() {
                tasks.abort_all().await;
            }
        }
        drop(deliveries);
        if let Err(e) = ctx.publisher.flush().await {
            tracing::warn!(error = %e, "flushing the publisher at shutdown");
        }
        if let DeadLetters::To(_, p) = &ctx.dead_letters
            && let Err(e) = p.flush().await
        {
            tracing::warn!(error = %e, "flushing the dead-letter publisher at shutdown");
        }
        if let Err(e) = ctx.publisher.close().await {
            tracing::warn!(error = %e, "closing the publisher at shutdown");
        }
        self.status.send_replace(Status::Stopped);
        tracing::info!("polybus runtime stopped");
        fatal.map_or(Ok(()), Err)
    }
}

/// Where lanes and batches run.
///
/// At concurrency 1 they run on the run loop's own task (`Inline`): one handler runs at a
/// time anyway, and a task per delivery would cost a spawn and two wake-ups between the run
/// loop and the lane (on a multi-thread runtime, often another thread to unpark) per event,
/// which the hand-written loop does not pay. Above 1 every lane is a task (`Spawned`), so
/// handlers run in parallel on a multi-thread runtime.
enum Runner {
    Inline(FuturesUnordered<BoxFuture<'static, ()>>),
    Spawned(JoinSet<()>),
}

impl Runner {
    fn new(concurrency: usize) -> Self {
        if concurrency <= 1 {
            Runner::Inline(FuturesUnordered::new())
        } else {
            Runner::Spawned(JoinSet::new())
        }
    }

    fn spawn(&mut self, work: impl Future<Output = ()> + Send + 'static) {
        match self {
            Runner::Inline(set) => set.push(Box::pin(async move {
                // Handler panics are caught where they are called; this keeps the run loop
                // alive if anything else in a lane panics, as a task's panic would.
                if AssertUnwindSafe(work).catch_unwind().await.is_err() {
                    tracing::error!("a lane panicked; its deliveries are released unsettled");
                }
            })),
            Runner::Spawned(set) => {
                set.spawn(work);
            }
        }
    }

    fn is_empty(&self) -> bool {
        match self {
            Runner::Inline(set) => set.is_empty(),
            Runner::Spawned(set) => set.is_empty(),
        }
    }

    fn len(&self) -> usize {
        match self {
            Runner::Inline(set) => set.len(),
            Runner::Spawned(set) => set.len(),
        }
    }

    /// Runs the inline lanes until one ends, or waits for a task to end; `None` when none is
    /// left.
    async fn next(&mut self) -> Option<()> {
        match self {
            Runner::Inline(set) => set.next().await,
            Runner::Spawned(set) => set.join_next().await.map(|_| ()),
        }
    }

    /// Stops every lane where it is (its deliveries are dropped unsettled).
    async fn abort_all(&mut self) {
        match self {
            Runner::Inline(set) => set.clear(),
            Runner::Spawned(set) => {
                set.abort_all();
                while set.join_next().await.is_some() {}
            }
        }
    }
}

/// How long released deliveries get to be handed back after the drain timeout.
const RELEASE_GRACE: Duration = Duration::from_secs(5);

/// Resolves on SIGTERM or SIGINT (Ctrl-C). If no signal handler can be installed, it never
/// resolves (use [`App::run_until`] with your own future then).
pub async fn shutdown_signal() {
    #[cfg(unix)]
    {
        use tokio::signal::unix::{SignalKind, signal};
        let mut term = signal(SignalKind::terminate()).ok();
        let mut int = signal(SignalKind::interrupt()).ok();
        let term = async {
            match term.as_mut() {
                Some(s) => {
                    s.recv().await;
                }
                None => std::future::pending().await,
            }
        };
        let int = async {
            match int.as_mut() {
                Some(s) => {
                    s.recv().await;
                }
                None => std::future::pending().await,
            }
        };
        tokio::select! {
            () = term => {}
            () = int => {}
        }
    }
    #[cfg(not(unix))]
    {
        if tokio::signal::ctrl_c().await.is_err() {
            std::future::pending::<()>().await;
        }
    }
}

/// The routes of one subscribed topic.
struct TopicRoutes {
    topic: String,
    by_kind: Vec<(String, RouteSvc)>,
    fallback: Option<RouteSvc>,
    batch: Option<BoundBatch>,
}

/// A batch route as the app registered it.
struct BatchRoute<S> {
    topic: String,
    batch: Batch,
    make: Box<dyn FnOnce(S) -> BatchFn + Send>,
}

/// A batch route bound to the state, with the lock that runs its batches one at a time.
struct BoundBatch {
    batch: Batch,
    handler: BatchFn,
    order: Arc<tokio::sync::Mutex<()>>,
}

/// What a batch route collected so far.
struct Buffered {
    jobs: Vec<Job>,
    deadline: tokio::time::Instant,
}

fn far_future() -> tokio::time::Instant {
    tokio::time::Instant::now() + Duration::from_secs(86_400 * 365)
}

/// Starts the batches whose wait is over (all of them with `all`).
fn flush_due<P: Publisher + 'static>(
    ctx: &Arc<Ctx<P>>,
    tables: &[TopicRoutes],
    batches: &mut HashMap<usize, Buffered>,
    tasks: &mut Runner,
    all: bool,
) {
    let now = tokio::time::Instant::now();
    let due: Vec<usize> = batches
        .iter()
        .filter(|(_, b)| all || b.deadline <= now)
        .map(|(i, _)| *i)
        .collect();
    for i in due {
        if let (Some(buffered), Some(route)) = (batches.remove(&i), &tables[i].batch) {
            tasks.spawn(run_batch(
                ctx.clone(),
                route.handler.clone(),
                route.order.clone(),
                buffered.jobs,
            ));
        }
    }
}

impl TopicRoutes {
    fn route_for(&self, kind: &str) -> Option<RouteSvc> {
        self.by_kind
            .iter()
            .find(|(k, _)| k == kind)
            .map(|(_, s)| s.clone())
            .or_else(|| self.fallback.clone())
    }
}

fn build_tables<S: Clone>(
    routes: Vec<Route<S>>,
    batch_routes: Vec<BatchRoute<S>>,
    layers: &[LayerFn],
    state: &S,
) -> Vec<TopicRoutes> {
    let mut tables: Vec<TopicRoutes> = Vec::new();
    for route in routes {
        let mut svc = (route.make)(state.clone());
        for layer in layers {
            svc = RouteSvc::Layered(layer(svc.into_service()));
        }
        let idx = match tables.iter().position(|t| t.topic == route.topic) {
            Some(i) => i,
            None => {
                tables.push(TopicRoutes {
                    topic: route.topic.clone(),
                    by_kind: Vec::new(),
                    fallback: None,
                    batch: None,
                });
                tables.len() - 1
            }
        };
        let table = &mut tables[idx];
        match route.kind {
            Some(kind) => table.by_kind.push((kind, svc)),
            None if table.fallback.is_none() => table.fallback = Some(svc),
            None => {
                tracing::warn!(topic = %route.topic, "a second route without a kind is never used")
            }
        }
    }
    for route in batch_routes {
        let bound = BoundBatch {
            batch: route.batch,
            handler: (route.make)(state.clone()),
            order: Arc::new(tokio::sync::Mutex::new(())),
        };
        match tables.iter_mut().find(|t| t.topic == route.topic) {
            Some(t) => {
                tracing::warn!(topic = %route.topic, "a batch route takes every event of its topic; the other routes are not used");
                t.batch = Some(bound);
            }
            None => tables.push(TopicRoutes {
                topic: route.topic,
                by_kind: Vec::new(),
                fallback: None,
                batch: Some(bound),
            }),
        }
    }
    tables
}

/// What every lane shares.
pub(crate) struct Ctx<P> {
    publisher: Arc<P>,
    dead_letters: DeadLetters,
    retry: RetryPolicy,
    redeliver: bool,
    release_by_nack: bool,
    observer: Option<Observer>,
    running: Semaphore,
    counters: Arc<HealthCounters>,
    cancel: watch::Receiver<bool>,
    lanes: Mutex<HashMap<Bytes, VecDeque<Job>>>,
    /// A `metrics` recorder was installed when the app started: without one, no metric work
    /// (not even the clock read for the handler duration) per event.
    recording: bool,
}

struct Job {
    delivery: Delivery,
    service: Option<RouteSvc>,
    /// Held until the delivery is settled: bounds what the app holds.
    /// `None` on the inline path (see `App::run_until`).
    _permit: Option<OwnedSemaphorePermit>,
    _held: Counted,
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    // Critical sections are container operations that do not panic.
    m.lock().unwrap_or_else(|e| e.into_inner())
}

fn dispatch<P: Publisher + 'static>(ctx: &Arc<Ctx<P>>, tasks: &mut Runner, job: Job) {
    let key = job.delivery.event().key_bytes().cloned();
    if let Some(k) = &key {
        let mut lanes = lock(&ctx.lanes);
        if let Some(queue) = lanes.get_mut(k) {
            queue.push_back(job);
            return;
        }
        lanes.insert(k.clone(), VecDeque::new());
    }
    tasks.spawn(run_lane(ctx.clone(), key, job, None));
}

/// A delivery to be retried in process after `delay`, handed back by an inline [`process`].
struct Retry {
    job: Job,
    /// The attempt that failed.
    attempt: u32,
    delay: Duration,
}

/// Puts a retry handed back by the inline path in a lane of its key (which has none: nothing
/// else is in flight on the inline path), so later events of the key queue behind it while
/// other keys go on.
fn start_retry<P: Publisher + 'static>(
    ctx: &Arc<Ctx<P>>,
    pending: &Arc<Semaphore>,
    tasks: &mut Runner,
    mut retry: Retry,
) {
    // A held delivery now: it takes a slot (free: nothing else was in flight).
    if retry.job._permit.is_none() {
        retry.job._permit = pending.clone().try_acquire_owned().ok();
    }
    let key = retry.job.delivery.event().key_bytes().cloned();
    if let Some(k) = &key {
        lock(&ctx.lanes).insert(k.clone(), VecDeque::new());
    }
    let resume = Some((retry.attempt, retry.delay));
    tasks.spawn(run_lane(ctx.clone(), key, retry.job, resume));
}

/// Handles `job` (from a retry wait with `resume`), then what queued behind it for the same
/// key, in order.
async fn run_lane<P: Publisher>(
    ctx: Arc<Ctx<P>>,
    key: Option<Bytes>,
    mut job: Job,
    mut resume: Option<(u32, Duration)>,
) {
    loop {
        // Not inline: `process` settles everything itself and hands nothing back.
        let _ = process(&ctx, job, resume.take(), false).await;
        let Some(k) = &key else { return };
        let mut lanes = lock(&ctx.lanes);
        match lanes.get_mut(k).and_then(VecDeque::pop_front) {
            Some(next) => job = next,
            None => {
                lanes.remove(k);
                return;
            }
        }
    }
}

impl<P: Publisher> Ctx<P> {
    fn cancelled(&self) -> bool {
        *self.cancel.borrow()
    }

    async fn wait_cancelled(&self) {
        let mut rx = self.cancel.clone();
        // An error means the app is gone: as good as cancelled.
        let _ = rx.wait_for(|c| *c).await;
    }

    fn report(&self, d: &Delivery, attempt: u32, settlement: Settlement) {
        if self.recording {
            crate::metrics::settled(&settlement);
        }
        if let Some(observer) = &self.observer {
            notify(observer, &Origin::of(d).report(attempt, settlement));
        }
    }
}

/// Runs the handler on one delivery and settles it: ack, retry (redelivery or in process),
/// dead letter, or release at a cancelled drain. With `resume` (the attempt that failed and
/// the delay) it first waits for an in-process retry.
///
/// `inline`: the run loop's own path at concurrency 1 with nothing else in flight. No
/// handler slot is taken (none can be busy), and an in-process retry is handed back as a
/// [`Retry`] instead of waited for here, so the run loop can give the key a lane and go on
/// with other keys meanwhile. Otherwise it always returns `None`.
///
/// Everything but the handler call and the ack is boxed where it happens (the rare paths):
/// this future is part of every lane's, which is moved when a lane starts, so its size is
/// paid per event.
async fn process<P: Publisher>(
    ctx: &Ctx<P>,
    // Kept whole, where it was passed (not moved into locals: each move of the delivery is a
    // copy of a few hundred bytes).
    mut job: Job,
    resume: Option<(u32, Duration)>,
    inline: bool,
) -> Option<Retry> {
    let (mut attempt, mut wait) = match resume {
        Some((attempt, delay)) => (attempt, Some(delay)),
        None => (job.delivery.delivery_count(), None),
    };
    let span = job.delivery.span().clone();
    loop {
        if let Some(delay) = wait.take() {
            let waited = Box::pin(async {
                tokio::select! {
                    () = tokio::time::sleep(delay) => true,
                    () = ctx.wait_cancelled() => false,
                }
            });
            if !waited.await {
                Box::pin(release(ctx, job.delivery, attempt)).await;
                return None;
            }
            attempt = attempt.saturating_add(1);
        }
        if ctx.cancelled() {
            Box::pin(release(ctx, job.delivery, attempt)).await;
            return None;
        }
        let (delivery, service) = (&mut job.delivery, job.service.as_mut());
        let Some(outcome) = call(ctx, delivery, service, attempt, &span, inline).await else {
            Box::pin(release(ctx, job.delivery, attempt)).await;
            return None;
        };
        if let Outcome::Ack = outcome {
            // Dropped first: not kept in this future's state across the ack.
            drop(outcome);
            // The delivery's own ack future, awaited here (not wrapped: one copy of it less).
            let origin = ctx.observer.as_ref().map(|_| Origin::of(&job.delivery));
            let result = job.delivery.ack().await;
            acked(ctx, result, origin, attempt);
            return None;
        }
        let (delivery, delay) =
            Box::pin(settle(ctx, job.delivery, attempt, outcome, &span)).await?;
        job = Job { delivery, ..job };
        if inline {
            return Some(Retry {
                job,
                attempt,
                delay,
            });
        }
        wait = Some(delay);
    }
}

/// Calls the route's service on `delivery` when a handler slot is free; a panic is a
/// failure. `None`: the drain was cancelled first (the delivery is to be released).
///
/// `inline`: no handler slot is taken (see [`process`]).
async fn call<P: Publisher>(
    ctx: &Ctx<P>,
    delivery: &mut Delivery,
    service: Option<&mut RouteSvc>,
    attempt: u32,
    span: &tracing::Span,
    inline: bool,
) -> Option<Outcome> {
    let _running = if inline {
        None
    } else {
        Some(ctx.running.acquire().await.ok()?)
    };
    if ctx.cancelled() {
        return None;
    }
    let Some(service) = service else {
        return Some(Outcome::Terminate(
            HandlerError::permanent(format!(
                "no route for type {} on {}",
                delivery.event().kind(),
                delivery.topic()
            ))
            .with_kind("unrouted"),
        ));
    };
    let _counted = Counted::new(&ctx.counters, |c| &c.running);
    // The delivery's event is lent to the handler (moved into the `Arc` its message shares,
    // an empty event in its place), not copied; it is put back below.
    let event = Arc::new(std::mem::replace(
        delivery.event_mut(),
        Event::new(Bytes::new()),
    ));
    let msg = Message::lent(event.clone(), delivery, attempt);
    let call = async move {
        match service {
            RouteSvc::Direct(f) => f(msg).await,
            RouteSvc::Layered(svc) => {
                let result = match svc.ready().await {
                    Ok(svc) => svc.call(msg).await,
                    Err(never) => match never {},
                };
                match result {
                    Ok(outcome) => outcome,
                    Err(never) => match never {},
                }
            }
        }
    };
    let call = AssertUnwindSafe(call).catch_unwind();
    // Entering a disabled span per poll costs more than the rest of a small handler's
    // bookkeeping.
    let call = if span.is_disabled() {
        futures_util::future::Either::Left(call)
    } else {
        futures_util::future::Either::Right(call.instrument(span.clone()))
    };
    // No clock read without a metrics recorder.
    let started = ctx.recording.then(std::time::Instant::now);
    let outcome = tokio::select! {
        // The call first: a handler that is done at its first poll never sets up the wait
        // for a cancellation.
        biased;
        r = call => {
            if let Some(started) = started {
                crate::metrics::handler_call(started, r.is_err());
            }
            Some(r.unwrap_or_else(|panic| Outcome::Fail(HandlerError::panic(panic_message(&*panic)))))
        }
        () = ctx.wait_cancelled() => None,
    };
    // The event back into the delivery, unless it is only acked and nobody reads it then (an
    // observer's report does). A handler that kept a clone of its message gets a copy.
    if !matches!(outcome, Some(Outcome::Ack)) || ctx.observer.is_some() {
        *delivery.event_mut() = Arc::unwrap_or_clone(event);
    }
    outcome
}

/// Settles `delivery` by `outcome`: ack (after publishing), dead letter, or a retry by
/// `nack(delay)`. Returns the delivery and the delay when it is to be retried in process.
pub(crate) async fn settle<P: Publisher>(
    ctx: &Ctx<P>,
    delivery: Delivery,
    attempt: u32,
    outcome: Outcome,
    span: &tracing::Span,
) -> Option<(Delivery, Duration)> {
    let mut delivery = delivery;
    let (after, error) = match outcome {
        Outcome::Ack => {
            ack(ctx, delivery, attempt).await;
            return None;
        }
        // The publish and dead-letter paths are boxed: the backends' publish futures are
        // large, and inline they would make every lane's future as large (copied whenever a
        // lane starts), where most events are only acked.
        Outcome::Publish(out) => match Box::pin(publish_all(&*ctx.publisher, out)).await {
            Ok(()) => {
                ack(ctx, delivery, attempt).await;
                return None;
            }
            Err(e) => (None, HandlerError::transient(e).with_kind("publish")),
        },
        Outcome::Reply(reply) => match reply_to(&delivery, reply) {
            Ok(out) => match Box::pin(publish_all(&*ctx.publisher, vec![out])).await {
                Ok(()) => {
                    ack(ctx, delivery, attempt).await;
                    return None;
                }
                Err(e) => (None, HandlerError::transient(e).with_kind("publish")),
            },
            Err(e) => {
                Box::pin(dead_letter(ctx, delivery, attempt, &e)).await;
                return None;
            }
        },
        Outcome::Retry(after) => (
            after,
            HandlerError::transient("the handler asked for a retry").with_kind("retry"),
        ),
        Outcome::Fail(e) if !e.is_permanent() => (None, e),
        Outcome::Fail(e) | Outcome::Terminate(e) => {
            Box::pin(dead_letter(ctx, delivery, attempt, &e)).await;
            return None;
        }
    };
    if attempt >= ctx.retry.attempts() {
        Box::pin(dead_letter(ctx, delivery, attempt, &error)).await;
        return None;
    }
    let delay = after.unwrap_or_else(|| ctx.retry.delay(attempt));
    tracing::debug!(parent: span, attempt, ?delay, error = %error, "handler failed, retrying");
    if ctx.redeliver {
        ctx.report(
            &delivery,
            attempt,
            Settlement::Retrying {
                after: delay,
                in_process: false,
            },
        );
        match delivery.nack(delay).await {
            Ok(()) => return None,
            Err(e) if e.error().kind() == ErrorKind::Unsupported => {
                // The declaration said nack works; it did not: retry in process.
                delivery = e.into_delivery();
            }
            Err(e) => {
                let (error, delivery) = e.into_parts();
                tracing::warn!(error = %error, "nack failed; the backend redelivers or drops it");
                ctx.report(
                    &delivery,
                    attempt,
                    Settlement::SettleFailed {
                        error: error.to_string(),
                    },
                );
                return None;
            }
        }
    } else {
        ctx.report(
            &delivery,
            attempt,
            Settlement::Retrying {
                after: delay,
                in_process: true,
            },
        );
    }
    Some((delivery, delay))
}

/// Runs one batch: the handler once for all, then each event settled by its outcome; events
/// to retry in process come back as a smaller batch after the longest of their delays.
async fn run_batch<P: Publisher>(
    ctx: Arc<Ctx<P>>,
    handler: BatchFn,
    order: Arc<tokio::sync::Mutex<()>>,
    jobs: Vec<Job>,
) {
    // Batches of one route run one at a time, in the order they were started.
    let _order = order.lock_owned().await;
    let mut items: Vec<(Job, u32)> = jobs
        .into_iter()
        .map(|j| {
            let attempt = j.delivery.delivery_count();
            (j, attempt)
        })
        .collect();
    loop {
        if ctx.cancelled() {
            return release_all(&ctx, items).await;
        }
        let outcomes = {
            let Ok(_running) = ctx.running.acquire().await else {
                return release_all(&ctx, items).await;
            };
            if ctx.cancelled() {
                return release_all(&ctx, items).await;
            }
            let _counted = Counted::new(&ctx.counters, |c| &c.running);
            let batch: Vec<Message> = items
                .iter()
                .map(|(j, attempt)| Message::from_delivery(&j.delivery, *attempt))
                .collect();
            let len = batch.len();
            let call = AssertUnwindSafe(handler(batch)).catch_unwind();
            let started = ctx.recording.then(std::time::Instant::now);
            tokio::select! {
                r = call => {
                    if let Some(started) = started {
                        crate::metrics::handler_call(started, r.is_err());
                    }
                    r.unwrap_or_else(|panic| {
                        let message = panic_message(&*panic);
                        (0..len).map(|_| Outcome::Fail(HandlerError::panic(message.clone()))).collect()
                    })
                }
                () = ctx.wait_cancelled() => return release_all(&ctx, items).await,
            }
        };
        let mut outcomes = outcomes.into_iter();
        let mut again = Vec::new();
        let mut delay = Duration::ZERO;
        for (job, attempt) in items {
            let outcome = outcomes.next().unwrap_or_else(|| {
                Outcome::Fail(
                    HandlerError::transient("the batch handler returned no outcome for this event")
                        .with_kind("no outcome"),
                )
            });
            let Job {
                delivery,
                service,
                _permit,
                _held,
            } = job;
            let span = delivery.span().clone();
            if let Some((delivery, after)) = settle(&ctx, delivery, attempt, outcome, &span).await {
                delay = delay.max(after);
                let job = Job {
                    delivery,
                    service,
                    _permit,
                    _held,
                };
                again.push((job, attempt.saturating_add(1)));
            }
        }
        if again.is_empty() {
            return;
        }
        tokio::select! {
            () = tokio::time::sleep(delay) => {}
            () = ctx.wait_cancelled() => return release_all(&ctx, again).await,
        }
        items = again;
    }
}

async fn release_all<P: Publisher>(ctx: &Ctx<P>, items: Vec<(Job, u32)>) {
    for (job, attempt) in items {
        release(ctx, job.delivery, attempt).await;
    }
}

pub(crate) fn panic_message(panic: &(dyn std::any::Any + Send)) -> String {
    if let Some(s) = panic.downcast_ref::<&str>() {
        (*s).to_owned()
    } else if let Some(s) = panic.downcast_ref::<String>() {
        s.clone()
    } else {
        "non-string panic payload".to_owned()
    }
}

/// Publishes in order, a batch per run of events to the same topic.
async fn publish_all<P: Publisher>(publisher: &P, out: Vec<Outbound>) -> Result<()> {
    let mut batch: Vec<Event> = Vec::new();
    let mut topic = String::new();
    for o in out {
        let (t, ev) = o.into_parts();
        if t != topic && !batch.is_empty() {
            publisher
                .publish_batch(&topic, std::mem::take(&mut batch))
                .await?;
        }
        topic = t;
        batch.push(ev);
    }
    if !batch.is_empty() {
        publisher.publish_batch(&topic, batch).await?;
    }
    Ok(())
}

/// Where a [`Reply`](crate::Reply) to `delivery` goes: the broker's reply address when the
/// request came as one (a core NATS request: [`Delivery::reply_to`]), else its `x-reply-to`
/// topic, with the request's id as the correlation id; a permanent `unsupported` failure
/// without either.
fn reply_to(delivery: &Delivery, mut reply: Event) -> Result<Outbound, HandlerError> {
    let request = delivery.event();
    let Some(topic) = delivery
        .reply_to()
        .or_else(|| request.headers().get(crate::REPLY_TO))
    else {
        return Err(HandlerError::permanent(polybus_core::Error::unsupported(
            "polybus-runtime",
            format!(
                "the handler replied, but the event has no {} header to reply to",
                crate::REPLY_TO
            ),
        ))
        .with_kind(ErrorKind::Unsupported.as_str()));
    };
    if reply.headers().get(crate::CORRELATION_ID).is_none() {
        reply
            .headers_mut()
            .insert(crate::CORRELATION_ID, request.id())
            .map_err(HandlerError::permanent)?;
    }
    Ok(Outbound::new(topic, reply))
}

/// Acks `delivery` and reports it. Not an `async fn`: that would keep the delivery in its
/// Acks `delivery` and reports it. Not an `async fn`: that would keep the delivery in its
/// state next to the ack's own copy.
fn ack<'a, P: Publisher>(
    ctx: &'a Ctx<P>,
    delivery: Delivery,
    attempt: u32,
) -> impl Future<Output = ()> + Send + 'a {
    // The delivery is consumed by the ack: take what the report needs first.
    let origin = ctx.observer.as_ref().map(|_| Origin::of(&delivery));
    // A combinator, not an `async` block awaiting the ack: that would keep the ack future
    // twice in its state (the captured one and the awaited one).
    delivery
        .ack()
        .map(move |result| acked(ctx, result, origin, attempt))
}

/// Reports an ack's result (`origin`: what the observer's report needs, taken before).
fn acked<P: Publisher>(
    ctx: &Ctx<P>,
    result: std::result::Result<(), polybus_core::AckError>,
    origin: Option<Origin>,
    attempt: u32,
) {
    match result {
        Ok(()) => {
            if ctx.recording {
                crate::metrics::settled(&Settlement::Acked);
            }
            if let (Some(observer), Some(o)) = (&ctx.observer, origin) {
                notify(observer, &o.report(attempt, Settlement::Acked));
            }
        }
        Err(e) => {
            let (error, delivery) = e.into_parts();
            tracing::warn!(error = %error, "ack failed; the backend may redeliver");
            ctx.report(
                &delivery,
                attempt,
                Settlement::SettleFailed {
                    error: error.to_string(),
                },
            );
        }
    }
}

/// Calls the observer; a panic in it is logged, it must not break a lane.
fn notify(observer: &Observer, report: &Report) {
    if std::panic::catch_unwind(AssertUnwindSafe(|| observer(report))).is_err() {
        tracing::error!("the report observer panicked");
    }
}

/// What a report says about the delivery.
struct Origin {
    topic: String,
    id: String,
    key: Option<Bytes>,
}

impl Origin {
    fn of(d: &Delivery) -> Self {
        Origin {
            topic: d.topic().to_owned(),
            id: d.event().id().to_owned(),
            key: d.event().key_bytes().cloned(),
        }
    }
    fn report(self, attempt: u32, settlement: Settlement) -> Report {
        Report {
            topic: self.topic,
            id: self.id,
            key: self.key,
            attempt,
            settlement,
        }
    }
}

async fn dead_letter<P: Publisher>(
    ctx: &Ctx<P>,
    delivery: Delivery,
    attempt: u32,
    error: &HandlerError,
) {
    let naming = match &ctx.dead_letters {
        DeadLetters::Off => None,
        DeadLetters::SameBackend(n) | DeadLetters::To(n, _) => Some(n),
    };
    let Some(naming) = naming else {
        ctx.report(
            &delivery,
            attempt,
            Settlement::Terminated {
                kind: error.kind().to_owned(),
            },
        );
        return term(ctx, delivery, attempt).await;
    };
    let topic = naming.topic_for(delivery.topic());
    let message = error.to_string();
    let dead = DeadLetter::new(delivery.topic(), error.kind(), &message, attempt)
        .partition(delivery.partition())
        .offset(delivery.sequence())
        .apply(delivery.event().clone());
    // A dead letter keeps its event's id; where the dead-letter topic shares a stream with
    // the original (JetStream), that id is a duplicate and would be dropped: it is written
    // again under a fresh id (the old one in `x-original-id`).
    let written = match &ctx.dead_letters {
        DeadLetters::To(_, p) => crate::redrive::publish_renaming_duplicates(p, &topic, dead).await,
        _ => crate::redrive::publish_renaming_duplicates(&ctx.publisher, &topic, dead).await,
    };
    match written {
        Ok(_) => {
            tracing::warn!(
                topic = %delivery.topic(),
                id = %delivery.event().id(),
                dead_letter_topic = %topic,
                attempt,
                error = %message,
                "event dead-lettered"
            );
            ctx.report(
                &delivery,
                attempt,
                Settlement::DeadLettered {
                    topic,
                    kind: error.kind().to_owned(),
                },
            );
            term(ctx, delivery, attempt).await;
        }
        Err(e) => {
            tracing::error!(error = %e, dead_letter_topic = %topic, "writing a dead letter failed");
            ctx.report(
                &delivery,
                attempt,
                Settlement::SettleFailed {
                    error: e.to_string(),
                },
            );
            // Leave it to the backend: nack after the longest backoff where it can.
            if ctx.release_by_nack {
                let _ = delivery.nack(ctx.retry.nominal_delay(u32::MAX)).await;
            }
        }
    }
}

/// `term`, or `ack` where the backend has no `term`.
async fn term<P: Publisher>(ctx: &Ctx<P>, delivery: Delivery, attempt: u32) {
    let result = match delivery.term().await {
        Err(e) if e.error().kind() == ErrorKind::Unsupported => e.into_delivery().ack().await,
        other => other,
    };
    if let Err(e) = result {
        let (error, delivery) = e.into_parts();
        tracing::warn!(error = %error, "settling a dead letter's delivery failed");
        ctx.report(
            &delivery,
            attempt,
            Settlement::SettleFailed {
                error: error.to_string(),
            },
        );
    }
}

/// Hands an unfinished delivery back at a cancelled drain.
pub(crate) async fn release<P: Publisher>(ctx: &Ctx<P>, delivery: Delivery, attempt: u32) {
    ctx.report(&delivery, attempt, Settlement::Released);
    if ctx.release_by_nack {
        let _ = delivery.nack(Duration::ZERO).await;
    }
    // Otherwise dropped unsettled: the backend's `Capabilities::unsettled` says what follows.
}
