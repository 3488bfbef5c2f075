//! Applying changes to living file trees and MLflow 3's logged models.
//!
//! A tree is the artifact root of an MLflow run (`mlflow-run-<run id>`) or of a
//! logged model (`mlflow-model-<model id>`). Each file is its own record
//! (`tree/<tree>/<path>` → [`ArtifactFile`]) and the tree's head
//! (`tree_head/<tree>` → [`TreeHead`]) counts its files, bytes and changes. An
//! upload therefore writes one small entry, whatever the tree already holds: a
//! version per upload would copy the whole manifest each time (quadratic in the
//! number of files). Every file counts one reference on each of its chunks, as a
//! version does, so garbage collection never takes a tree's bytes.
//!
//! Logged models (`logged_model/<id>` → [`LoggedModel`]) carry MLflow's status,
//! params and tags; their files are the tree `mlflow-model-<id>`.
//!
//! A multipart upload (`upload/<id>` → [`UploadRecord`]) stores each part as it
//! comes (`upload_part/<id>/<n>`, its chunks referenced so that garbage
//! collection spares them) and completes in one entry that puts the whole file
//! into its tree: a file is listed whole or not at all.

use std::collections::BTreeMap;

use kiln_proto::v1::{
    ArtifactFile, ChunkRecord, CreateLoggedModel, DeleteTreeFiles, FinishUpload, LoggedModel,
    PutTreeFile, PutUploadPart, StartUpload, TreeHead, UpdateLoggedModel, UploadRecord,
};
use prost::Message;

use super::artifacts::{check_file, count_refs, merge_placements, read_record, write_placed};
use super::keys;
use super::machine::{Rejection, StateRead, Txn};
use crate::raft::storage::StoreError;

/// Names of run trees start with this, then the run id.
pub const RUN_TREE: &str = "mlflow-run-";
/// Names of logged models' trees start with this, then the model id.
pub const MODEL_TREE: &str = "mlflow-model-";
/// Most files one tree may hold (listings and reads are bounded by it).
pub const MAX_TREE_FILES: usize = 100_000;
/// Most parts of one multipart upload (S3's limit, which MLflow's client keeps).
pub const MAX_UPLOAD_PARTS: u32 = 10_000;
/// Most multipart uploads open at once in the cluster.
pub const MAX_OPEN_UPLOADS: u64 = 1_000;
/// Most paths one DeleteTreeFiles names.
pub const MAX_DELETE_PATHS: usize = 1000;
/// Logged model states.
pub const LOGGED_MODEL_STATES: [&str; 3] = [
    "LOGGED_MODEL_PENDING",
    "LOGGED_MODEL_READY",
    "LOGGED_MODEL_UPLOAD_FAILED",
];

/// What a tree belongs to.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum TreeOwner {
    Run(String),
    Model(String),
}

impl TreeOwner {
    /// Returns the tree's artifact name.
    pub fn tree(&self) -> String {
        match self {
            TreeOwner::Run(id) => format!("{RUN_TREE}{id}"),
            TreeOwner::Model(id) => format!("{MODEL_TREE}{id}"),
        }
    }

    /// Reads a tree's artifact name.
    pub fn of(tree: &str) -> Option<TreeOwner> {
        if let Some(id) = tree.strip_prefix(RUN_TREE) {
            return Some(TreeOwner::Run(id.to_string()));
        }
        tree.strip_prefix(MODEL_TREE)
            .map(|id| TreeOwner::Model(id.to_string()))
    }

    /// Says whether the run or logged model exists.
    pub fn exists(&self, state: &dyn StateRead) -> Result<bool, StoreError> {
        Ok(match self {
            TreeOwner::Run(id) => state.read(&keys::run(id))?.is_some(),
            TreeOwner::Model(id) => state.read(&keys::logged_model(id))?.is_some(),
        })
    }
}

/// Returns a tree's head (all zero for a tree without files).
pub fn read_head(state: &dyn StateRead, tree: &str) -> Result<TreeHead, StoreError> {
    Ok(read_record(state, &keys::tree_head(tree), "decode tree head")?.unwrap_or_default())
}

