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

/// Waits up to `timeout` until `path` answers 200 on every address in `addrs`
/// (each worker's router has learnt the routes from its heartbeat).
pub async fn wait_ready(addrs: &[String], path: &str, timeout: Duration) {
    wait_for(timeout, "ready routes on every worker", || async move {
        for addr in addrs {
            let ready = crate::http_call(addr, "GET", path, &[], b"")
                .await
                .map_err(|e| e.to_string())?;
            if ready.status != 200 {
                return Err(format!("{addr}{path}: {}", ready.status));
            }
        }
        Ok(())
    })
    .await;
}
