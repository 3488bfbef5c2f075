//! Applying experiment-tracking commands: experiments, runs, and the params, tags
//! and metrics logged to runs.
//!
//! Keys (see `keys`): `experiment/<id>`, `experiment_name/<name>`, `run/<id>`,
//! `experiment_run/<exp>/<start>/<run>` (runs by experiment, oldest first), and
//! `metric/<run>/<hex key>/<step>/<timestamp>` for every point. A point's key holds
//! everything that names it, so a retried log writes the same key again and changes
//! nothing; the run record keeps the latest point of each metric for listings.
//!
//! Rejections start with an error code (`RESOURCE_ALREADY_EXISTS:`,
//! `RESOURCE_DOES_NOT_EXIST:`, `INVALID_PARAMETER_VALUE:`) that the REST API maps to
//! MLflow's error codes and HTTP statuses.

use kiln_proto::v1::{
    CreateExperiment, CreateRun, Experiment, LogBatch, LogRunInputs, LogRunOutputs, MetricPoint,
    RunRecord, UpdateExperiment, UpdateRun,
};
use prost::Message;

use super::artifacts::read_record;
use super::keys;
use super::machine::StateRead as _;
use super::machine::{bump_counter, Rejection, Txn};
use super::reader::StateReader;
use crate::raft::storage::StoreError;

/// Most metrics, params and tags in one batch (MLflow's limits).
pub const MAX_BATCH_METRICS: usize = 1000;
pub const MAX_BATCH_PARAMS: usize = 100;
pub const MAX_BATCH_TAGS: usize = 100;
/// Most metrics, params and tags together in one batch (MLflow's limit).
pub const MAX_BATCH_ITEMS: usize = 1000;
/// Most logged models one run lists as outputs.
pub const MAX_RUN_OUTPUTS: usize = 1000;
/// Longest key of a param, tag or metric; longest param value; longest tag value.
pub const MAX_KEY_BYTES: usize = 250;
pub const MAX_PARAM_VALUE_BYTES: usize = 6000;
pub const MAX_TAG_VALUE_BYTES: usize = 8000;
/// Longest experiment name.
pub const MAX_EXPERIMENT_NAME_BYTES: usize = 500;
/// Run states.
pub const RUN_STATES: [&str; 5] = ["RUNNING", "SCHEDULED", "FINISHED", "FAILED", "KILLED"];
/// The experiment that exists without being created.
pub const DEFAULT_EXPERIMENT: &str = "Default";

fn exists(what: String) -> Result<u64, Rejection> {
    Err(format!("RESOURCE_ALREADY_EXISTS: {what}"))
}

fn missing<T>(what: String) -> Result<T, Rejection> {
    Err(format!("RESOURCE_DOES_NOT_EXIST: {what}"))
}

fn invalid<T>(what: String) -> Result<T, Rejection> {
    Err(format!("INVALID_PARAMETER_VALUE: {what}"))
}

fn check_key(what: &str, key: &str) -> Result<(), Rejection> {
    if key.is_empty() || key.len() > MAX_KEY_BYTES {
        return invalid(format!(
            "{what} key '{key}' must be 1 to {MAX_KEY_BYTES} bytes"
        ));
    }
    Ok(())
}

/// Records logged models as outputs of a run; a model listed already keeps its
/// first step, so a retried call changes nothing.
pub fn apply_log_outputs(
    txn: &mut Txn<'_>,
    outputs: &LogRunOutputs,
) -> Result<Result<u64, Rejection>, StoreError> {
    let mut run = match read_run(txn, &outputs.run_id)? {
        Ok(run) => run,
        Err(e) => return Ok(Err(e)),
    };
    for output in &outputs.models {
        if txn.get(&keys::logged_model(&output.model_id))?.is_none() {
            return Ok(missing(format!(
                "logged model {} does not exist",
                output.model_id
            )));
        }
        if !run.outputs.iter().any(|o| o.model_id == output.model_id) {
            run.outputs.push(output.clone());
        }
    }
    if run.outputs.len() > MAX_RUN_OUTPUTS {
        return Ok(invalid(format!(
            "a run lists at most {MAX_RUN_OUTPUTS} logged models"
        )));
    }
    txn.put(keys::run(&run.run_id), run.encode_to_vec());
    Ok(Ok(0))
}

