//! A polybus-runtime app on the backend a URL names: JSON orders in, invoices out, a flaky
//! dependency retried with backoff, poison orders dead-lettered, up to 8 orders at once in
//! per-customer order, a graceful stop. Runs in process by default; point it at a broker with
//! `POLYBUS_RUNTIME_URL` (for example `nats://127.0.0.1:4222?jetstream=true&group=billing`, or
//! `kafka://127.0.0.1:9092?group=billing`, see `polybus::connect`).

use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use polybus::runtime::layers::TimeoutLayer;
use polybus::runtime::{App, Attempt, HandlerError, Json, Key, Outbound, RetryPolicy, State};
use polybus::{Event, Publisher};

#[derive(serde::Deserialize)]
struct Order {
    id: u64,
    amount: u64,
}

#[derive(Clone)]
struct Billing {
    max_amount: u64,
}

async fn on_order(
    Json(order): Json<Order>,
    Key(customer): Key,
    Attempt(attempt): Attempt,
    State(billing): State<Billing>,
) -> Result<Outbound, HandlerError> {
    if order.amount > billing.max_amount {
        // Retrying will not help: straight to the dead-letter topic.
        return Err(HandlerError::permanent(format!(
            "order {} over the limit",
            order.id
        )));
    }
    if order.id % 5 == 0 && attempt == 1 {
        // A flaky dependency: retried after the policy's backoff.
        return Err(HandlerError::transient("tax service timed out"));
    }
    let customer = String::from_utf8_lossy(customer.as_deref().unwrap_or_default()).into_owned();
    let invoice = Event::builder()
        .key(customer)
        .data(format!(
            r#"{{"order":{},"total":{}}}"#,
            order.id, order.amount
        ))
        .content_type("application/json")
        .build()?;
    Ok(Outbound::new("invoices", invoice))
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let url =
        std::env::var("POLYBUS_RUNTIME_URL").unwrap_or_else(|_| "memory://?group=billing".into());
    let (publisher, consumer) = polybus::connect(&url).await?;

    let settled = Arc::new(AtomicUsize::new(0));
    let all_settled = Arc::new(tokio::sync::Notify::new());
    let (count, notify) = (settled.clone(), all_settled.clone());
    let app = App::with_state(Billing { max_amount: 1000 })
        .route("orders", on_order)
        .layer(TimeoutLayer::new(Duration::from_secs(5)))
        .retry(RetryPolicy::exponential(Duration::from_millis(200)).max_attempts(4))
        .concurrency(8)
        .on_report(move |r| {
            let id = r.id();
            let short = &id[id.len().saturating_sub(6)..];
            println!("{short} attempt {} {:?}", r.attempt(), r.settlement());
            if r.settlement().is_terminal() && count.fetch_add(1, Ordering::SeqCst) + 1 == 20 {
                notify.notify_one();
            }
        });
    let mut status = app.status();
    // Stop on SIGTERM/Ctrl-C, or once the 20 orders are settled.
    let stop = async move {
        tokio::select! {
            () = polybus::runtime::shutdown_signal() => {}
            () = all_settled.notified() => {}
        }
    };
    let running = tokio::spawn(app.run_until(consumer, publisher.clone(), stop));
    status
        .wait_for(|s| *s == polybus::runtime::Status::Running)
        .await?;

    for id in 1..=20u64 {
        let amount = if id == 13 { 5000 } else { id * 10 };
        let order = Event::builder()
            .key(format!("customer-{}", id % 4))
            .data(format!(r#"{{"id":{id},"amount":{amount}}}"#))
            .content_type("application/json")
            .build()?;
        publisher.publish("orders", order).await?;
    }
    running.await??;
    println!(
        "{} orders settled; order 13 is in orders.dlq",
        settled.load(Ordering::SeqCst)
    );
    Ok(())
}