/// Returns a logged model.
pub fn read_logged_model(
    state: &dyn StateRead,
    id: &str,
) -> Result<Option<LoggedModel>, StoreError> {
    read_record(state, &keys::logged_model(id), "decode logged model")
}

/// Checks a logged model id: `m-` and 32 lowercase hex digits.
pub fn valid_model_id(id: &str) -> bool {
    id.strip_prefix("m-").is_some_and(|hex| {
        hex.len() == 32
            && hex
                .bytes()
                .all(|b| b.is_ascii_digit() || (b'a'..=b'f').contains(&b))
    })
}

/// Puts a file into a tree, replacing the file at its path.
pub fn apply_put(
    txn: &mut Txn<'_>,
    put: &PutTreeFile,
    now_ms: u64,
) -> Result<Result<u64, Rejection>, StoreError> {
    let Some(file) = &put.file else {
        return Ok(Err("put_tree_file without a file".into()));
    };
    if let Err(reason) = check_tree(txn, &put.tree)? {
        return Ok(Err(reason));
    }
    let placed = match merge_placements(txn, &put.placements, put.replicas, now_ms)? {
        Ok(placed) => placed,
        Err(reason) => return Ok(Err(reason)),
    };
    install(txn, &put.tree, file, placed, now_ms)
}

/// Checks that a tree's name is one and that its run or logged model exists.
fn check_tree(txn: &Txn<'_>, tree: &str) -> Result<Result<(), Rejection>, StoreError> {
    let Some(owner) = TreeOwner::of(tree) else {
        return Ok(Err(format!(
            "'{tree}' is not a tree: its name starts with {RUN_TREE} or {MODEL_TREE}"
        )));
    };
    if !owner.exists(txn)? {
        return Ok(Err(match owner {
            TreeOwner::Run(id) => format!("RESOURCE_DOES_NOT_EXIST: run {id} does not exist"),
            TreeOwner::Model(id) => {
                format!("RESOURCE_DOES_NOT_EXIST: logged model {id} does not exist")
            }
        }));
    }
    Ok(Ok(()))
}

/// Writes a checked file into a tree, moving chunk references from the file it
/// replaces to it; returns the tree's new generation.
fn install(
    txn: &mut Txn<'_>,
    tree: &str,
    file: &ArtifactFile,
    mut placed: BTreeMap<Vec<u8>, ChunkRecord>,
    now_ms: u64,
) -> Result<Result<u64, Rejection>, StoreError> {
    // A file cannot sit where a directory of the tree is, or under a file.
    let mut ancestor = file.path.as_str();
    while let Some((parent, _)) = ancestor.rsplit_once('/') {
        if txn.get(&keys::tree_file(tree, parent))?.is_some() {
            return Ok(Err(format!(
                "INVALID_PARAMETER_VALUE: {parent} is a file, so {} cannot be under it",
                file.path
            )));
        }
        ancestor = parent;
    }
    if let Err(reason) = check_file(txn, &placed, file)? {
        return Ok(Err(reason));
    }
    let key = keys::tree_file(tree, &file.path);
    let mut head = read_head(txn, tree)?;
    if let Some(old) = read_record::<ArtifactFile>(txn, &key, "decode tree file")? {
        count_refs(txn, &mut placed, chunk_ids(&old), false)?;
        head.files = head.files.saturating_sub(1);
        head.bytes = head.bytes.saturating_sub(old.size);
    } else if head.files >= MAX_TREE_FILES as u64 {
        return Ok(Err(format!(
            "INVALID_PARAMETER_VALUE: {tree} holds {MAX_TREE_FILES} files already"
        )));
    }
    count_refs(txn, &mut placed, chunk_ids(file), true)?;
    write_placed(txn, placed)?;
    txn.put(key, file.encode_to_vec());
    head.files += 1;
    head.bytes = head.bytes.saturating_add(file.size);
    head.generation += 1;
    head.updated_at_ms = now_ms;
    txn.put(keys::tree_head(tree), head.encode_to_vec());
    Ok(Ok(head.generation))
}