/// Returns the experiment `id` (the default one, 0, always exists).
pub fn read_experiment(
    state: &dyn super::machine::StateRead,
    id: u64,
) -> Result<Option<Experiment>, StoreError> {
    let stored = read_record(state, &keys::experiment(id), "decode experiment")?;
    if id == 0 && stored.is_none() {
        // Stored only once changed (tags).
        return Ok(Some(Experiment {
            id: 0,
            name: DEFAULT_EXPERIMENT.into(),
            ..Default::default()
        }));
    }
    Ok(stored)
}

/// Returns the id of the experiment called `name`.
pub fn experiment_id(
    state: &dyn super::machine::StateRead,
    name: &str,
) -> Result<Option<u64>, StoreError> {
    if name == DEFAULT_EXPERIMENT {
        return Ok(Some(0));
    }
    Ok(state
        .read(&keys::experiment_name(name))?
        .and_then(|v| v.as_slice().try_into().ok().map(u64::from_be_bytes)))
}

/// Creates an experiment; returns its id.
pub fn apply_create_experiment(
    txn: &mut Txn<'_>,
    create: &CreateExperiment,
    now_ms: u64,
) -> Result<Result<u64, Rejection>, StoreError> {
    let name = create.name.trim();
    if name.is_empty() || name.len() > MAX_EXPERIMENT_NAME_BYTES {
        return Ok(invalid(format!(
            "an experiment name must be 1 to {MAX_EXPERIMENT_NAME_BYTES} bytes"
        )));
    }
    if experiment_id(txn, name)?.is_some() {
        return Ok(exists(format!("experiment '{name}' exists already")));
    }
    let id = bump_counter(txn, keys::EXPERIMENT_SEQ)?;
    let experiment = Experiment {
        id,
        name: name.to_string(),
        created_at_ms: now_ms,
        updated_at_ms: now_ms,
        tags: create.tags.clone(),
        ..Default::default()
    };
    txn.put(keys::experiment(id), experiment.encode_to_vec());
    txn.put(keys::experiment_name(name), id.to_be_bytes().to_vec());
    Ok(Ok(id))
}

/// Creates a run.
pub fn apply_create_run(
    txn: &mut Txn<'_>,
    create: &CreateRun,
) -> Result<Result<u64, Rejection>, StoreError> {
    let id_ok = create.run_id.len() == 32
        && create
            .run_id
            .bytes()
            .all(|b| b.is_ascii_digit() || (b'a'..=b'f').contains(&b));
    if !id_ok {
        return Ok(invalid(format!(
            "run id '{}' must be 32 lowercase hex digits",
            create.run_id
        )));
    }
    if read_experiment(txn, create.experiment_id)?.is_none() {
        return Ok(missing(format!(
            "experiment {} does not exist",
            create.experiment_id
        )));
    }
    if txn.get(&keys::run(&create.run_id))?.is_some() {
        return Ok(exists(format!("run {} exists already", create.run_id)));
    }
    for (k, v) in &create.tags {
        if let Err(e) = check_key("tag", k) {
            return Ok(Err(e));
        }
        if v.len() > MAX_TAG_VALUE_BYTES {
            return Ok(invalid(format!(
                "tag {k} is longer than {MAX_TAG_VALUE_BYTES} bytes"
            )));
        }
    }
    let run = RunRecord {
        run_id: create.run_id.clone(),
        experiment_id: create.experiment_id,
        name: create.name.clone(),
        user: create.user.clone(),
        status: "RUNNING".into(),
        start_time_ms: create.start_time_ms,
        tags: create.tags.clone(),
        ..Default::default()
    };
    txn.put(keys::run(&run.run_id), run.encode_to_vec());
    txn.put(
        keys::experiment_run(run.experiment_id, run.start_time_ms, &run.run_id),
        Vec::new(),
    );
    Ok(Ok(0))
}

fn read_run(txn: &Txn<'_>, run_id: &str) -> Result<Result<RunRecord, Rejection>, StoreError> {
    Ok(
        match read_record::<RunRecord>(txn, &keys::run(run_id), "decode run")? {
            Some(run) => Ok(run),
            None => missing(format!("run {run_id} does not exist")),
        },
    )
}

