//! Middleware: tower layers around handlers.
//!
//! A route's handler is a `tower::Service<Message, Response = Outcome>`; any
//! [`tower::Layer`] whose service keeps that shape (its error may be anything that converts
//! into a `BoxError`; errors become [`Outcome::Fail`]) can wrap it, with
//! [`App::layer`](crate::App::layer) for every route or
//! [`Route::layer`](crate::Route::layer) for one. tower's own
//! [`TimeoutLayer`] and [`ConcurrencyLimitLayer`] are re-exported here; [`RetryLayer`] retries
//! inside the handler call.
//!
//! ```
//! use std::time::Duration;
//! use polybus_runtime::layers::{ConcurrencyLimitLayer, RetryLayer, TimeoutLayer};
//! use polybus_runtime::{App, RetryPolicy};
//!
//! async fn handle() {}
//! let app = App::new()
//!     .route("orders", handle)
//!     // Outermost first: the limit, then the retry, then the timeout of each attempt.
//!     .layer(TimeoutLayer::new(Duration::from_secs(5)))
//!     .layer(RetryLayer::new(RetryPolicy::exponential(Duration::from_millis(10)).max_attempts(3)))
//!     .layer(ConcurrencyLimitLayer::new(4));
//! # let _ = app;
//! ```

use std::future::Future;
use std::pin::Pin;
use std::task::{Context, Poll};

use tower::{Layer, Service, ServiceExt as _};

pub use tower::limit::ConcurrencyLimitLayer;
pub use tower::timeout::TimeoutLayer;

use crate::{Message, Outcome, RetryPolicy};

/// Retries a failing handler inside one delivery: a transient [`Outcome::Fail`] or an
/// [`Outcome::Retry`] calls the inner service again after the policy's backoff, up to its
/// attempts; the last outcome is returned (and then goes through the app's own retry and
/// dead-letter rules). Use it for short hiccups (a flaky call); the app's
/// [`RetryPolicy`] is the one that spans redeliveries.
#[derive(Debug, Clone)]
pub struct RetryLayer {
    policy: RetryPolicy,
}

impl RetryLayer {
    /// Retries by `policy`.
    pub fn new(policy: RetryPolicy) -> Self {
        RetryLayer { policy }
    }
}

impl<S> Layer<S> for RetryLayer {
    type Service = Retry<S>;
    fn layer(&self, inner: S) -> Retry<S> {
        Retry {
            inner,
            policy: self.policy.clone(),
        }
    }
}

/// The service of [`RetryLayer`].
#[derive(Debug, Clone)]
pub struct Retry<S> {
    inner: S,
    policy: RetryPolicy,
}

impl<S> Retry<S> {
    /// The wrapped service.
    pub fn get_ref(&self) -> &S {
        &self.inner
    }
    /// Unwraps the service.
    pub fn into_inner(self) -> S {
        self.inner
    }
}

impl<S> Service<Message> for Retry<S>
where
    S: Service<Message, Response = Outcome> + Clone + Send + 'static,
    S::Future: Send,
    S::Error: Send,
{
    type Response = Outcome;
    type Error = S::Error;
    type Future = Pin<Box<dyn Future<Output = Result<Outcome, S::Error>> + Send>>;

    fn poll_ready(&mut self, _: &mut Context<'_>) -> Poll<Result<(), S::Error>> {
        // Readiness is checked per attempt on a clone.
        Poll::Ready(Ok(()))
    }

    fn call(&mut self, msg: Message) -> Self::Future {
        let inner = self.inner.clone();
        let policy = self.policy.clone();
        Box::pin(async move {
            let mut attempt = 1;
            loop {
                let outcome = inner.clone().oneshot(msg.clone()).await?;
                let retry_after = match &outcome {
                    Outcome::Fail(e) if !e.is_permanent() => None,
                    Outcome::Retry(after) => *after,
                    _ => return Ok(outcome),
                };
                if attempt >= policy.attempts() {
                    return Ok(outcome);
                }
                tokio::time::sleep(retry_after.unwrap_or_else(|| policy.delay(attempt))).await;
                attempt += 1;
            }
        })
    }
}

#[cfg(test)]
mod tests {
    use std::sync::Arc;
    use std::sync::atomic::{AtomicU32, Ordering};
    use std::time::Duration;

    use polybus_core::Event;
    use tower::ServiceExt as _;

    use super::*;
    use crate::{HandlerError, HandlerService};

    #[tokio::test(start_paused = true)]
    async fn retry_layer_calls_again_with_backoff_until_success() {
        let calls = Arc::new(AtomicU32::new(0));
        let c = calls.clone();
        let handler = move || {
            let n = c.fetch_add(1, Ordering::SeqCst) + 1;
            async move {
                if n < 3 {
                    Err(HandlerError::transient("flaky"))
                } else {
                    Ok(())
                }
            }
        };
        let policy = RetryPolicy::exponential(Duration::from_millis(100)).jitter(0.0);
        let svc = RetryLayer::new(policy).layer(HandlerService::new(handler, ()));
        let start = tokio::time::Instant::now();
        let out = svc
            .oneshot(Message::new("t", Event::new(b"x")))
            .await
            .unwrap();
        assert!(matches!(out, Outcome::Ack));
        assert_eq!(calls.load(Ordering::SeqCst), 3);
        // 100 ms after the first failure, 200 ms after the second.
        assert_eq!(start.elapsed(), Duration::from_millis(300));
    }

    #[tokio::test(start_paused = true)]
    async fn retry_layer_returns_permanent_failures_at_once() {
        let calls = Arc::new(AtomicU32::new(0));
        let c = calls.clone();
        let handler = move || {
            c.fetch_add(1, Ordering::SeqCst);
            async { Err::<(), _>(HandlerError::permanent("bad")) }
        };
        let svc = RetryLayer::new(RetryPolicy::default()).layer(HandlerService::new(handler, ()));
        let out = svc
            .oneshot(Message::new("t", Event::new(b"x")))
            .await
            .unwrap();
        assert!(matches!(out, Outcome::Fail(e) if e.is_permanent()));
        assert_eq!(calls.load(Ordering::SeqCst), 1);
    }
}
