//! Deterministic `apply`: one command in, state changes out.
//!
//! Apply reads no clock and draws no random number: commands carry the proposer's
//! timestamp. Effects go into a [`Txn`] (an overlay over the stored state) that the
//! Raft node writes as one batch with the applied index.

use std::collections::BTreeMap;

use kiln_proto::v1::{command, Command, MemberRecord, WorkerRecord, WorkerState};
use prost::Message;

use super::keys;
use super::reader::Pair;
use crate::raft::storage::StoreError;

/// Read access to the stored state under a transaction.
pub trait StateRead {
    /// Reads one key of the stored state.
    fn read(&self, key: &[u8]) -> Result<Option<Vec<u8>>, StoreError>;

    /// Reads up to `limit` pairs whose key starts with `prefix`, in key order.
    fn scan_prefix(&self, prefix: &[u8], limit: usize) -> Result<Vec<Pair>, StoreError>;
}

/// Changes of one apply batch, layered over the stored state.
pub struct Txn<'a> {
    base: &'a dyn StateRead,
    /// The writes of this batch; `None` deletes.
    pub writes: BTreeMap<Vec<u8>, Option<Vec<u8>>>,
}

impl<'a> Txn<'a> {
    /// Starts a transaction over `base`.
    pub fn new(base: &'a dyn StateRead) -> Txn<'a> {
        Txn {
            base,
            writes: BTreeMap::new(),
        }
    }

    /// Reads a key as this batch has left it.
    pub fn get(&self, key: &[u8]) -> Result<Option<Vec<u8>>, StoreError> {
        match self.writes.get(key) {
            Some(v) => Ok(v.clone()),
            None => self.base.read(key),
        }
    }

    pub(crate) fn put(&mut self, key: Vec<u8>, value: Vec<u8>) {
        self.writes.insert(key, Some(value));
    }

    pub(crate) fn delete(&mut self, key: Vec<u8>) {
        self.writes.insert(key, None);
    }
}

impl StateRead for Txn<'_> {
    fn read(&self, key: &[u8]) -> Result<Option<Vec<u8>>, StoreError> {
        self.get(key)
    }

    /// The stored pairs under `prefix` with this batch's writes laid over them.
    fn scan_prefix(&self, prefix: &[u8], limit: usize) -> Result<Vec<Pair>, StoreError> {
        let ours = self
            .writes
            .range(prefix.to_vec()..)
            .take_while(|(k, _)| k.starts_with(prefix));
        // Each of this batch's deletions may hide one stored pair.
        let hidden = ours.clone().filter(|(_, v)| v.is_none()).count();
        let mut merged: BTreeMap<Vec<u8>, Vec<u8>> = self
            .base
            .scan_prefix(prefix, limit.saturating_add(hidden))?
            .into_iter()
            .collect();
        for (key, value) in ours {
            match value {
                Some(value) => merged.insert(key.clone(), value.clone()),
                None => merged.remove(key),
            };
        }
        Ok(merged.into_iter().take(limit).collect())
    }
}

/// Why a committed command changed nothing. Every node reaches the same verdict.
pub type Rejection = String;

/// Applies one command. `Err` is a storage failure (the node must stop);
/// `Ok(Err(reason))` is a deterministic rejection; `Ok(Ok(n))` carries a number
/// apply assigned (an artifact version), 0 for most commands.
pub fn apply_command(
    txn: &mut Txn<'_>,
    cmd: &Command,
) -> Result<Result<u64, Rejection>, StoreError> {
    let verdict = apply_kind(txn, cmd)?;
    if let Some(audit) = &cmd.audit {
        let outcome = match &verdict {
            Ok(0) => "ok".to_string(),
            Ok(n) => format!("ok: {n}"),
            Err(reason) => format!("rejected: {reason}"),
        };
        append_audit(txn, cmd.proposed_at_ms, &audit.who, &audit.what, &outcome)?;
    }
    Ok(verdict)
}