/// Changes a run's status, end time or name.
pub fn apply_update_run(
    txn: &mut Txn<'_>,
    update: &UpdateRun,
) -> Result<Result<u64, Rejection>, StoreError> {
    let mut run = match read_run(txn, &update.run_id)? {
        Ok(run) => run,
        Err(e) => return Ok(Err(e)),
    };
    if !update.status.is_empty() {
        if !RUN_STATES.contains(&update.status.as_str()) {
            return Ok(invalid(format!(
                "status '{}' is not one of {}",
                update.status,
                RUN_STATES.join(", ")
            )));
        }
        run.status = update.status.clone();
    }
    if update.end_time_ms != 0 {
        run.end_time_ms = update.end_time_ms;
    }
    if !update.name.is_empty() {
        run.name = update.name.clone();
    }
    match lifecycle(&update.lifecycle_stage) {
        Ok(Some(stage)) => run.lifecycle_stage = stage,
        Ok(None) => {}
        Err(e) => return Ok(Err(e)),
    }
    for k in &update.delete_tags {
        if run.tags.remove(k).is_none() {
            return Ok(missing(format!("run {} has no tag '{k}'", run.run_id)));
        }
    }
    txn.put(keys::run(&run.run_id), run.encode_to_vec());
    Ok(Ok(0))
}

/// Reads a lifecycle stage: `Some("")` for active (stored empty), `Some("deleted")`,
/// `None` when unchanged.
fn lifecycle(stage: &str) -> Result<Option<String>, Rejection> {
    match stage {
        "" => Ok(None),
        "active" => Ok(Some(String::new())),
        "deleted" => Ok(Some("deleted".into())),
        other => invalid(format!(
            "lifecycle stage '{other}' is not 'active' or 'deleted'"
        )),
    }
}

/// Renames, deletes or restores an experiment, or changes its tags.
pub fn apply_update_experiment(
    txn: &mut Txn<'_>,
    update: &UpdateExperiment,
    now_ms: u64,
) -> Result<Result<u64, Rejection>, StoreError> {
    let Some(mut experiment) = read_experiment(txn, update.id)? else {
        return Ok(missing(format!("experiment {} does not exist", update.id)));
    };
    let new_name = update.new_name.trim();
    if !new_name.is_empty() && new_name != experiment.name {
        if update.id == 0 {
            return Ok(invalid(format!(
                "the default experiment is always named '{DEFAULT_EXPERIMENT}'"
            )));
        }
        if new_name.len() > MAX_EXPERIMENT_NAME_BYTES {
            return Ok(invalid(format!(
                "an experiment name must be 1 to {MAX_EXPERIMENT_NAME_BYTES} bytes"
            )));
        }
        if experiment_id(txn, new_name)?.is_some() {
            return Ok(exists(format!("experiment '{new_name}' exists already")));
        }
        txn.delete(keys::experiment_name(&experiment.name));
        txn.put(
            keys::experiment_name(new_name),
            update.id.to_be_bytes().to_vec(),
        );
        experiment.name = new_name.to_string();
    }
    match lifecycle(&update.lifecycle_stage) {
        Ok(Some(stage)) if update.id == 0 && !stage.is_empty() => {
            return Ok(invalid("the default experiment cannot be deleted".into()))
        }
        Ok(Some(stage)) => experiment.lifecycle_stage = stage,
        Ok(None) => {}
        Err(e) => return Ok(Err(e)),
    }
    for (k, v) in &update.set_tags {
        if let Err(e) = check_key("tag", k) {
            return Ok(Err(e));
        }
        if v.len() > MAX_TAG_VALUE_BYTES {
            return Ok(invalid(format!(
                "tag {k} is longer than {MAX_TAG_VALUE_BYTES} bytes"
            )));
        }
        experiment.tags.insert(k.clone(), v.clone());
    }
    for k in &update.delete_tags {
        experiment.tags.remove(k);
    }
    experiment.updated_at_ms = now_ms;
    txn.put(keys::experiment(update.id), experiment.encode_to_vec());
    Ok(Ok(0))
}

/// Most datasets one run lists as inputs.
pub const MAX_RUN_INPUTS: usize = 1000;

/// Records datasets as inputs of a run; one logged again (same name and digest)
/// is kept once, so a retried call changes nothing.
pub fn apply_log_inputs(
    txn: &mut Txn<'_>,
    inputs: &LogRunInputs,
) -> Result<Result<u64, Rejection>, StoreError> {
    let mut run = match read_run(txn, &inputs.run_id)? {
        Ok(run) => run,
        Err(e) => return Ok(Err(e)),
    };
    for dataset in &inputs.datasets {
        if dataset.name.is_empty() {
            return Ok(invalid("a dataset input needs a name".into()));
        }
        let known = run
            .inputs
            .iter()
            .any(|d| d.name == dataset.name && d.digest == dataset.digest);
        if !known {
            run.inputs.push(dataset.clone());
        }
    }
    if run.inputs.len() > MAX_RUN_INPUTS {
        return Ok(invalid(format!(
            "a run lists at most {MAX_RUN_INPUTS} dataset inputs"
        )));
    }
    txn.put(keys::run(&run.run_id), run.encode_to_vec());
    Ok(Ok(0))
}