fn chunk_ids(file: &ArtifactFile) -> impl Iterator<Item = &[u8]> {
    file.chunks.iter().map(|c| c.id.as_slice())
}

/// Returns a multipart upload in progress.
pub fn read_upload(state: &dyn StateRead, id: &str) -> Result<Option<UploadRecord>, StoreError> {
    read_record(state, &keys::upload(id), "decode upload")
}

/// Opens a multipart upload into a tree.
pub fn apply_start_upload(
    txn: &mut Txn<'_>,
    start: &StartUpload,
    now_ms: u64,
    who: &str,
) -> Result<Result<u64, Rejection>, StoreError> {
    let Some(upload) = &start.upload else {
        return Ok(Err("start_upload without an upload".into()));
    };
    if let Err(reason) = check_tree(txn, &upload.tree)? {
        return Ok(Err(reason));
    }
    if let Err(reason) = super::artifacts::validate_path(&upload.path) {
        return Ok(Err(format!("INVALID_PARAMETER_VALUE: {reason}")));
    }
    if upload.num_parts == 0 || upload.num_parts > MAX_UPLOAD_PARTS {
        return Ok(Err(format!(
            "INVALID_PARAMETER_VALUE: an upload has 1 to {MAX_UPLOAD_PARTS} parts, not {}",
            upload.num_parts
        )));
    }
    let open = super::machine::read_counter(txn, keys::UPLOADS_OPEN)?;
    if open >= MAX_OPEN_UPLOADS {
        return Ok(Err(format!(
            "REQUEST_LIMIT_EXCEEDED: {MAX_OPEN_UPLOADS} multipart uploads are open; \
             complete or abort some first"
        )));
    }
    let key = keys::upload(&upload.upload_id);
    if txn.get(&key)?.is_some() {
        return Ok(Err(format!(
            "RESOURCE_ALREADY_EXISTS: upload {} exists already",
            upload.upload_id
        )));
    }
    let record = UploadRecord {
        created_at_ms: now_ms,
        created_by: who.to_string(),
        ..upload.clone()
    };
    txn.put(key, record.encode_to_vec());
    txn.put(
        keys::UPLOADS_OPEN.to_vec(),
        (open + 1).to_be_bytes().to_vec(),
    );
    Ok(Ok(0))
}

/// Records one stored part; a part sent again replaces the earlier one.
pub fn apply_put_part(
    txn: &mut Txn<'_>,
    put: &PutUploadPart,
) -> Result<Result<u64, Rejection>, StoreError> {
    let Some(part) = &put.part else {
        return Ok(Err("put_upload_part without a part".into()));
    };
    let Some(upload) = read_upload(txn, &put.upload_id)? else {
        return Ok(Err(format!(
            "RESOURCE_DOES_NOT_EXIST: upload {} does not exist (completed or aborted)",
            put.upload_id
        )));
    };
    if put.part_number == 0 || put.part_number > upload.num_parts {
        return Ok(Err(format!(
            "INVALID_PARAMETER_VALUE: part {} of an upload of {} parts",
            put.part_number, upload.num_parts
        )));
    }
    let mut placed = BTreeMap::new();
    let checked = ArtifactFile {
        path: format!("part-{}", put.part_number),
        ..part.clone()
    };
    if let Err(reason) = check_file(txn, &placed, &checked)? {
        return Ok(Err(reason));
    }
    let key = keys::upload_part(&put.upload_id, put.part_number);
    if let Some(old) = read_record::<ArtifactFile>(txn, &key, "decode upload part")? {
        count_refs(txn, &mut placed, chunk_ids(&old), false)?;
    }
    count_refs(txn, &mut placed, chunk_ids(part), true)?;
    write_placed(txn, placed)?;
    txn.put(key, part.encode_to_vec());
    Ok(Ok(0))
}