/// Appends one audit record and drops the oldest beyond the retention bound.
fn append_audit(
    txn: &mut Txn<'_>,
    at_ms: u64,
    who: &str,
    what: &str,
    outcome: &str,
) -> Result<(), StoreError> {
    let seq = bump_counter(txn, keys::AUDIT_SEQ)?;
    let record = kiln_proto::v1::AuditRecord {
        seq,
        at_ms,
        who: who.to_string(),
        what: what.to_string(),
        outcome: outcome.to_string(),
    };
    txn.put(keys::audit(seq), record.encode_to_vec());
    if seq > keys::MAX_AUDIT_RECORDS {
        txn.delete(keys::audit(seq - keys::MAX_AUDIT_RECORDS));
    }
    Ok(())
}

/// Adds one to the big-endian counter at `key` (absent: 0) and returns the new value.
pub(crate) fn bump_counter(txn: &mut Txn<'_>, key: &[u8]) -> Result<u64, StoreError> {
    let next = read_counter(txn, key)? + 1;
    txn.put(key.to_vec(), next.to_be_bytes().to_vec());
    Ok(next)
}

/// Reads the big-endian counter at `key`; absent reads as 0.
pub fn read_counter(state: &dyn StateRead, key: &[u8]) -> Result<u64, StoreError> {
    match state.read(key)? {
        Some(bytes) => bytes
            .as_slice()
            .try_into()
            .map(u64::from_be_bytes)
            .map_err(|_| StoreError {
                op: "read counter",
                message: format!("{} is not 8 bytes", String::from_utf8_lossy(key)),
            }),
        None => Ok(0),
    }
}

