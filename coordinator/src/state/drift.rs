//! Applying drift windows: each judged window of a model version is kept (the
//! newest `keep_windows` of them), and opens or resolves that version's alerts.
//!
//! An alert of a kind (`dataset_drift`, `prediction_drift`) opens with the first
//! window that drifts that way, counts the drifting windows while it fires, and is
//! resolved by the first window that does not; the next drift opens a new alert.
//! So the alert history reads like Alertmanager's: firing, then resolved.

use kiln_proto::v1::{DriftAlert, DriftWindow, RecordDrift};
use prost::Message;

use super::artifacts::read_record;
use super::keys;
use super::machine::{bump_counter, read_counter, Rejection, StateRead, Txn};
use crate::raft::storage::StoreError;

/// Whether a window shows one kind of drift.
pub type Shows = fn(&DriftWindow) -> bool;

/// The alert kinds, and whether a window shows each.
pub const KINDS: [(&str, Shows); 2] = [
    ("dataset_drift", |w| w.dataset_drift),
    ("prediction_drift", |w| w.prediction_drift),
];

/// Most windows kept per model version, whatever the proposer asks.
pub const MAX_KEEP_WINDOWS: u32 = 100_000;

/// What applying a window did to the alerts.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum AlertChange {
    Opened(u64),
    Resolved(u64),
}

/// Returns the alert `id`.
pub fn read_alert(state: &dyn StateRead, id: u64) -> Result<Option<DriftAlert>, StoreError> {
    read_record(state, &keys::drift_alert(id), "decode drift alert")
}

/// Returns the id of the firing alert of `kind` for a model version (0: none).
pub fn open_alert(
    state: &dyn StateRead,
    model: &str,
    version: u64,
    kind: &str,
) -> Result<u64, StoreError> {
    read_counter(state, &keys::drift_alert_open(model, version, kind))
}

/// Records a window and updates the alerts.
pub fn apply_record(
    txn: &mut Txn<'_>,
    record: &RecordDrift,
) -> Result<Result<u64, Rejection>, StoreError> {
    let Some(window) = &record.window else {
        return Ok(Err("record_drift without a window".into()));
    };
    if window.model.is_empty() || window.version == 0 || window.end_ms <= window.start_ms {
        return Ok(Err(format!(
            "drift window of {}@{} from {} to {} ms is not a window",
            window.model, window.version, window.start_ms, window.end_ms
        )));
    }
    let keep = u64::from(record.keep_windows.clamp(1, MAX_KEEP_WINDOWS));
    let seq = bump_counter(txn, &keys::drift_seq(&window.model, window.version))?;
    txn.put(
        keys::drift_window(&window.model, window.version, seq),
        window.encode_to_vec(),
    );
    if seq > keep {
        txn.delete(keys::drift_window(
            &window.model,
            window.version,
            seq - keep,
        ));
    }
    for (kind, drifts) in KINDS {
        update_alert(txn, window, kind, drifts(window))?;
    }
    Ok(Ok(seq))
}