/// Returns true when `a` is a later point than `b` (higher step, then later time).
fn later(a: &MetricPoint, b: &MetricPoint) -> bool {
    (a.step, a.timestamp_ms) >= (b.step, b.timestamp_ms)
}

/// Logs metrics, params and tags to a run, all or nothing.
pub fn apply_log_batch(
    txn: &mut Txn<'_>,
    batch: &LogBatch,
) -> Result<Result<u64, Rejection>, StoreError> {
    if batch.metrics.len() > MAX_BATCH_METRICS
        || batch.params.len() > MAX_BATCH_PARAMS
        || batch.tags.len() > MAX_BATCH_TAGS
    {
        return Ok(invalid(format!(
            "a batch holds at most {MAX_BATCH_METRICS} metrics, {MAX_BATCH_PARAMS} params and {MAX_BATCH_TAGS} tags"
        )));
    }
    let items = batch.metrics.len() + batch.params.len() + batch.tags.len();
    if items > MAX_BATCH_ITEMS {
        return Ok(invalid(format!(
            "a batch holds {items} metrics, params and tags; at most {MAX_BATCH_ITEMS} in total"
        )));
    }
    let mut run = match read_run(txn, &batch.run_id)? {
        Ok(run) => run,
        Err(e) => return Ok(Err(e)),
    };
    if !run.lifecycle_stage.is_empty() {
        return Ok(invalid(format!(
            "run {} is deleted; restore it before logging to it",
            run.run_id
        )));
    }
    for (k, v) in &batch.params {
        if let Err(e) = check_key("param", k) {
            return Ok(Err(e));
        }
        if v.len() > MAX_PARAM_VALUE_BYTES {
            return Ok(invalid(format!(
                "param {k} is longer than {MAX_PARAM_VALUE_BYTES} bytes"
            )));
        }
        match run.params.get(k) {
            Some(old) if old != v => {
                return Ok(invalid(format!(
                    "param {k} was logged as '{old}'; a param cannot change (log '{v}' under another key)"
                )))
            }
            _ => {}
        }
    }
    for (k, v) in &batch.tags {
        if let Err(e) = check_key("tag", k) {
            return Ok(Err(e));
        }
        if v.len() > MAX_TAG_VALUE_BYTES {
            return Ok(invalid(format!(
                "tag {k} is longer than {MAX_TAG_VALUE_BYTES} bytes"
            )));
        }
    }
    for m in &batch.metrics {
        if let Err(e) = check_key("metric", &m.key) {
            return Ok(Err(e));
        }
    }
    for (k, v) in &batch.params {
        run.params.insert(k.clone(), v.clone());
    }
    for (k, v) in &batch.tags {
        run.tags.insert(k.clone(), v.clone());
    }
    for m in &batch.metrics {
        txn.put(
            keys::metric(&run.run_id, &m.key, m.step, m.timestamp_ms),
            m.encode_to_vec(),
        );
        let newer = run.latest.get(&m.key).is_none_or(|old| later(m, old));
        if newer {
            run.latest.insert(m.key.clone(), m.clone());
        }
    }
    txn.put(keys::run(&run.run_id), run.encode_to_vec());
    Ok(Ok(0))
}

/// Returns every experiment, the default one first.
pub fn experiments(reader: &StateReader) -> Result<Vec<Experiment>, StoreError> {
    let mut out = Vec::new();
    if reader.read(&keys::experiment(0))?.is_none() {
        out.push(read_experiment(reader, 0)?.unwrap_or_default());
    }
    for (_, bytes) in reader.scan(keys::EXPERIMENT.as_bytes(), usize::MAX)? {
        out.push(
            Experiment::decode(bytes.as_slice()).map_err(|e| StoreError {
                op: "decode experiment",
                message: e.to_string(),
            })?,
        );
    }
    Ok(out)
}

/// Returns up to `max` runs of the experiments `ids`, newest first.
pub fn runs(reader: &StateReader, ids: &[u64], max: usize) -> Result<Vec<RunRecord>, StoreError> {
    let mut runs = Vec::new();
    for id in ids {
        for (key, _) in reader.scan(&keys::experiment_runs(*id), usize::MAX)? {
            let run_id = String::from_utf8_lossy(&key[key.len().saturating_sub(32)..]).to_string();
            if let Some(run) = read_record::<RunRecord>(reader, &keys::run(&run_id), "decode run")?
            {
                runs.push(run);
            }
        }
    }
    runs.sort_by(|a, b| {
        b.start_time_ms
            .cmp(&a.start_time_ms)
            .then_with(|| a.run_id.cmp(&b.run_id))
    });
    runs.truncate(max);
    Ok(runs)
}

