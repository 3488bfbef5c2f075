//! [`Writer`]: a client that writes distinct keys in the background and keeps a
//! ledger of what it attempted and what the cluster acknowledged.

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use kiln_common::client::ClusterClient;
use kiln_proto::v1::PutRequest;
use tokio::task::JoinHandle;

use crate::cluster::Cluster;

/// Keys past the last attempted one that [`WriterLog::check_on`] expects absent.
const PHANTOM_PROBES: u64 = 5;
/// Mismatches listed in a failure message.
const MAX_LISTED_PROBLEMS: usize = 10;

/// What one writer did.
#[derive(Debug, Default)]
pub struct WriterLog {
    /// The key prefix; keys are `<prefix>-<n>` for n = 0, 1, ...
    pub prefix: String,
    /// Every write started, by key, with its value.
    pub attempted: BTreeMap<String, String>,
    /// The writes the cluster acknowledged, by key, with their value.
    pub acked: BTreeMap<String, String>,
    /// When each acknowledgement arrived.
    pub ack_times: Vec<Instant>,
    /// The failed writes, as "key: error".
    pub failures: Vec<String>,
    /// Sequence number of the next key this writer would have written.
    pub next: u64,
}

/// A background task that writes `<prefix>-<n>` = `<prefix>-value-<n>` one after
/// another through a [`ClusterClient`] until told to stop.
#[derive(Debug)]
pub struct Writer {
    stop: Arc<AtomicBool>,
    acked: Arc<AtomicUsize>,
    task: JoinHandle<WriterLog>,
}

/// Returns the key and value of a writer's `n`th write.
fn key_value(prefix: &str, n: u64) -> (String, String) {
    (format!("{prefix}-{n:06}"), format!("{prefix}-value-{n}"))
}

impl Writer {
    /// Starts writing, pausing `pause` between writes.
    pub fn spawn(client: Arc<ClusterClient>, prefix: &str, pause: Duration) -> Writer {
        let stop = Arc::new(AtomicBool::new(false));
        let acked = Arc::new(AtomicUsize::new(0));
        let task = tokio::spawn(write_until_stopped(
            client,
            prefix.to_string(),
            pause,
            stop.clone(),
            acked.clone(),
        ));
        Writer { stop, acked, task }
    }

    /// Returns how many writes were acknowledged so far.
    pub fn acked(&self) -> usize {
        self.acked.load(Ordering::Relaxed)
    }

    /// Stops after the write in flight and returns the ledger.
    pub async fn finish(self) -> WriterLog {
        self.stop.store(true, Ordering::Relaxed);
        self.task.await.expect("the writer task panicked")
    }
}

async fn write_until_stopped(
    client: Arc<ClusterClient>,
    prefix: String,
    pause: Duration,
    stop: Arc<AtomicBool>,
    acked: Arc<AtomicUsize>,
) -> WriterLog {
    let mut log = WriterLog {
        prefix: prefix.clone(),
        ..WriterLog::default()
    };
    while !stop.load(Ordering::Relaxed) {
        let (key, value) = key_value(&prefix, log.next);
        log.next += 1;
        log.attempted.insert(key.clone(), value.clone());
        let result = client
            .call(|mut c| {
                let request = PutRequest {
                    key: key.clone(),
                    value: value.clone().into_bytes(),
                };
                async move { c.put(request).await }
            })
            .await;
        match result {
            Ok(_) => {
                log.ack_times.push(Instant::now());
                log.acked.insert(key, value);
                acked.fetch_add(1, Ordering::Relaxed);
            }
            Err(e) => log.failures.push(format!("{key}: {e}")),
        }
        tokio::time::sleep(pause).await;
    }
    log
}

impl WriterLog {
    /// Checks coordinator `id`'s applied state (stale reads): every acknowledged
    /// write is there with its value, an attempted but unacknowledged write is
    /// absent or has its value, and no key past the last attempt exists.
    pub async fn check_on(&self, cluster: &Cluster, id: u64) {
        let mut problems = Vec::new();
        for (key, value) in &self.attempted {
            let found = cluster
                .get(id, key, true)
                .await
                .unwrap_or_else(|e| panic!("read {key} from coordinator {id}: {e}"));
            let acked = self.acked.contains_key(key);
            match found {
                Some(v) if v == *value => {}
                Some(v) => problems.push(format!("{key} = {v:?}, written {value:?}")),
                None if acked => problems.push(format!("acknowledged {key} is missing")),
                None => {}
            }
        }
        for n in self.next..self.next + PHANTOM_PROBES {
            let (key, _) = key_value(&self.prefix, n);
            let found = cluster
                .get(id, &key, true)
                .await
                .unwrap_or_else(|e| panic!("read {key} from coordinator {id}: {e}"));
            if let Some(v) = found {
                problems.push(format!("never written {key} = {v:?}"));
            }
        }
        if !problems.is_empty() {
            panic!(
                "coordinator {id} disagrees with writer {} in {} keys ({} acked of {} attempted), first: {}",
                self.prefix,
                problems.len(),
                self.acked.len(),
                self.attempted.len(),
                problems
                    .iter()
                    .take(MAX_LISTED_PROBLEMS)
                    .cloned()
                    .collect::<Vec<_>>()
                    .join("; ")
            );
        }
    }
}

/// Returns the longest time within `[from, to]` in which none of the writers got an
/// acknowledgement (the edges count as boundaries).
pub fn longest_ack_gap(logs: &[WriterLog], from: Instant, to: Instant) -> Duration {
    let mut times: Vec<Instant> = logs
        .iter()
        .flat_map(|log| log.ack_times.iter().copied())
        .filter(|t| *t >= from && *t <= to)
        .collect();
    times.push(from);
    times.push(to);
    times.sort();
    times
        .windows(2)
        .map(|w| w[1].duration_since(w[0]))
        .max()
        .unwrap_or_default()
}