/// Opens, extends or resolves the alert of one kind for the window's version.
fn update_alert(
    txn: &mut Txn<'_>,
    window: &DriftWindow,
    kind: &str,
    drifts: bool,
) -> Result<Option<AlertChange>, StoreError> {
    let open_key = keys::drift_alert_open(&window.model, window.version, kind);
    let open = read_counter(txn, &open_key)?;
    let firing = match open {
        0 => None,
        id => read_alert(txn, id)?,
    };
    match (firing, drifts) {
        (None, false) => Ok(None),
        (Some(mut alert), true) => {
            alert.windows += 1;
            txn.put(keys::drift_alert(alert.id), alert.encode_to_vec());
            Ok(None)
        }
        (Some(mut alert), false) => {
            alert.resolved_at_ms = window.end_ms;
            txn.put(keys::drift_alert(alert.id), alert.encode_to_vec());
            txn.delete(open_key);
            Ok(Some(AlertChange::Resolved(alert.id)))
        }
        (None, true) => {
            let id = bump_counter(txn, keys::DRIFT_ALERT_SEQ)?;
            let outputs = kind == "prediction_drift";
            let judged = window.columns.iter().filter(|c| c.output == outputs);
            let total = judged.clone().count();
            let columns: Vec<String> = judged
                .filter(|c| c.drifted)
                .map(|c| c.name.clone())
                .collect();
            let alert = DriftAlert {
                id,
                model: window.model.clone(),
                version: window.version,
                kind: kind.to_string(),
                opened_at_ms: window.end_ms,
                resolved_at_ms: 0,
                drifted_share: if total == 0 {
                    0.0
                } else {
                    columns.len() as f64 / total as f64
                },
                columns,
                deployments: window.deployments.clone(),
                windows: 1,
                resolution: String::new(),
            };
            txn.put(keys::drift_alert(id), alert.encode_to_vec());
            txn.put(open_key, id.to_be_bytes().to_vec());
            if id > keys::MAX_DRIFT_ALERTS {
                txn.delete(keys::drift_alert(id - keys::MAX_DRIFT_ALERTS));
            }
            Ok(Some(AlertChange::Opened(id)))
        }
    }
}

/// Resolves the firing alerts of a model version that serves no more (no window
/// will come to resolve them), noting `why`; returns their ids.
pub fn resolve_retired(
    txn: &mut Txn<'_>,
    model: &str,
    version: u64,
    at_ms: u64,
    why: &str,
) -> Result<Vec<u64>, StoreError> {
    let mut resolved = Vec::new();
    for (kind, _) in KINDS {
        let open_key = keys::drift_alert_open(model, version, kind);
        let id = read_counter(txn, &open_key)?;
        if id == 0 {
            continue;
        }
        if let Some(mut alert) = read_alert(txn, id)? {
            alert.resolved_at_ms = at_ms;
            alert.resolution = why.to_string();
            txn.put(keys::drift_alert(id), alert.encode_to_vec());
        }
        txn.delete(open_key);
        resolved.push(id);
    }
    Ok(resolved)
}

#[cfg(test)]
mod tests {
    use super::*;
    use kiln_proto::v1::ColumnDrift;
    use std::collections::HashMap;

    #[derive(Default)]
    struct Map(HashMap<Vec<u8>, Vec<u8>>);

    impl StateRead for Map {
        fn read(&self, key: &[u8]) -> Result<Option<Vec<u8>>, StoreError> {
            Ok(self.0.get(key).cloned())
        }

        fn scan_prefix(
            &self,
            prefix: &[u8],
            limit: usize,
        ) -> Result<Vec<crate::state::reader::Pair>, StoreError> {
            let mut pairs: Vec<_> = self
                .0
                .iter()
                .filter(|(k, _)| k.starts_with(prefix))
                .map(|(k, v)| (k.clone(), v.clone()))
                .collect();
            pairs.sort();
            pairs.truncate(limit);
            Ok(pairs)
        }
    }

    fn apply(state: &mut Map, window: DriftWindow, keep: u32) -> u64 {
        let writes = {
            let mut txn = Txn::new(state);
            let verdict = apply_record(
                &mut txn,
                &RecordDrift {
                    window: Some(window),
                    keep_windows: keep,
                },
            )
            .expect("storage");
            let seq = verdict.expect("accepted");
            (txn.writes, seq)
        };
        for (k, v) in writes.0 {
            match v {
                Some(v) => state.0.insert(k, v),
                None => state.0.remove(&k),
            };
        }
        writes.1
    }