fn apply_kind(txn: &mut Txn<'_>, cmd: &Command) -> Result<Result<u64, Rejection>, StoreError> {
    let now_ms = cmd.proposed_at_ms;
    let Some(kind) = &cmd.kind else {
        return Ok(Err("empty command".into()));
    };
    match kind {
        command::Kind::KvPut(put) => {
            if let Err(reason) = validate_kv(&put.key, put.value.len()) {
                return Ok(Err(reason));
            }
            txn.put(keys::kv(&put.key), put.value.clone());
        }
        command::Kind::KvDelete(del) => {
            txn.delete(keys::kv(&del.key));
        }
        command::Kind::RegisterWorker(reg) => {
            let Some(worker) = &reg.worker else {
                return Ok(Err("register_worker without a worker".into()));
            };
            if worker.id.is_empty() {
                return Ok(Err("worker id is empty".into()));
            }
            let key = keys::worker(&worker.id);
            let previous = read_worker(txn, &key)?;
            let mut record = worker.clone();
            record.incarnation = previous.as_ref().map_or(0, |p| p.incarnation) + 1;
            record.registered_at_ms = previous.as_ref().map_or(now_ms, |p| p.registered_at_ms);
            record.state = WorkerState::Alive as i32;
            record.state_since_ms = now_ms;
            txn.put(key, record.encode_to_vec());
        }
        command::Kind::AuditEvent(event) => {
            append_audit(txn, now_ms, &event.who, &event.what, &event.outcome)?;
        }
        command::Kind::CreateToken(create) => {
            let Some(token) = &create.token else {
                return Ok(Err("create_token without a token".into()));
            };
            let key = keys::token(&token.name);
            if txn.get(&key)?.is_some() {
                return Ok(Err(format!("a token named {} exists already", token.name)));
            }
            txn.put(key, token.encode_to_vec());
            bump_counter(txn, keys::TOKENS_VERSION)?;
        }
        command::Kind::RevokeToken(revoke) => {
            let key = keys::token(&revoke.name);
            if txn.get(&key)?.is_none() {
                return Ok(Err(format!("no token is named {}", revoke.name)));
            }
            txn.delete(key);
            bump_counter(txn, keys::TOKENS_VERSION)?;
        }
        command::Kind::SetWorkerState(set) => {
            let key = keys::worker(&set.worker_id);
            let Some(mut record) = read_worker(txn, &key)? else {
                return Ok(Err(format!("worker {} is not registered", set.worker_id)));
            };
            if record.state != set.state {
                record.state = set.state;
                record.state_since_ms = now_ms;
                txn.put(key, record.encode_to_vec());
            }
        }
        command::Kind::CommitArtifact(commit) => {
            let who = cmd.audit.as_ref().map_or("", |a| a.who.as_str());
            return super::artifacts::apply_commit(txn, commit, now_ms, who);
        }
        command::Kind::SetArtifactTag(set) => {
            return super::artifacts::apply_tag(txn, set);
        }
        command::Kind::AddChunkReplicas(add) => {
            return super::artifacts::apply_add_replicas(txn, add, now_ms);
        }
        command::Kind::DropChunkReplicas(drop) => {
            return super::artifacts::apply_drop_replicas(txn, drop);
        }
        command::Kind::DeleteChunkRecords(delete) => {
            return super::artifacts::apply_delete_records(txn, delete);
        }
        command::Kind::CreateExperiment(create) => {
            return super::tracking::apply_create_experiment(txn, create, now_ms);
        }
        command::Kind::CreateRun(create) => {
            return super::tracking::apply_create_run(txn, create);
        }
        command::Kind::UpdateRun(update) => {
            return super::tracking::apply_update_run(txn, update);
        }
        command::Kind::LogBatch(batch) => {
            return super::tracking::apply_log_batch(txn, batch);
        }
        command::Kind::LogRunOutputs(outputs) => {
            return super::tracking::apply_log_outputs(txn, outputs);
        }
        command::Kind::LogRunInputs(inputs) => {
            return super::tracking::apply_log_inputs(txn, inputs);
        }
        command::Kind::CreateRegisteredModel(create) => {
            return super::models::apply_create_registered(txn, create, now_ms);
        }
        command::Kind::UpdateRegisteredModel(update) => {
            return super::models::apply_update_registered(txn, update, now_ms);
        }
        command::Kind::RenameRegisteredModel(rename) => {
            return super::models::apply_rename(txn, rename, now_ms);
        }
        command::Kind::DeleteRegisteredModel(delete) => {
            return super::models::apply_delete_registered(txn, delete);
        }
        command::Kind::UpdateModelVersion(update) => {
            return super::models::apply_update_version(txn, update, now_ms);
        }
        command::Kind::UpdateExperiment(update) => {
            return super::tracking::apply_update_experiment(txn, update, now_ms);
        }
        command::Kind::PutTreeFile(put) => {
            return super::trees::apply_put(txn, put, now_ms);
        }
        command::Kind::DeleteTreeFiles(delete) => {
            return super::trees::apply_delete(txn, delete, now_ms);
        }
        command::Kind::StartUpload(start) => {
            let who = cmd.audit.as_ref().map_or("", |a| a.who.as_str());
            return super::trees::apply_start_upload(txn, start, now_ms, who);
        }
        command::Kind::PutUploadPart(put) => {
            return super::trees::apply_put_part(txn, put);
        }
        command::Kind::FinishUpload(finish) => {
            return super::trees::apply_finish_upload(txn, finish, now_ms);
        }
        command::Kind::CreateLoggedModel(create) => {
            return super::trees::apply_create_model(txn, create, now_ms);
        }
        command::Kind::UpdateLoggedModel(update) => {
            return super::trees::apply_update_model(txn, update, now_ms);
        }
        command::Kind::SubmitJob(submit) => {
            let who = cmd.audit.as_ref().map_or("", |a| a.who.as_str());
            return super::jobs::apply_submit(txn, submit, now_ms, who);
        }
        command::Kind::PlaceJob(place) => {
            return super::jobs::apply_place(txn, place, now_ms);
        }
        command::Kind::SetJobWaiting(waiting) => {
            return super::jobs::apply_waiting(txn, waiting);
        }
        command::Kind::ReportShard(report) => {
            return super::jobs::apply_report(txn, report, now_ms);
        }
        command::Kind::FailJobAttempt(fail) => {
            return super::jobs::apply_fail_attempt(txn, fail, now_ms);
        }
        command::Kind::CancelJob(cancel) => {
            return super::jobs::apply_cancel(txn, cancel, now_ms);
        }
        command::Kind::RegisterModel(register) => {
            let who = cmd.audit.as_ref().map_or("", |a| a.who.as_str());
            return super::models::apply_register(txn, register, now_ms, who);
        }
        command::Kind::SetModelAlias(set) => {
            return super::models::apply_set_alias(txn, set);
        }
        command::Kind::Deploy(deploy) => {
            let who = cmd.audit.as_ref().map_or("", |a| a.who.as_str());
            return super::deployments::apply_deploy(txn, deploy, now_ms, who);
        }
        command::Kind::RemoveDeployment(remove) => {
            return super::deployments::apply_remove(txn, remove);
        }
        command::Kind::UpdateReplicas(update) => {
            return super::deployments::apply_update_replicas(txn, update, now_ms);
        }
        command::Kind::ReportReplica(report) => {
            return super::deployments::apply_report(txn, report, now_ms);
        }
        command::Kind::ScaleDeployment(scale) => {
            return super::deployments::apply_scale(txn, scale, now_ms);
        }
        command::Kind::RecordDrift(record) => {
            return super::drift::apply_record(txn, record);
        }
        command::Kind::RecordRetrain(record) => {
            return super::deployments::apply_retrain(txn, record, now_ms);
        }
        command::Kind::RecordServing(record) => {
            return super::serving::apply_record(txn, record);
        }
    }
    Ok(Ok(0))
}

