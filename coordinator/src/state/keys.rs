//! Layout of the state machine's key space (column family `state`).
//!
//! ```text
//! \0applied        AppliedState (written with every batch)
//! kv/<key>         user bytes of the small key-value namespace
//! worker/<id>      WorkerRecord
//! member/<id:020>  MemberRecord of a coordinator
//! token/<name>     TokenRecord (salt and hash, never the secret)
//! audit/<seq:020>  AuditRecord; meta/audit_seq holds the last seq
//! meta/tokens_version          u64, bumped by every token change
//! meta/cluster_id              u64, the id the cluster got at bootstrap
//! artifact_head/<name>         u64, the newest version number (listing scans these)
//! artifact/<name>/v/<ver:020>  ArtifactVersion (the manifest)
//! artifact/<name>/tag/<tag>    u64, the version a tag points at
//! chunk/<id:hex>               ChunkRecord: size and the workers holding it
//! experiment/<id:020>          Experiment; experiment_name/<name> → id (u64)
//! run/<run id>                 RunRecord (params, tags, latest metrics)
//! experiment_run/<exp:020>/<start:020>/<run id>   runs of an experiment by age
//! metric/<run>/<hex key>/<step>/<ts:020>          MetricPoint
//! job/<id:020>                 JobRecord; meta/job_seq holds the last id
//! job_active/<id:020>          empty: the job is Pending or Running
//! job_log/<id:020>/<seq:020>   JobLogLine
//! model_head/<name>            u64, the newest version of a model
//! model/<name>/v/<ver:020>     ModelVersion
//! registered_model/<name>      RegisteredModel (description, tags), when set
//! tree_head/<tree>             TreeHead of a run's or logged model's files
//! tree/<tree>/<path>           ArtifactFile of one of those files
//! logged_model/<id>            LoggedModel (MLflow 3)
//! upload/<id>                  UploadRecord of a multipart upload in progress
//! upload_part/<id>/<part:010>  ArtifactFile of one stored part
//! drift_seq/<model>/<ver:020>  u64, the last window number of a model version
//! drift/<model>/<ver:020>/<seq:020>   DriftWindow
//! drift_alert/<id:020>         DriftAlert; meta/drift_alert_seq holds the last id
//! drift_alert_open/<model>/<ver:020>/<kind>   u64, the id of the firing alert
//! ```

/// Prefix of the key-value namespace.
pub const KV: &str = "kv/";
/// Prefix of worker records.
pub const WORKER: &str = "worker/";
/// Prefix of coordinator member records.
pub const MEMBER: &str = "member/";
/// Prefix of audit records, by sequence number.
pub const AUDIT: &str = "audit/";
/// Key of the last audit sequence number.
pub const AUDIT_SEQ: &[u8] = b"meta/audit_seq";
/// Audit records kept; older ones are dropped as new ones arrive.
pub const MAX_AUDIT_RECORDS: u64 = 100_000;

/// Key of the cluster's id, written at bootstrap (u64, big-endian): every Raft
/// message carries it, and a node of another cluster refuses the message.
pub const CLUSTER_ID: &[u8] = b"meta/cluster_id";

/// Prefix of bearer token records (salted hashes only).
pub const TOKEN: &str = "token/";
/// Counts changes to the token records, so that workers know when to refresh.
pub const TOKENS_VERSION: &[u8] = b"meta/tokens_version";

/// Prefix of artifact records.
pub const ARTIFACT: &str = "artifact/";
/// Prefix of each artifact's newest version number.
pub const ARTIFACT_HEAD: &str = "artifact_head/";
/// Counts the changes after which some chunk may have fewer replicas than it
/// wants (a replica dropped, a chunk recorded short): the leader's repair loop
/// scans the chunk records again only when this or the workers' states change.
pub const CHUNKS_SHORT: &[u8] = b"meta/chunks_short";
/// Prefix of chunk location records.
pub const CHUNK: &str = "chunk/";
/// Largest manifest accepted, encoded: about 360,000 chunks, some 90 GiB of content
/// at 256 KiB a chunk. A manifest is one Raft entry, so it must stay well under
/// the gRPC message limit (64 MiB).
pub const MAX_MANIFEST_BYTES: usize = 16 << 20;

/// Longest key accepted in the key-value namespace, in bytes.
pub const MAX_KV_KEY_BYTES: usize = 1024;
/// Largest value accepted in the key-value namespace, in bytes.
pub const MAX_KV_VALUE_BYTES: usize = 1 << 20;

/// Returns the state key of a user key.
pub fn kv(key: &str) -> Vec<u8> {
    format!("{KV}{key}").into_bytes()
}

/// Returns the state key of a worker record.
pub fn worker(id: &str) -> Vec<u8> {
    format!("{WORKER}{id}").into_bytes()
}