/// Completes an upload (its listed parts become one file of the tree) or aborts
/// it; the parts and the record go either way.
pub fn apply_finish_upload(
    txn: &mut Txn<'_>,
    finish: &FinishUpload,
    now_ms: u64,
) -> Result<Result<u64, Rejection>, StoreError> {
    let Some(upload) = read_upload(txn, &finish.upload_id)? else {
        return Ok(Err(format!(
            "RESOURCE_DOES_NOT_EXIST: upload {} does not exist (completed or aborted)",
            finish.upload_id
        )));
    };
    let mut placed = BTreeMap::new();
    let mut generation = 0;
    if !finish.abort {
        let mut file = ArtifactFile {
            path: upload.path.clone(),
            digest: finish.digest.clone(),
            ..Default::default()
        };
        for number in &finish.parts {
            let key = keys::upload_part(&finish.upload_id, *number);
            let Some(part) = read_record::<ArtifactFile>(txn, &key, "decode upload part")? else {
                return Ok(Err(format!(
                    "INVALID_PARAMETER_VALUE: part {number} of upload {} was never stored",
                    finish.upload_id
                )));
            };
            file.size = file.size.saturating_add(part.size);
            file.chunks.extend(part.chunks);
        }
        if finish.digest.len() != 32 {
            return Ok(Err("finish_upload without the file's digest".into()));
        }
        match install(txn, &upload.tree, &file, BTreeMap::new(), now_ms)? {
            Ok(g) => generation = g,
            Err(reason) => return Ok(Err(reason)),
        }
    }
    for number in 1..=upload.num_parts {
        let key = keys::upload_part(&finish.upload_id, number);
        if let Some(part) = read_record::<ArtifactFile>(txn, &key, "decode upload part")? {
            count_refs(txn, &mut placed, chunk_ids(&part), false)?;
            txn.delete(key);
        }
    }
    write_placed(txn, placed)?;
    txn.delete(keys::upload(&finish.upload_id));
    let open = super::machine::read_counter(txn, keys::UPLOADS_OPEN)?;
    txn.put(
        keys::UPLOADS_OPEN.to_vec(),
        open.saturating_sub(1).to_be_bytes().to_vec(),
    );
    Ok(Ok(generation))
}

/// Removes files from a tree; paths that are not there are skipped.
pub fn apply_delete(
    txn: &mut Txn<'_>,
    delete: &DeleteTreeFiles,
    now_ms: u64,
) -> Result<Result<u64, Rejection>, StoreError> {
    if delete.paths.len() > MAX_DELETE_PATHS {
        return Ok(Err(format!(
            "{} paths in one delete; at most {MAX_DELETE_PATHS}",
            delete.paths.len()
        )));
    }
    let mut head = read_head(txn, &delete.tree)?;
    let mut placed = BTreeMap::new();
    let mut removed = 0u64;
    for path in &delete.paths {
        let key = keys::tree_file(&delete.tree, path);
        let Some(old) = read_record::<ArtifactFile>(txn, &key, "decode tree file")? else {
            continue;
        };
        count_refs(txn, &mut placed, chunk_ids(&old), false)?;
        txn.delete(key);
        head.files = head.files.saturating_sub(1);
        head.bytes = head.bytes.saturating_sub(old.size);
        removed += 1;
    }
    if removed > 0 {
        write_placed(txn, placed)?;
        head.generation += 1;
        head.updated_at_ms = now_ms;
        if head.files == 0 {
            txn.delete(keys::tree_head(&delete.tree));
        } else {
            txn.put(keys::tree_head(&delete.tree), head.encode_to_vec());
        }
    }
    Ok(Ok(removed))
}

