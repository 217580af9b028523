//! Testing an app in process: the same [`App`] on a [`MemoryBroker`], with every settlement
//! recorded and every publish of the app kept.

use std::sync::{Arc, Mutex};
use std::time::Duration;

use polybus_core::{
    Error, ErrorKind, Event, MemoryBroker, MemoryPublisher, Publisher, Receipt, Result,
};
use tokio::sync::{Notify, oneshot};
use tokio::task::JoinHandle;

use crate::{App, Health, Report, Status};

#[derive(Default)]
struct Recorded {
    reports: Mutex<Vec<Report>>,
    published: Mutex<Vec<(String, Event)>>,
    changed: Notify,
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

/// A [`MemoryPublisher`] that keeps what it published (the app's publisher in a
/// [`TestApp`]).
#[derive(Debug, Clone)]
struct RecordingPublisher {
    inner: MemoryPublisher,
    recorded: Arc<Recorded>,
}

impl Publisher for RecordingPublisher {
    async fn publish(&self, topic: &str, event: Event) -> Result<Receipt> {
        let copy = event.clone();
        let receipt = self.inner.publish(topic, event).await?;
        lock(&self.recorded.published).push((topic.to_owned(), copy));
        self.recorded.changed.notify_waiters();
        Ok(receipt)
    }
    async fn flush(&self) -> Result<()> {
        self.inner.flush().await
    }
    async fn close(&self) -> Result<()> {
        self.inner.close().await
    }
}

impl std::fmt::Debug for Recorded {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Recorded")
    }
}

/// An [`App`] running on a [`MemoryBroker`] in this process, for tests: publish to it, wait
/// for the settlements it reports, look at what it published and dead-lettered. Under
/// `#[tokio::test(start_paused = true)]` retry delays pass in virtual time.
///
/// ```
/// use polybus_core::Event;
/// use polybus_runtime::{App, HandlerError, RetryPolicy, Settlement, TestApp};
/// use std::time::Duration;
///
/// async fn always_fails() -> Result<(), HandlerError> {
///     Err(HandlerError::transient("database down"))
/// }
///
/// # #[tokio::main(flavor = "current_thread", start_paused = true)]
/// # async fn main() -> anyhow::Result<()> {
/// let app = App::new()
///     .route("orders", always_fails)
///     .retry(RetryPolicy::exponential(Duration::from_secs(1)).max_attempts(3).jitter(0.0));
/// let mut t = TestApp::start(app).await?;
/// let ev = Event::new(b"{}");
/// let id = ev.id().to_owned();
/// t.publish("orders", ev).await?;
/// let last = t.settled(&id).await?;
/// assert!(matches!(last.settlement(), Settlement::DeadLettered { .. }));
/// assert_eq!(last.attempt(), 3);
/// assert_eq!(t.dead_letters("orders").len(), 1);
/// t.stop().await?;
/// # Ok(()) }
/// ```
#[derive(Debug)]
pub struct TestApp {
    broker: MemoryBroker,
    recorded: Arc<Recorded>,
    dead_letter_topic: Option<String>,
    stop: Option<oneshot::Sender<()>>,
    task: Option<JoinHandle<Result<()>>>,
    timeout: Duration,
    health: Health,
}

/// The consumer group the app joins in a [`TestApp`].
pub const TEST_GROUP: &str = "polybus-test-app";

