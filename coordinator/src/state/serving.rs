//! Serving windows: what each deployment served of each model version over each
//! telemetry window (requests, errors, latency histogram, ground truth), summed
//! over the cluster by the leader. Kept per deployment in arrival order, the
//! newest `keep_windows` of them; the request rates, latency quantiles and live
//! accuracy of `kiln deployments`, the dashboard and the canary verdicts read them.

use kiln_proto::v1::{RecordServing, ServingWindow};
use prost::Message;

use super::keys;
use super::machine::{bump_counter, read_counter, Rejection, StateRead, Txn};
use crate::raft::storage::StoreError;

/// Most windows kept per deployment, whatever the proposer asks.
pub const MAX_KEEP_WINDOWS: u32 = 100_000;
/// Most windows one command carries.
pub const MAX_WINDOWS_PER_RECORD: usize = 4_096;

/// Records closed serving windows.
pub fn apply_record(
    txn: &mut Txn<'_>,
    record: &RecordServing,
) -> Result<Result<u64, Rejection>, StoreError> {
    if record.windows.len() > MAX_WINDOWS_PER_RECORD {
        return Ok(Err(format!(
            "record_serving carries {} windows, at most {MAX_WINDOWS_PER_RECORD}",
            record.windows.len()
        )));
    }
    if let Some(bad) = record
        .windows
        .iter()
        .find(|w| w.deployment.is_empty() || w.end_ms <= w.start_ms)
    {
        return Ok(Err(format!(
            "serving window of deployment {:?} from {} to {} ms is not a window",
            bad.deployment, bad.start_ms, bad.end_ms
        )));
    }
    let keep = u64::from(record.keep_windows.clamp(1, MAX_KEEP_WINDOWS));
    for window in &record.windows {
        let seq = bump_counter(txn, &keys::serving_seq(&window.deployment))?;
        txn.put(
            keys::serving_window(&window.deployment, seq),
            window.encode_to_vec(),
        );
        if seq > keep {
            txn.delete(keys::serving_window(&window.deployment, seq - keep));
        }
    }
    Ok(Ok(record.windows.len() as u64))
}

/// Forgets every serving window of a removed deployment.
pub fn forget(txn: &mut Txn<'_>, deployment: &str) -> Result<(), StoreError> {
    let last = read_counter(txn, &keys::serving_seq(deployment))?;
    let first = last.saturating_sub(u64::from(MAX_KEEP_WINDOWS)) + 1;
    for seq in first..=last {
        txn.delete(keys::serving_window(deployment, seq));
    }
    txn.delete(keys::serving_seq(deployment));
    Ok(())
}

/// A deployment's windows that started at or after `since_ms`, oldest first,
/// reading back at most `max` windows.
pub fn windows_since(
    state: &dyn StateRead,
    deployment: &str,
    since_ms: u64,
    max: usize,
) -> Result<Vec<ServingWindow>, StoreError> {
    let last = read_counter(state, &keys::serving_seq(deployment))?;
    let mut out = Vec::new();
    for seq in (1..=last).rev().take(max) {
        let Some(bytes) = state.read(&keys::serving_window(deployment, seq))? else {
            break;
        };
        let window = ServingWindow::decode(bytes.as_slice()).map_err(|e| StoreError {
            op: "decode serving window",
            message: e.to_string(),
        })?;
        if window.start_ms < since_ms {
            break;
        }
        out.push(window);
    }
    out.reverse();
    Ok(out)
}

/// The sums of several windows (deployment, model and version of the first).
pub fn sum<'a>(windows: impl IntoIterator<Item = &'a ServingWindow>) -> ServingWindow {
    let mut total = ServingWindow::default();
    for w in windows {
        if total.deployment.is_empty() {
            total.deployment = w.deployment.clone();
            total.model = w.model.clone();
            total.version = w.version;
            total.start_ms = w.start_ms;
        }
        total.start_ms = total.start_ms.min(w.start_ms);
        total.end_ms = total.end_ms.max(w.end_ms);
        add_into(&mut total, w);
    }
    total
}

/// Adds the counts of `from` into `into` (saturating; the histograms bucket by
/// bucket, the longer one's length kept).
pub fn add_into(into: &mut ServingWindow, from: &ServingWindow) {
    into.requests = into.requests.saturating_add(from.requests);
    into.failures = into.failures.saturating_add(from.failures);
    into.rejected = into.rejected.saturating_add(from.rejected);
    into.invalid = into.invalid.saturating_add(from.invalid);
    into.timeouts = into.timeouts.saturating_add(from.timeouts);
    into.rows = into.rows.saturating_add(from.rows);
    if into.latency_counts.len() < from.latency_counts.len() {
        into.latency_counts.resize(from.latency_counts.len(), 0);
    }
    for (a, b) in into.latency_counts.iter_mut().zip(&from.latency_counts) {
        *a = a.saturating_add(*b);
    }
    into.latency_sum_ms += from.latency_sum_ms;
    into.labelled = into.labelled.saturating_add(from.labelled);
    into.correct = into.correct.saturating_add(from.correct);
    into.abs_error_sum += from.abs_error_sum;
    into.squared_error_sum += from.squared_error_sum;
    into.classification |= from.classification;
}