/// Returns the state key of a coordinator member record.
pub fn member(id: u64) -> Vec<u8> {
    format!("{MEMBER}{id:020}").into_bytes()
}

/// Returns the state key of a token record.
pub fn token(name: &str) -> Vec<u8> {
    format!("{TOKEN}{name}").into_bytes()
}

/// Returns the state key of audit record `seq`.
pub fn audit(seq: u64) -> Vec<u8> {
    format!("{AUDIT}{seq:020}").into_bytes()
}

/// Returns the key of an artifact's newest version number.
pub fn artifact_latest(name: &str) -> Vec<u8> {
    format!("{ARTIFACT_HEAD}{name}").into_bytes()
}

/// Returns the prefix of an artifact's versions.
pub fn artifact_versions(name: &str) -> Vec<u8> {
    format!("{ARTIFACT}{name}/v/").into_bytes()
}

/// Returns the key of one version of an artifact.
pub fn artifact_version(name: &str, version: u64) -> Vec<u8> {
    format!("{ARTIFACT}{name}/v/{version:020}").into_bytes()
}

/// Returns the prefix of an artifact's tags.
pub fn artifact_tags(name: &str) -> Vec<u8> {
    format!("{ARTIFACT}{name}/tag/").into_bytes()
}

/// Returns the key of one tag of an artifact.
pub fn artifact_tag(name: &str, tag: &str) -> Vec<u8> {
    format!("{ARTIFACT}{name}/tag/{tag}").into_bytes()
}

/// Returns the key of a chunk's location record.
pub fn chunk(id: &[u8]) -> Vec<u8> {
    let mut key = CHUNK.as_bytes().to_vec();
    key.extend_from_slice(hex::encode(id).as_bytes());
    key
}

/// Prefix of living trees' heads ([`TreeHead`](kiln_proto::v1::TreeHead)).
pub const TREE_HEAD: &str = "tree_head/";

/// Returns the key of a tree's head.
pub fn tree_head(tree: &str) -> Vec<u8> {
    format!("{TREE_HEAD}{tree}").into_bytes()
}

/// Returns the prefix of a tree's files (`dir` empty: all of them; else the
/// files under the directory `dir`).
pub fn tree_files(tree: &str, dir: &str) -> Vec<u8> {
    if dir.is_empty() {
        format!("tree/{tree}/").into_bytes()
    } else {
        format!("tree/{tree}/{dir}/").into_bytes()
    }
}

/// Returns the key of one file of a tree.
pub fn tree_file(tree: &str, path: &str) -> Vec<u8> {
    format!("tree/{tree}/{path}").into_bytes()
}

/// Counts the multipart uploads open.
pub const UPLOADS_OPEN: &[u8] = b"meta/uploads_open";

/// Prefix of multipart uploads in progress.
pub const UPLOAD: &str = "upload/";

/// Returns the key of a multipart upload.
pub fn upload(id: &str) -> Vec<u8> {
    format!("{UPLOAD}{id}").into_bytes()
}

/// Returns the key of one stored part of an upload.
pub fn upload_part(id: &str, part: u32) -> Vec<u8> {
    format!("upload_part/{id}/{part:010}").into_bytes()
}

/// Prefix of logged models (MLflow 3).
pub const LOGGED_MODEL: &str = "logged_model/";

/// Returns the key of a logged model.
pub fn logged_model(id: &str) -> Vec<u8> {
    format!("{LOGGED_MODEL}{id}").into_bytes()
}

/// Counts experiments (0 is the default one, which is never stored).
pub const EXPERIMENT_SEQ: &[u8] = b"meta/experiment_seq";
/// Prefix of experiment records.
pub const EXPERIMENT: &str = "experiment/";
/// Prefix of run records.
pub const RUN: &str = "run/";

/// Returns the key of experiment `id`.
pub fn experiment(id: u64) -> Vec<u8> {
    format!("{EXPERIMENT}{id:020}").into_bytes()
}

/// Returns the key mapping an experiment name to its id.
pub fn experiment_name(name: &str) -> Vec<u8> {
    format!("experiment_name/{name}").into_bytes()
}

/// Returns the key of run `id`.
pub fn run(id: &str) -> Vec<u8> {
    format!("{RUN}{id}").into_bytes()
}

/// Returns the prefix of an experiment's runs.
pub fn experiment_runs(experiment: u64) -> Vec<u8> {
    format!("experiment_run/{experiment:020}/").into_bytes()
}

/// Returns the index key of a run within its experiment, by start time.
pub fn experiment_run(experiment: u64, start_ms: u64, run: &str) -> Vec<u8> {
    format!("experiment_run/{experiment:020}/{start_ms:020}/{run}").into_bytes()
}

