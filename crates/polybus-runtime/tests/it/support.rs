//! Shared helpers: a report recorder for apps that run outside `TestApp`.

use std::sync::{Arc, Mutex};
use std::time::Duration;

use polybus_runtime::Report;
use tokio::sync::Notify;

/// Records an app's reports; `wait_until` awaits a condition on them.
#[derive(Clone, Default)]
pub(crate) struct Recorder {
    reports: Arc<Mutex<Vec<(tokio::time::Instant, Report)>>>,
    changed: Arc<Notify>,
}

impl Recorder {
    /// The observer to hand to `App::on_report`.
    pub(crate) fn observer(&self) -> impl Fn(&Report) + Send + Sync + 'static {
        let this = self.clone();
        move |r| {
            this.reports
                .lock()
                .unwrap()
                .push((tokio::time::Instant::now(), r.clone()));
            this.changed.notify_waiters();
        }
    }

    pub(crate) fn snapshot(&self) -> Vec<(tokio::time::Instant, Report)> {
        self.reports.lock().unwrap().clone()
    }

    /// Waits until `done` holds, or fails the test after `timeout`.
    pub(crate) async fn wait_until(
        &self,
        timeout: Duration,
        what: &str,
        mut done: impl FnMut(&[(tokio::time::Instant, Report)]) -> bool,
    ) -> Vec<(tokio::time::Instant, Report)> {
        let wait = async {
            loop {
                let changed = self.changed.notified();
                let mut changed = std::pin::pin!(changed);
                changed.as_mut().enable();
                {
                    let reports = self.reports.lock().unwrap();
                    if done(&reports) {
                        return reports.clone();
                    }
                }
                changed.await;
            }
        };
        match tokio::time::timeout(timeout, wait).await {
            Ok(r) => r,
            Err(_) => panic!(
                "timed out waiting for {what}; reports: {:#?}",
                self.snapshot()
                    .iter()
                    .map(|(_, r)| (r.id().to_owned(), r.attempt(), r.settlement().clone()))
                    .collect::<Vec<_>>()
            ),
        }
    }
}