/// Creates a logged model.
pub fn apply_create_model(
    txn: &mut Txn<'_>,
    create: &CreateLoggedModel,
    now_ms: u64,
) -> Result<Result<u64, Rejection>, StoreError> {
    let Some(model) = &create.model else {
        return Ok(Err("create_logged_model without a model".into()));
    };
    if !valid_model_id(&model.model_id) {
        return Ok(Err(format!(
            "INVALID_PARAMETER_VALUE: model id '{}' must be m- and 32 lowercase hex digits",
            model.model_id
        )));
    }
    if super::tracking::read_experiment(txn, model.experiment_id)?.is_none() {
        return Ok(Err(format!(
            "RESOURCE_DOES_NOT_EXIST: experiment {} does not exist",
            model.experiment_id
        )));
    }
    if !model.source_run_id.is_empty() && txn.get(&keys::run(&model.source_run_id))?.is_none() {
        return Ok(Err(format!(
            "RESOURCE_DOES_NOT_EXIST: run {} does not exist",
            model.source_run_id
        )));
    }
    let key = keys::logged_model(&model.model_id);
    if txn.get(&key)?.is_some() {
        return Ok(Err(format!(
            "RESOURCE_ALREADY_EXISTS: logged model {} exists already",
            model.model_id
        )));
    }
    let record = LoggedModel {
        status: "LOGGED_MODEL_PENDING".into(),
        created_at_ms: now_ms,
        updated_at_ms: now_ms,
        ..model.clone()
    };
    txn.put(key, record.encode_to_vec());
    Ok(Ok(0))
}

/// Changes a logged model's status, tags or params, or deletes its record (the
/// caller deletes its files).
pub fn apply_update_model(
    txn: &mut Txn<'_>,
    update: &UpdateLoggedModel,
    now_ms: u64,
) -> Result<Result<u64, Rejection>, StoreError> {
    let key = keys::logged_model(&update.model_id);
    let Some(mut model) = read_logged_model(txn, &update.model_id)? else {
        return Ok(Err(format!(
            "RESOURCE_DOES_NOT_EXIST: logged model {} does not exist",
            update.model_id
        )));
    };
    if update.delete {
        txn.delete(key);
        return Ok(Ok(0));
    }
    if !update.status.is_empty() {
        if !LOGGED_MODEL_STATES.contains(&update.status.as_str()) {
            return Ok(Err(format!(
                "INVALID_PARAMETER_VALUE: status '{}' is not one of {}",
                update.status,
                LOGGED_MODEL_STATES.join(", ")
            )));
        }
        model.status = update.status.clone();
    }
    for (k, v) in &update.set_tags {
        model.tags.insert(k.clone(), v.clone());
    }
    for k in &update.delete_tags {
        model.tags.remove(k);
    }
    for (k, v) in &update.params {
        model.params.insert(k.clone(), v.clone());
    }
    model.updated_at_ms = now_ms;
    txn.put(key, model.encode_to_vec());
    Ok(Ok(0))
}

#[cfg(test)]
mod tests {
    use super::*;
    use kiln_proto::v1::{
        command, ChunkPlacement, ChunkRef, CreateRun, RegisterWorker, WorkerRecord,
    };

    const RUN: &str = "0123456789abcdef0123456789abcdef";

    use crate::state::machine::testing::{apply_at, Empty};

    fn apply(txn: &mut Txn<'_>, kind: command::Kind) -> Result<u64, Rejection> {
        apply_at(txn, 7, kind)
    }

    /// A worker and a run whose tree takes files.
    fn setup(txn: &mut Txn<'_>) -> String {
        let register = command::Kind::RegisterWorker(RegisterWorker {
            worker: Some(WorkerRecord {
                id: "w1".into(),
                ..Default::default()
            }),
        });
        apply(txn, register).expect("registered");
        let run = command::Kind::CreateRun(CreateRun {
            run_id: RUN.into(),
            ..Default::default()
        });
        apply(txn, run).expect("run");
        TreeOwner::Run(RUN.into()).tree()
    }

    fn file(path: &str, chunks: &[(u8, u64)]) -> ArtifactFile {
        ArtifactFile {
            path: path.into(),
            size: chunks.iter().map(|(_, s)| s).sum(),
            digest: vec![9; 32],
            chunks: chunks
                .iter()
                .map(|(b, size)| ChunkRef {
                    id: vec![*b; 32],
                    size: *size,
                })
                .collect(),
            mode: 0,
        }
    }

    fn put(tree: &str, file: ArtifactFile, placed: bool) -> command::Kind {
        let placements = if placed {
            file.chunks
                .iter()
                .map(|c| ChunkPlacement {
                    id: c.id.clone(),
                    size: c.size,
                    workers: vec!["w1".into()],
                })
                .collect()
        } else {
            Vec::new()
        };
        command::Kind::PutTreeFile(PutTreeFile {
            tree: tree.into(),
            file: Some(file),
            placements,
            replicas: 1,
        })
    }