/// Returns the prefix of a metric's points in a run.
pub fn metric_points(run: &str, key: &str) -> Vec<u8> {
    format!("metric/{run}/{}/", hex::encode(key)).into_bytes()
}

/// Returns the key of one metric point; steps sort in numeric order (the sign bit
/// flipped), then timestamps.
pub fn metric(run: &str, key: &str, step: i64, timestamp_ms: u64) -> Vec<u8> {
    let mut out = metric_points(run, key);
    let step = (step as u64) ^ (1 << 63);
    out.extend_from_slice(format!("{step:016x}/{timestamp_ms:020}").as_bytes());
    out
}

/// Counts jobs (ids start at 1).
pub const JOB_SEQ: &[u8] = b"meta/job_seq";
/// Prefix of job records.
pub const JOB: &str = "job/";
/// Prefix of the marks of jobs that have not ended.
pub const JOB_ACTIVE: &str = "job_active/";

/// Returns the key of job `id`.
pub fn job(id: u64) -> Vec<u8> {
    format!("{JOB}{id:020}").into_bytes()
}

/// Returns the mark of a job that has not ended.
pub fn job_active(id: u64) -> Vec<u8> {
    format!("{JOB_ACTIVE}{id:020}").into_bytes()
}

/// Returns the prefix of a job's log lines.
pub fn job_logs(id: u64) -> Vec<u8> {
    format!("job_log/{id:020}/").into_bytes()
}

/// Returns the key of one log line of a job.
pub fn job_log(id: u64, seq: u64) -> Vec<u8> {
    format!("job_log/{id:020}/{seq:020}").into_bytes()
}

/// Prefix of each model's newest version number.
pub const MODEL_HEAD: &str = "model_head/";

/// Prefix of registered models' own records (MLflow's description and tags).
pub const REGISTERED_MODEL: &str = "registered_model/";

/// Returns the key of a registered model's record.
pub fn registered_model(name: &str) -> Vec<u8> {
    format!("{REGISTERED_MODEL}{name}").into_bytes()
}

/// Returns the key of a model's newest version number.
pub fn model_latest(name: &str) -> Vec<u8> {
    format!("{MODEL_HEAD}{name}").into_bytes()
}

/// Returns the prefix of a model's versions.
pub fn model_versions(name: &str) -> Vec<u8> {
    format!("model/{name}/v/").into_bytes()
}

/// Returns the key of one version of a model.
pub fn model_version(name: &str, version: u64) -> Vec<u8> {
    format!("model/{name}/v/{version:020}").into_bytes()
}

/// Returns the prefix of a model's aliases.
pub fn model_aliases(name: &str) -> Vec<u8> {
    format!("model_alias/{name}/").into_bytes()
}

/// Returns the key of one alias of a model (its value: the version, 8 bytes BE).
pub fn model_alias(name: &str, alias: &str) -> Vec<u8> {
    format!("model_alias/{name}/{alias}").into_bytes()
}

/// Prefix of every deployment.
pub const DEPLOYMENT: &str = "deployment/";

/// Returns the key of a deployment.
pub fn deployment(name: &str) -> Vec<u8> {
    format!("{DEPLOYMENT}{name}").into_bytes()
}

/// Prefix of every monitored model version's last window number.
pub const DRIFT_SEQ: &str = "drift_seq/";

/// Returns the key of a model version's last window number.
pub fn drift_seq(model: &str, version: u64) -> Vec<u8> {
    format!("{DRIFT_SEQ}{model}/{version:020}").into_bytes()
}

/// Returns the key of one drift window of a model version.
pub fn drift_window(model: &str, version: u64, seq: u64) -> Vec<u8> {
    format!("drift/{model}/{version:020}/{seq:020}").into_bytes()
}

/// The last drift alert id.
pub const DRIFT_ALERT_SEQ: &[u8] = b"meta/drift_alert_seq";

/// Alerts kept (older ones go).
pub const MAX_DRIFT_ALERTS: u64 = 10_000;

/// Returns the key of a drift alert.
pub fn drift_alert(id: u64) -> Vec<u8> {
    format!("drift_alert/{id:020}").into_bytes()
}

/// Returns the key of the firing alert of a kind for a model version.
pub fn drift_alert_open(model: &str, version: u64, kind: &str) -> Vec<u8> {
    format!("drift_alert_open/{model}/{version:020}/{kind}").into_bytes()
}

/// Returns the key of a deployment's last serving window number.
pub fn serving_seq(deployment: &str) -> Vec<u8> {
    format!("serving_seq/{deployment}").into_bytes()
}

/// Returns the key of one serving window of a deployment.
pub fn serving_window(deployment: &str, seq: u64) -> Vec<u8> {
    format!("serving/{deployment}/{seq:020}").into_bytes()
}
