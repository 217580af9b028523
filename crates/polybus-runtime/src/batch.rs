//! Batch routes: a handler that takes up to `max` events at once, or what arrived within
//! `max_wait`, and returns an outcome per event.

use std::future::Future;
use std::sync::Arc;
use std::time::Duration;

use futures_util::future::BoxFuture;

use crate::{HandlerError, Message, Outcome, State};

/// How a batch route collects events: up to [`max`](Self::max) events, or what arrived within
/// [`max_wait`](Self::max_wait) of the first one.
///
/// ```
/// use std::time::Duration;
/// use polybus_runtime::Batch;
/// let b = Batch::new(100, Duration::from_millis(50));
/// assert_eq!((b.max(), b.max_wait()), (100, Duration::from_millis(50)));
/// assert_eq!(Batch::new(0, Duration::ZERO).max(), 1);
/// ```
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Batch {
    max: usize,
    max_wait: Duration,
}

impl Batch {
    /// Up to `max` events (at least 1, at most 65 536), or what arrived within `max_wait`.
    pub fn new(max: usize, max_wait: Duration) -> Self {
        Batch {
            max: max.clamp(1, 65_536),
            max_wait,
        }
    }
    /// The largest batch.
    pub fn max(&self) -> usize {
        self.max
    }
    /// How long the first event of a batch waits for others.
    pub fn max_wait(&self) -> Duration {
        self.max_wait
    }
}

/// What a batch handler returns: one [`Outcome`] per event, in the order of the batch.
/// Missing outcomes count as transient failures; extra ones are ignored. An `Err` applies to
/// every event of the batch.
pub trait IntoBatchOutcomes {
    /// The outcomes.
    fn into_outcomes(self, len: usize) -> Vec<Outcome>;
}

impl IntoBatchOutcomes for Vec<Outcome> {
    fn into_outcomes(self, _: usize) -> Vec<Outcome> {
        self
    }
}

impl<E: Into<HandlerError>> IntoBatchOutcomes for Result<Vec<Outcome>, E> {
    fn into_outcomes(self, len: usize) -> Vec<Outcome> {
        match self {
            Ok(v) => v,
            Err(e) => {
                let e: HandlerError = e.into();
                (0..len).map(|_| Outcome::Fail(e.duplicate())).collect()
            }
        }
    }
}

/// An async function taking the batch's [`Message`]s and the app state, returning
/// [`IntoBatchOutcomes`]. You do not implement it.
///
/// ```
/// use std::time::Duration;
/// use polybus_runtime::{App, Batch, Message, Outcome, State};
///
/// async fn store(batch: Vec<Message>, State(_db): State<()>) -> Vec<Outcome> {
///     // One round trip for the whole batch, then an outcome per event.
///     batch.iter().map(|_| Outcome::Ack).collect()
/// }
/// let app = App::new().batch_route("metrics", Batch::new(500, Duration::from_millis(20)), store);
/// # let _ = app;
/// ```
pub trait BatchHandler<S>: Clone + Send + Sync + 'static {
    /// Runs the handler.
    fn call(self, batch: Vec<Message>, state: S) -> BoxFuture<'static, Vec<Outcome>>;
}

impl<F, Fut, S> BatchHandler<S> for F
where
    F: FnOnce(Vec<Message>, State<S>) -> Fut + Clone + Send + Sync + 'static,
    Fut: Future + Send + 'static,
    Fut::Output: IntoBatchOutcomes,
{
    fn call(self, batch: Vec<Message>, state: S) -> BoxFuture<'static, Vec<Outcome>> {
        let len = batch.len();
        let fut = self(batch, State(state));
        Box::pin(async move { fut.await.into_outcomes(len) })
    }
}

/// A batch handler bound to its state.
pub(crate) type BatchFn =
    Arc<dyn Fn(Vec<Message>) -> BoxFuture<'static, Vec<Outcome>> + Send + Sync>;

pub(crate) fn bind<H, S>(handler: H, state: S) -> BatchFn
where
    H: BatchHandler<S>,
    S: Clone + Send + Sync + 'static,
{
    Arc::new(move |batch| handler.clone().call(batch, state.clone()))
}