    fn refs(txn: &Txn<'_>, b: u8) -> u64 {
        read_record::<ChunkRecord>(txn, &keys::chunk(&[b; 32]), "chunk")
            .expect("io")
            .map_or(0, |r| r.refs)
    }

    #[test]
    fn a_file_put_into_a_tree_references_its_chunks_until_replaced_or_deleted() {
        let base = Empty;
        let mut txn = Txn::new(&base);
        let tree = setup(&mut txn);

        let unplaced = apply(&mut txn, put(&tree, file("a.txt", &[(1, 10)]), false));
        assert!(unplaced.expect_err("no replica").contains("no replica"));
        let nobody = apply(
            &mut txn,
            put(
                "mlflow-run-ffffffffffffffffffffffffffffffff",
                file("a.txt", &[(1, 10)]),
                true,
            ),
        );
        assert!(nobody
            .expect_err("no run")
            .starts_with("RESOURCE_DOES_NOT_EXIST"));

        assert_eq!(
            apply(
                &mut txn,
                put(&tree, file("a.txt", &[(1, 10), (2, 5)]), true)
            ),
            Ok(1)
        );
        assert_eq!(
            apply(&mut txn, put(&tree, file("d/b.bin", &[(2, 5)]), false)),
            Ok(2)
        );
        assert_eq!((refs(&txn, 1), refs(&txn, 2)), (1, 2));
        let head = read_head(&txn, &tree).expect("io");
        assert_eq!((head.files, head.bytes, head.generation), (2, 20, 2));

        // Replacing moves the references; the same bytes again change nothing more.
        apply(&mut txn, put(&tree, file("a.txt", &[(3, 4)]), true)).expect("replaced");
        apply(&mut txn, put(&tree, file("a.txt", &[(3, 4)]), false)).expect("again");
        assert_eq!((refs(&txn, 1), refs(&txn, 2), refs(&txn, 3)), (0, 1, 1));
        let head = read_head(&txn, &tree).expect("io");
        assert_eq!((head.files, head.bytes), (2, 9));

        // A file cannot go under a file.
        let under = apply(&mut txn, put(&tree, file("a.txt/c", &[(3, 4)]), false));
        assert!(under.expect_err("under a file").contains("is a file"));

        let delete = command::Kind::DeleteTreeFiles(DeleteTreeFiles {
            tree: tree.clone(),
            paths: vec!["a.txt".into(), "missing".into(), "d/b.bin".into()],
        });
        assert_eq!(apply(&mut txn, delete), Ok(2));
        assert_eq!((refs(&txn, 2), refs(&txn, 3)), (0, 0));
        assert!(txn.get(&keys::tree_head(&tree)).expect("io").is_none());
    }

    fn part(upload: &str, n: u32, chunks: &[(u8, u64)]) -> command::Kind {
        command::Kind::PutUploadPart(PutUploadPart {
            upload_id: upload.into(),
            part_number: n,
            part: Some(file("", chunks)),
        })
    }

