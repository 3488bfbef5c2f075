//! [`wait_for`]: the bounded polling loop behind every wait of the tests.

use std::future::Future;
use std::time::{Duration, Instant};

/// Pause between two probes of a condition.
pub const POLL_INTERVAL: Duration = Duration::from_millis(50);

/// Probes until `probe` returns `Ok`, every [`POLL_INTERVAL`], for at most `timeout`;
/// then panics naming `what` and the last `Err` the probe gave, which should say
/// what it saw instead.
pub async fn wait_for<T, F, Fut>(timeout: Duration, what: &str, mut probe: F) -> T
where
    F: FnMut() -> Fut,
    Fut: Future<Output = Result<T, String>>,
{
    let started = Instant::now();
    let mut last = String::from("no probe finished");
    loop {
        let remaining = timeout.saturating_sub(started.elapsed());
        // A probe that hangs must not stretch the wait past its bound.
        match tokio::time::timeout(remaining.max(POLL_INTERVAL), probe()).await {
            Ok(Ok(value)) => return value,
            Ok(Err(seen)) => last = seen,
            Err(_) => last = format!("the last probe did not finish ({last})"),
        }
        if started.elapsed() >= timeout {
            panic!("timed out after {timeout:?} waiting for {what}; last seen: {last}");
        }
        tokio::time::sleep(POLL_INTERVAL).await;
    }
}