impl TestApp {
    /// Runs `app` on a new [`MemoryBroker`]; resolves once it is subscribed.
    ///
    /// # Errors
    /// The app stopped before it subscribed (an invalid topic).
    pub async fn start<S: Clone + Send + Sync + 'static>(app: App<S>) -> Result<TestApp> {
        TestApp::start_on(app, MemoryBroker::new()).await
    }

    /// Runs `app` on `broker` (to share it with other apps or consumers).
    ///
    /// # Errors
    /// As [`start`](Self::start).
    pub async fn start_on<S: Clone + Send + Sync + 'static>(
        app: App<S>,
        broker: MemoryBroker,
    ) -> Result<TestApp> {
        let recorded = Arc::new(Recorded::default());
        let rec = recorded.clone();
        // Dead-letter topics are per source topic; remember the naming through a probe.
        let dead_letter_topic = app.dead_letter_topic_for("\u{0}");
        let app = app.on_report(move |r| {
            lock(&rec.reports).push(r.clone());
            rec.changed.notify_waiters();
        });
        let mut status = app.status();
        let health = app.health();
        let (stop, stopped) = oneshot::channel::<()>();
        let publisher = RecordingPublisher {
            inner: broker.publisher(),
            recorded: recorded.clone(),
        };
        let task =
            tokio::spawn(
                app.run_until(broker.consumer_group(TEST_GROUP), publisher, async move {
                    let _ = stopped.await;
                }),
            );
        let running = status
            .wait_for(|s| matches!(s, Status::Running | Status::Stopped))
            .await
            .map(|s| *s);
        let t = TestApp {
            broker,
            recorded,
            dead_letter_topic,
            stop: Some(stop),
            task: Some(task),
            timeout: Duration::from_secs(60),
            health,
        };
        match running {
            Ok(Status::Running) => Ok(t),
            _ => {
                let mut t = t;
                match t.stop().await {
                    Err(e) => Err(e),
                    Ok(()) => Err(Error::new(ErrorKind::Closed, "runtime")
                        .with_message("the app stopped before it subscribed")),
                }
            }
        }
    }

    /// Sets how long the waits wait before failing with [`ErrorKind::Timeout`] (default
    /// 60 s; virtual under paused time).
    pub fn with_timeout(mut self, timeout: Duration) -> Self {
        self.timeout = timeout;
        self
    }

    /// The app's [`Health`].
    pub fn health(&self) -> &Health {
        &self.health
    }

    /// The broker the app runs on.
    pub fn broker(&self) -> &MemoryBroker {
        &self.broker
    }

    /// Publishes `event` to `topic` (from outside the app: not recorded as the app's).
    ///
    /// # Errors
    /// As [`Publisher::publish`].
    pub async fn publish(&self, topic: &str, event: Event) -> Result<Receipt> {
        self.broker.publisher().publish(topic, event).await
    }

    /// Waits until `done` holds for the reports so far; returns them.
    ///
    /// # Errors
    /// [`ErrorKind::Timeout`] when it does not hold within the timeout.
    pub async fn wait_until(&self, mut done: impl FnMut(&[Report]) -> bool) -> Result<Vec<Report>> {
        let wait = async {
            loop {
                let changed = self.recorded.changed.notified();
                let mut changed = std::pin::pin!(changed);
                changed.as_mut().enable();
                {
                    let reports = lock(&self.recorded.reports);
                    if done(&reports) {
                        return reports.clone();
                    }
                }
                changed.await;
            }
        };
        tokio::time::timeout(self.timeout, wait).await.map_err(|_| {
            Error::new(ErrorKind::Timeout, "runtime")
                .with_message("the app did not report what the test waited for")
        })
    }

    /// Waits for the terminal settlement (acked, dead-lettered, terminated) of the event
    /// `id`.
    ///
    /// # Errors
    /// [`ErrorKind::Timeout`] as [`wait_until`](Self::wait_until).
    pub async fn settled(&self, id: &str) -> Result<Report> {
        let reports = self
            .wait_until(|rs| {
                rs.iter()
                    .any(|r| r.id() == id && r.settlement().is_terminal())
            })
            .await?;
        reports
            .into_iter()
            .find(|r| r.id() == id && r.settlement().is_terminal())
            .ok_or_else(|| Error::new(ErrorKind::NotFound, "runtime"))
    }

    /// Every report so far.
    pub fn reports(&self) -> Vec<Report> {
        lock(&self.recorded.reports).clone()
    }

    /// The reports about the event `id`, in order.
    pub fn reports_for(&self, id: &str) -> Vec<Report> {
        lock(&self.recorded.reports)
            .iter()
            .filter(|r| r.id() == id)
            .cloned()
            .collect()
    }

    /// What the app published to `topic` (handler outcomes and dead letters), in order.
    pub fn published(&self, topic: &str) -> Vec<Event> {
        lock(&self.recorded.published)
            .iter()
            .filter(|(t, _)| t == topic)
            .map(|(_, e)| e.clone())
            .collect()
    }

    /// The dead letters the app wrote for events of `topic`.
    pub fn dead_letters(&self, topic: &str) -> Vec<Event> {
        let Some(naming) = &self.dead_letter_topic else {
            return Vec::new();
        };
        // `naming` is the dead-letter topic of the probe topic "\0": a suffix or a fixed name.
        let dlq = match naming.strip_prefix('\u{0}') {
            Some(suffix) => format!("{topic}{suffix}"),
            None => naming.clone(),
        };
        self.published(&dlq)
    }

    /// Stops the app (drain, flush, close) and returns what `run_until` returned. The
    /// reports and publishes stay readable; stopping again returns `Ok`.
    ///
    /// # Errors
    /// The app's error, or [`ErrorKind::Other`] if its task panicked.
    pub async fn stop(&mut self) -> Result<()> {
        if let Some(stop) = self.stop.take() {
            let _ = stop.send(());
        }
        match self.task.take() {
            None => Ok(()),
            Some(task) => match task.await {
                Ok(r) => r,
                Err(e) => Err(Error::new(ErrorKind::Other, "runtime").with_source(e)),
            },
        }
    }
}