/// Returns up to `max` points of metric `key` of a run, by step then time.
pub fn history(
    reader: &StateReader,
    run_id: &str,
    key: &str,
    max: usize,
) -> Result<Vec<MetricPoint>, StoreError> {
    reader
        .scan(&keys::metric_points(run_id, key), max)?
        .into_iter()
        .map(|(_, bytes)| {
            MetricPoint::decode(bytes.as_slice()).map_err(|e| StoreError {
                op: "decode metric point",
                message: e.to_string(),
            })
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use kiln_proto::v1::command;

    use crate::state::machine::testing::{apply_at, Empty};

    fn apply(txn: &mut Txn<'_>, kind: command::Kind) -> Result<u64, Rejection> {
        apply_at(txn, 9, kind)
    }

    const RUN: &str = "0123456789abcdef0123456789abcdef";

    fn point(key: &str, value: f64, step: i64, ts: u64) -> MetricPoint {
        MetricPoint {
            key: key.into(),
            value,
            timestamp_ms: ts,
            step,
        }
    }

    #[test]
    fn experiments_runs_and_logs() {
        let base = Empty;
        let mut txn = Txn::new(&base);
        let create = |name: &str| {
            command::Kind::CreateExperiment(CreateExperiment {
                name: name.into(),
                tags: Default::default(),
            })
        };
        assert_eq!(apply(&mut txn, create("iris")), Ok(1));
        let again = apply(&mut txn, create("iris")).expect_err("exists");
        assert!(again.starts_with("RESOURCE_ALREADY_EXISTS"), "{again}");
        assert!(
            apply(&mut txn, create("Default")).is_err(),
            "the default exists"
        );
        assert_eq!(experiment_id(&txn, "iris").expect("io"), Some(1));

        let run = command::Kind::CreateRun(CreateRun {
            run_id: RUN.into(),
            experiment_id: 1,
            name: "first".into(),
            start_time_ms: 5,
            ..Default::default()
        });
        apply(&mut txn, run.clone()).expect("run");
        assert!(apply(&mut txn, run)
            .expect_err("dup")
            .starts_with("RESOURCE_ALREADY_EXISTS"));

        let batch = |metrics: Vec<MetricPoint>, params: &[(&str, &str)]| {
            command::Kind::LogBatch(LogBatch {
                run_id: RUN.into(),
                metrics,
                params: params
                    .iter()
                    .map(|(k, v)| (k.to_string(), v.to_string()))
                    .collect(),
                tags: Default::default(),
            })
        };
        apply(
            &mut txn,
            batch(
                vec![point("loss", 0.9, 1, 10), point("loss", 0.5, 2, 20)],
                &[("lr", "0.1")],
            ),
        )
        .expect("logged");
        // A retry of the same batch changes nothing; an older point is not "latest".
        apply(
            &mut txn,
            batch(vec![point("loss", 0.9, 1, 10)], &[("lr", "0.1")]),
        )
        .expect("retry");
        let changed =
            apply(&mut txn, batch(vec![], &[("lr", "0.2")])).expect_err("params are fixed");
        assert!(changed.starts_with("INVALID_PARAMETER_VALUE"), "{changed}");
        let record: RunRecord = read_record(&txn, &keys::run(RUN), "run")
            .expect("io")
            .expect("run");
        assert_eq!(record.latest["loss"].value, 0.5);
        assert_eq!(record.params["lr"], "0.1");
        let points = txn
            .writes
            .keys()
            .filter(|k| k.starts_with(b"metric/"))
            .count();
        assert_eq!(points, 2, "the retried point is the same key");

        let finish = command::Kind::UpdateRun(UpdateRun {
            run_id: RUN.into(),
            status: "FINISHED".into(),
            end_time_ms: 50,
            ..Default::default()
        });
        apply(&mut txn, finish).expect("finished");
        let bad = command::Kind::UpdateRun(UpdateRun {
            run_id: RUN.into(),
            status: "DONE".into(),
            ..Default::default()
        });
        assert!(apply(&mut txn, bad).is_err());
        let orphan = command::Kind::LogBatch(LogBatch {
            run_id: "f".repeat(32),
            ..Default::default()
        });
        assert!(apply(&mut txn, orphan)
            .expect_err("no run")
            .starts_with("RESOURCE_DOES_NOT_EXIST"));
    }
}