/// Records a coordinator's addresses when it is added to the membership.
pub fn apply_member_added(txn: &mut Txn<'_>, member: &MemberRecord) {
    txn.put(keys::member(member.id), member.encode_to_vec());
}

/// Forgets a coordinator removed from the membership.
pub fn apply_member_removed(txn: &mut Txn<'_>, id: u64) {
    txn.delete(keys::member(id));
}

/// Checks a key-value write against the namespace's bounds.
pub fn validate_kv(key: &str, value_len: usize) -> Result<(), Rejection> {
    if key.is_empty() {
        return Err("key is empty".into());
    }
    if key.len() > keys::MAX_KV_KEY_BYTES {
        return Err(format!(
            "key is {} bytes, more than the limit of {}",
            key.len(),
            keys::MAX_KV_KEY_BYTES
        ));
    }
    if value_len > keys::MAX_KV_VALUE_BYTES {
        return Err(format!(
            "value is {value_len} bytes, more than the limit of {}",
            keys::MAX_KV_VALUE_BYTES
        ));
    }
    Ok(())
}

fn read_worker(txn: &Txn<'_>, key: &[u8]) -> Result<Option<WorkerRecord>, StoreError> {
    match txn.get(key)? {
        Some(bytes) => WorkerRecord::decode(bytes.as_slice())
            .map(Some)
            .map_err(|e| StoreError {
                op: "decode worker record",
                message: e.to_string(),
            }),
        None => Ok(None),
    }
}

/// What the state machine's unit tests share: an empty store under a
/// transaction, and apply with a proposer's time.
#[cfg(test)]
pub(crate) mod testing {
    use super::*;

    /// A store that holds nothing.
    pub struct Empty;

    impl StateRead for Empty {
        fn read(&self, _: &[u8]) -> Result<Option<Vec<u8>>, StoreError> {
            Ok(None)
        }

        fn scan_prefix(&self, _: &[u8], _: usize) -> Result<Vec<Pair>, StoreError> {
            Ok(Vec::new())
        }
    }

    /// Registers an Alive worker with `cpus` CPUs, 16 GiB of memory and GPUs 0
    /// to `gpus - 1`.
    pub fn register_worker(txn: &mut Txn<'_>, id: &str, cpus: u32, gpus: u32) {
        let worker = kiln_proto::v1::WorkerRecord {
            id: id.into(),
            resources: Some(kiln_proto::v1::Resources {
                cpu_cores: cpus,
                memory_bytes: 16 << 30,
                gpus: (0..gpus)
                    .map(|index| kiln_proto::v1::Gpu {
                        index,
                        ..Default::default()
                    })
                    .collect(),
                ..Default::default()
            }),
            ..Default::default()
        };
        let kind = command::Kind::RegisterWorker(kiln_proto::v1::RegisterWorker {
            worker: Some(worker),
        });
        apply_at(txn, 1, kind).expect("registered");
    }

