//! Async functions as handlers, and the tower [`Service`] a handler becomes.

use std::convert::Infallible;
use std::future::Future;
use std::marker::PhantomData;
use std::pin::Pin;
use std::task::{Context, Poll};

use futures_util::future::BoxFuture;
use polybus_core::BoxError;
use tower::Service;

use crate::{FromMessage, HandlerError, IntoOutcome, Message, Outcome};

/// An async function whose arguments are [`FromMessage`] extractors and whose result is
/// [`IntoOutcome`]. Implemented for functions of up to 8 arguments; you do not implement it.
///
/// ```
/// use polybus_core::Event;
/// use polybus_runtime::{Json, Key, Outbound};
///
/// #[derive(serde::Deserialize)]
/// struct Order { id: u64 }
///
/// async fn on_order(Json(order): Json<Order>, Key(key): Key) -> anyhow::Result<Outbound> {
///     anyhow::ensure!(key.is_some(), "orders are keyed by customer");
///     Ok(Outbound::new("invoices", Event::new(format!("{{\"order\":{}}}", order.id))))
/// }
/// let app = polybus_runtime::App::new().route("orders", on_order);
/// # let _ = app;
/// ```
#[diagnostic::on_unimplemented(
    note = "a handler is an `async fn` whose arguments implement `FromMessage<S>` (Event, Json<T>, Headers, Key, Data, Topic, Attempt, State<S>, Message) and whose output implements `IntoOutcome` ((), Outcome, Outbound, Vec<Outbound>, Option<T>, Result<T, E>)"
)]
pub trait Handler<T, S>: Clone + Send + Sync + 'static {
    /// Runs the handler.
    fn call(self, msg: Message, state: S) -> BoxFuture<'static, Outcome>;
}

macro_rules! impl_handler {
    ($($t:ident),*) => {
        #[allow(non_snake_case, unused_variables)]
        impl<F, Fut, S, $($t,)*> Handler<($($t,)*), S> for F
        where
            F: FnOnce($($t),*) -> Fut + Clone + Send + Sync + 'static,
            Fut: Future + Send + 'static,
            Fut::Output: IntoOutcome,
            S: Send + Sync + 'static,
            $($t: FromMessage<S> + Send + 'static,)*
        {
            fn call(self, msg: Message, state: S) -> BoxFuture<'static, Outcome> {
                $(
                    let $t = match $t::from_message(&msg, &state) {
                        Ok(v) => v,
                        Err(e) => return Box::pin(std::future::ready(Outcome::Terminate(e))),
                    };
                )*
                let fut = (self)($($t),*);
                Box::pin(async move { fut.await.into_outcome() })
            }
        }
    };
}

impl_handler!();
impl_handler!(T1);
impl_handler!(T1, T2);
impl_handler!(T1, T2, T3);
impl_handler!(T1, T2, T3, T4);
impl_handler!(T1, T2, T3, T4, T5);
impl_handler!(T1, T2, T3, T4, T5, T6);
impl_handler!(T1, T2, T3, T4, T5, T6, T7);
impl_handler!(T1, T2, T3, T4, T5, T6, T7, T8);

/// A [`Handler`] with its state, as a tower [`Service`] (what layers wrap).
pub struct HandlerService<H, T, S> {
    handler: H,
    state: S,
    _args: PhantomData<fn() -> T>,
}

impl<H, T, S> HandlerService<H, T, S> {
    /// `handler` called with `state`.
    pub fn new(handler: H, state: S) -> Self {
        HandlerService {
            handler,
            state,
            _args: PhantomData,
        }
    }
}

impl<H: Clone, T, S: Clone> Clone for HandlerService<H, T, S> {
    fn clone(&self) -> Self {
        HandlerService::new(self.handler.clone(), self.state.clone())
    }
}

impl<H, T, S> std::fmt::Debug for HandlerService<H, T, S> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("HandlerService")
    }
}

impl<H, T, S> Service<Message> for HandlerService<H, T, S>
where
    H: Handler<T, S>,
    S: Clone + Send + Sync + 'static,
{
    type Response = Outcome;
    type Error = Infallible;
    type Future = futures_util::future::Map<
        BoxFuture<'static, Outcome>,
        fn(Outcome) -> Result<Outcome, Infallible>,
    >;

    fn poll_ready(&mut self, _: &mut Context<'_>) -> Poll<Result<(), Infallible>> {
        Poll::Ready(Ok(()))
    }

    fn call(&mut self, msg: Message) -> Self::Future {
        use futures_util::FutureExt as _;
        self.handler
            .clone()
            .call(msg, self.state.clone())
            .map(Ok as fn(Outcome) -> Result<Outcome, Infallible>)
    }
}

/// Turns a layered service's errors (a timeout layer's `Elapsed`, a limit's error) into
/// [`Outcome::Fail`], so every route is a `Service<Message, Response = Outcome, Error =
/// Infallible>`.
pub(crate) struct ErrorsAsFailures<S> {
    inner: S,
    /// A readiness error, reported by the next `call` as that event's failure.
    not_ready: Option<BoxError>,
}

impl<S> ErrorsAsFailures<S> {
    pub(crate) fn new(inner: S) -> Self {
        ErrorsAsFailures {
            inner,
            not_ready: None,
        }
    }
}

impl<S: Clone> Clone for ErrorsAsFailures<S> {
    fn clone(&self) -> Self {
        ErrorsAsFailures::new(self.inner.clone())
    }
}

impl<S> Service<Message> for ErrorsAsFailures<S>
where
    S: Service<Message, Response = Outcome>,
    S::Error: Into<BoxError>,
    S::Future: Send + 'static,
{
    type Response = Outcome;
    type Error = Infallible;
    type Future = Pin<Box<dyn Future<Output = Result<Outcome, Infallible>> + Send>>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Infallible>> {
        match self.inner.poll_ready(cx) {
            Poll::Pending => Poll::Pending,
            Poll::Ready(Ok(())) => Poll::Ready(Ok(())),
            Poll::Ready(Err(e)) => {
                self.not_ready = Some(e.into());
                Poll::Ready(Ok(()))
            }
        }
    }

    fn call(&mut self, msg: Message) -> Self::Future {
        if let Some(e) = self.not_ready.take() {
            return Box::pin(std::future::ready(Ok(Outcome::Fail(
                HandlerError::classify(e),
            ))));
        }
        let fut = self.inner.call(msg);
        Box::pin(async move {
            Ok(match fut.await {
                Ok(outcome) => outcome,
                Err(e) => Outcome::Fail(HandlerError::classify(e.into())),
            })
        })
    }
}
