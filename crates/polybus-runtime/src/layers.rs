//! Middleware: tower layers around handlers.
//!
//! A route's handler is a `tower::Service<Message, Response = Outcome>`; any
//! [`tower::Layer`] whose service keeps that shape (its error may be anything that converts
//! into a `BoxError`; errors become [`Outcome::Fail`]) can wrap it, with
//! [`App::layer`](crate::App::layer) for every route or
//! [`Route::layer`](crate::Route::layer) for one. tower's own
//! [`TimeoutLayer`] and [`ConcurrencyLimitLayer`] are re-exported here; [`RetryLayer`] retries
//! inside the handler call; [`RateLimitLayer`] spaces handler calls out (tower's own rate
//! limit is not `Clone`, which a route's service must be). Deduplication by `source` + `id`
//! wraps the consumer rather than the handler: `polybus_compose::Dedup` is a `Consumer` that
//! records an event once its delivery is acked (after the handler succeeded) and skips later
//! copies, so `app.run(Dedup::new(consumer, store, DedupKey::Id, "billing"), publisher)` handles
//! each event once.
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
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll};
use std::time::Duration;

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

/// At most `n` handler calls per `per`, evenly spaced (a call waits for its slot before the
/// inner service runs). Clones share the limit, so one layer limits every route it wraps
/// together.
///
/// ```
/// use std::time::Duration;
/// use polybus_runtime::App;
/// use polybus_runtime::layers::RateLimitLayer;
/// async fn call_partner_api() {}
/// let app = App::new()
///     .route("partner.requests", call_partner_api)
///     .layer(RateLimitLayer::new(50, Duration::from_secs(1)));
/// # let _ = app;
/// ```
#[derive(Debug, Clone)]
pub struct RateLimitLayer {
    interval: Duration,
    next: Arc<Mutex<Option<tokio::time::Instant>>>,
}

impl RateLimitLayer {
    /// `n` calls (at least 1) per `per`.
    pub fn new(n: u32, per: Duration) -> Self {
        RateLimitLayer {
            interval: per / n.max(1),
            next: Arc::default(),
        }
    }

    /// Reserves the next slot; returns when it starts.
    fn reserve(&self) -> tokio::time::Instant {
        let mut next = self.next.lock().unwrap_or_else(|e| e.into_inner());
        let now = tokio::time::Instant::now();
        let at = next.map_or(now, |n| n.max(now));
        *next = Some(at + self.interval);
        at
    }
}

impl<S> Layer<S> for RateLimitLayer {
    type Service = RateLimit<S>;
    fn layer(&self, inner: S) -> RateLimit<S> {
        RateLimit {
            inner,
            limit: self.clone(),
        }
    }
}

/// The service of [`RateLimitLayer`].
#[derive(Debug, Clone)]
pub struct RateLimit<S> {
    inner: S,
    limit: RateLimitLayer,
}

impl<S> RateLimit<S> {
    /// The wrapped service.
    pub fn get_ref(&self) -> &S {
        &self.inner
    }
    /// Unwraps the service.
    pub fn into_inner(self) -> S {
        self.inner
    }
}

impl<S> Service<Message> for RateLimit<S>
where
    S: Service<Message, Response = Outcome> + Clone + Send + 'static,
    S::Future: Send,
    S::Error: Send,
{
    type Response = Outcome;
    type Error = S::Error;
    type Future = Pin<Box<dyn Future<Output = Result<Outcome, S::Error>> + Send>>;

    fn poll_ready(&mut self, _: &mut Context<'_>) -> Poll<Result<(), S::Error>> {
        // Readiness is checked on a clone once the slot has come.
        Poll::Ready(Ok(()))
    }

    fn call(&mut self, msg: Message) -> Self::Future {
        let at = self.limit.reserve();
        let inner = self.inner.clone();
        Box::pin(async move {
            tokio::time::sleep_until(at).await;
            inner.oneshot(msg).await
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
    async fn rate_limit_spaces_calls_out() {
        let times = Arc::new(std::sync::Mutex::new(Vec::new()));
        let t = times.clone();
        let handler = move || {
            t.lock().unwrap().push(tokio::time::Instant::now());
            async {}
        };
        let svc =
            RateLimitLayer::new(2, Duration::from_secs(1)).layer(HandlerService::new(handler, ()));
        let start = tokio::time::Instant::now();
        let calls: Vec<_> = (0..5)
            .map(|_| svc.clone().oneshot(Message::new("t", Event::new(b"x"))))
            .collect();
        for out in futures_util::future::join_all(calls).await {
            assert!(matches!(out.unwrap(), Outcome::Ack));
        }
        let offsets: Vec<Duration> = times.lock().unwrap().iter().map(|t| *t - start).collect();
        let expected: Vec<Duration> = (0..5).map(|i| Duration::from_millis(500 * i)).collect();
        assert_eq!(offsets, expected);
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