    /// Applies `kind` as proposed at `at_ms`; panics on a storage error.
    pub fn apply_at(txn: &mut Txn<'_>, at_ms: u64, kind: command::Kind) -> Result<u64, Rejection> {
        let cmd = Command {
            proposed_at_ms: at_ms,
            audit: None,
            kind: Some(kind),
        };
        apply_command(txn, &cmd).expect("io")
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use kiln_proto::v1::{KvPut, RegisterWorker, SetWorkerState};
    use proptest::prelude::*;

    use super::testing::Empty;

    fn cmd(at: u64, kind: command::Kind) -> Command {
        Command {
            proposed_at_ms: at,
            audit: None,
            kind: Some(kind),
        }
    }

    fn worker(txn: &Txn<'_>, id: &str) -> WorkerRecord {
        let bytes = txn.get(&keys::worker(id)).expect("read").expect("present");
        WorkerRecord::decode(bytes.as_slice()).expect("decode")
    }

    #[test]
    fn a_record_with_a_map_encodes_to_the_same_bytes_on_every_coordinator() {
        // Each coordinator builds its maps on its own: with hashed maps their
        // order, and so the stored bytes, differed from process to process.
        let tags: Vec<(String, String)> = (0..32)
            .map(|i| (format!("tag{i}"), format!("value{i}")))
            .collect();
        let run = |pairs: &mut dyn Iterator<Item = &(String, String)>| {
            kiln_proto::v1::CreateRun {
                run_id: "r".into(),
                tags: pairs.cloned().collect(),
                ..Default::default()
            }
            .encode_to_vec()
        };
        assert_eq!(run(&mut tags.iter()), run(&mut tags.iter().rev()));
    }

    #[test]
    fn reregistration_keeps_the_id_and_counts_incarnations() {
        let mut txn = Txn::new(&Empty);
        let reg = command::Kind::RegisterWorker(RegisterWorker {
            worker: Some(WorkerRecord {
                id: "w1".into(),
                ..Default::default()
            }),
        });
        apply_command(&mut txn, &cmd(10, reg.clone()))
            .expect("io")
            .expect("applied");
        let set = command::Kind::SetWorkerState(SetWorkerState {
            worker_id: "w1".into(),
            state: WorkerState::Down as i32,
        });
        apply_command(&mut txn, &cmd(20, set))
            .expect("io")
            .expect("applied");
        assert_eq!(worker(&txn, "w1").state, WorkerState::Down as i32);
        apply_command(&mut txn, &cmd(30, reg))
            .expect("io")
            .expect("applied");
        let w = worker(&txn, "w1");
        assert_eq!(w.state, WorkerState::Alive as i32);
        assert_eq!(w.incarnation, 2);
        assert_eq!(w.registered_at_ms, 10);
        assert_eq!(w.state_since_ms, 30);
    }

    #[test]
    fn unknown_worker_state_change_is_rejected() {
        let mut txn = Txn::new(&Empty);
        let set = command::Kind::SetWorkerState(SetWorkerState {
            worker_id: "ghost".into(),
            state: WorkerState::Down as i32,
        });
        let verdict = apply_command(&mut txn, &cmd(1, set)).expect("io");
        assert!(verdict.expect_err("rejected").contains("ghost"));
        assert!(txn.writes.is_empty());
    }

    proptest! {
        // Applying the same commands in the same order gives the same writes,
        // whatever the values: apply is a function of the log alone.
        #[test]
        fn apply_is_deterministic(ops in proptest::collection::vec(("[a-c]{1,2}", proptest::collection::vec(any::<u8>(), 0..8), any::<u64>()), 0..40)) {
            let run = || {
                let mut txn = Txn::new(&Empty);
                for (key, value, at) in &ops {
                    let c = cmd(*at, command::Kind::KvPut(KvPut { key: key.clone(), value: value.clone() }));
                    apply_command(&mut txn, &c).expect("io").expect("applied");
                }
                txn.writes
            };
            let a = run();
            prop_assert_eq!(&a, &run());
            // The last write of each key wins.
            for (key, _, _) in &ops {
                let last = ops.iter().rev().find(|(k, _, _)| k == key).map(|(_, v, _)| v.clone());
                prop_assert_eq!(a.get(&keys::kv(key)).cloned().flatten(), last);
            }
        }
    }
}