    fn window(start_ms: u64, dataset_drift: bool) -> DriftWindow {
        DriftWindow {
            model: "iris".into(),
            version: 2,
            start_ms,
            end_ms: start_ms + 1000,
            dataset_drift,
            columns: vec![
                ColumnDrift {
                    name: "a".into(),
                    drifted: dataset_drift,
                    ..ColumnDrift::default()
                },
                ColumnDrift {
                    name: "b".into(),
                    ..ColumnDrift::default()
                },
            ],
            deployments: vec!["iris".into()],
            ..DriftWindow::default()
        }
    }

    #[test]
    fn an_alert_fires_with_the_first_drifting_window_and_resolves_with_the_first_calm_one() {
        let mut state = Map::default();
        apply(&mut state, window(0, false), 10);
        assert_eq!(
            open_alert(&state, "iris", 2, "dataset_drift").expect("read"),
            0
        );
        apply(&mut state, window(1000, true), 10);
        apply(&mut state, window(2000, true), 10);
        let id = open_alert(&state, "iris", 2, "dataset_drift").expect("read");
        assert_eq!(id, 1);
        let alert = read_alert(&state, id).expect("read").expect("alert");
        assert_eq!(
            (alert.opened_at_ms, alert.windows, alert.resolved_at_ms),
            (2000, 2, 0)
        );
        assert_eq!(alert.columns, vec!["a".to_string()]);
        assert!((alert.drifted_share - 0.5).abs() < 1e-12);
        assert_eq!(
            open_alert(&state, "iris", 2, "prediction_drift").expect("read"),
            0,
            "no output column drifted"
        );
        apply(&mut state, window(3000, false), 10);
        assert_eq!(
            open_alert(&state, "iris", 2, "dataset_drift").expect("read"),
            0
        );
        let resolved = read_alert(&state, id).expect("read").expect("alert");
        assert_eq!(resolved.resolved_at_ms, 4000);
        apply(&mut state, window(4000, true), 10);
        assert_eq!(
            open_alert(&state, "iris", 2, "dataset_drift").expect("read"),
            2
        );
    }

    #[test]
    fn a_retired_version_has_its_firing_alerts_resolved() {
        let mut state = Map::default();
        apply(&mut state, window(0, true), 10);
        let id = open_alert(&state, "iris", 2, "dataset_drift").expect("read");
        let writes = {
            let mut txn = Txn::new(&state);
            let resolved =
                resolve_retired(&mut txn, "iris", 2, 9_000, "iris@3 promoted").expect("storage");
            assert_eq!(resolved, vec![id]);
            txn.writes
        };
        for (k, v) in writes {
            match v {
                Some(v) => state.0.insert(k, v),
                None => state.0.remove(&k),
            };
        }
        assert_eq!(
            open_alert(&state, "iris", 2, "dataset_drift").expect("read"),
            0
        );
        let alert = read_alert(&state, id).expect("read").expect("alert");
        assert_eq!(
            (alert.resolved_at_ms, alert.resolution.as_str()),
            (9_000, "iris@3 promoted")
        );
        let mut txn = Txn::new(&state);
        assert!(resolve_retired(&mut txn, "iris", 2, 9_500, "again")
            .expect("storage")
            .is_empty());
    }

    #[test]
    fn only_the_newest_windows_are_kept() {
        let mut state = Map::default();
        for i in 0..5 {
            assert_eq!(apply(&mut state, window(i * 1000, false), 3), i + 1);
        }
        let kept: Vec<bool> = (1..=5)
            .map(|seq| state.0.contains_key(&keys::drift_window("iris", 2, seq)))
            .collect();
        assert_eq!(kept, vec![false, false, true, true, true]);
    }

    #[test]
    fn a_window_that_is_not_one_is_refused() {
        let state = Map::default();
        let mut txn = Txn::new(&state);
        let mut bad = window(5000, false);
        bad.end_ms = 5000;
        let verdict = apply_record(
            &mut txn,
            &RecordDrift {
                window: Some(bad),
                keep_windows: 3,
            },
        )
        .expect("storage");
        assert!(verdict.expect_err("refused").contains("not a window"));
    }
}