    #[test]
    fn a_multipart_upload_lists_its_file_whole_only_when_completed() {
        let base = Empty;
        let mut txn = Txn::new(&base);
        let tree = setup(&mut txn);
        // The parts' chunks are stored (recorded) before the parts are.
        let record = command::Kind::AddChunkReplicas(kiln_proto::v1::AddChunkReplicas {
            placements: (1..=3u8)
                .map(|b| ChunkPlacement {
                    id: vec![b; 32],
                    size: 10,
                    workers: vec!["w1".into()],
                })
                .collect(),
            replicas: 1,
        });
        apply(&mut txn, record).expect("recorded");
        let start = |id: &str| {
            command::Kind::StartUpload(StartUpload {
                upload: Some(UploadRecord {
                    upload_id: id.into(),
                    tree: tree.clone(),
                    path: "big.bin".into(),
                    num_parts: 2,
                    ..Default::default()
                }),
            })
        };
        apply(&mut txn, start("u1")).expect("started");
        assert!(apply(&mut txn, start("u1")).is_err(), "an id is used once");
        apply(&mut txn, part("u1", 2, &[(3, 10)])).expect("part 2");
        apply(&mut txn, part("u1", 1, &[(1, 10), (2, 10)])).expect("part 1");
        let outside = apply(&mut txn, part("u1", 3, &[(1, 10)]));
        assert!(outside.expect_err("part 3 of 2").contains("part 3"));
        assert_eq!((refs(&txn, 1), refs(&txn, 3)), (1, 1));
        assert!(
            txn.get(&keys::tree_file(&tree, "big.bin"))
                .expect("io")
                .is_none(),
            "nothing is listed before the upload completes"
        );

        let finish = command::Kind::FinishUpload(FinishUpload {
            upload_id: "u1".into(),
            parts: vec![1, 2],
            digest: vec![7; 32],
            abort: false,
        });
        apply(&mut txn, finish.clone()).expect("completed");
        let whole: ArtifactFile = read_record(&txn, &keys::tree_file(&tree, "big.bin"), "file")
            .expect("io")
            .expect("listed");
        assert_eq!(whole.size, 30);
        let order: Vec<u8> = whole.chunks.iter().map(|c| c.id[0]).collect();
        assert_eq!(order, vec![1, 2, 3], "chunks in part order");
        assert_eq!((refs(&txn, 1), refs(&txn, 2), refs(&txn, 3)), (1, 1, 1));
        assert!(txn.get(&keys::upload_part("u1", 1)).expect("io").is_none());
        let again = apply(&mut txn, finish);
        assert!(again
            .expect_err("gone")
            .starts_with("RESOURCE_DOES_NOT_EXIST"));

        // An aborted upload leaves no file and no references behind.
        apply(&mut txn, start("u2")).expect("started");
        apply(&mut txn, part("u2", 1, &[(2, 10)])).expect("part");
        assert_eq!(refs(&txn, 2), 2);
        let abort = command::Kind::FinishUpload(FinishUpload {
            upload_id: "u2".into(),
            abort: true,
            ..Default::default()
        });
        apply(&mut txn, abort).expect("aborted");
        assert_eq!(refs(&txn, 2), 1);
        assert_eq!(
            crate::state::machine::read_counter(&txn, keys::UPLOADS_OPEN).expect("io"),
            0
        );
    }

    #[test]
    fn logged_models_need_an_experiment_and_take_known_states() {
        let base = Empty;
        let mut txn = Txn::new(&base);
        setup(&mut txn);
        let id = "m-0123456789abcdef0123456789abcdef";
        let create = |model_id: &str, run: &str| {
            command::Kind::CreateLoggedModel(CreateLoggedModel {
                model: Some(LoggedModel {
                    model_id: model_id.into(),
                    name: "model".into(),
                    source_run_id: run.into(),
                    ..Default::default()
                }),
            })
        };
        assert!(apply(&mut txn, create("m-1", RUN)).is_err(), "a bad id");
        assert!(apply(&mut txn, create(id, "ffffffffffffffffffffffffffffffff")).is_err());
        apply(&mut txn, create(id, RUN)).expect("created");
        let stored = read_logged_model(&txn, id).expect("io").expect("stored");
        assert_eq!(stored.status, "LOGGED_MODEL_PENDING");

        let ready = command::Kind::UpdateLoggedModel(UpdateLoggedModel {
            model_id: id.into(),
            status: "LOGGED_MODEL_READY".into(),
            set_tags: [("k".to_string(), "v".to_string())].into(),
            ..Default::default()
        });
        apply(&mut txn, ready).expect("ready");
        let bogus = command::Kind::UpdateLoggedModel(UpdateLoggedModel {
            model_id: id.into(),
            status: "DONE".into(),
            ..Default::default()
        });
        assert!(apply(&mut txn, bogus).is_err());
        let stored = read_logged_model(&txn, id).expect("io").expect("stored");
        assert_eq!(stored.status, "LOGGED_MODEL_READY");
        assert_eq!(stored.tags.get("k").map(String::as_str), Some("v"));
    }
}
