//! Applying artifact commands: committing a pushed version and moving tags.
//!
//! A commit is checked whole before anything is written, so a rejected commit
//! leaves no trace: every chunk a file lists must have at least one replica,
//! either already recorded or placed by this push on a registered worker; paths are
//! relative and unique; sizes add up; parents exist. Then apply numbers the version
//! (one more than the newest, so two pushes of one name get two versions) and
//! records the new replicas.

use std::collections::{BTreeMap, BTreeSet};

use kiln_common::artifact::{validate_name, validate_tag, Selector};
use kiln_proto::v1::{
    AddChunkReplicas, ArtifactFile, ArtifactVersion, ChunkPlacement, ChunkRecord, CommitArtifact,
    DeleteChunkRecords, DropChunkReplicas, SetArtifactTag,
};
use prost::Message;

use super::keys;
use super::machine::{bump_counter, read_counter, Rejection, StateRead, Txn};
use crate::raft::storage::StoreError;

/// Reads and decodes a record of type `M` (any state record, not only artifacts').
pub fn read_record<M: Message + Default>(
    state: &dyn StateRead,
    key: &[u8],
    what: &'static str,
) -> Result<Option<M>, StoreError> {
    match state.read(key)? {
        Some(bytes) => M::decode(bytes.as_slice())
            .map(Some)
            .map_err(|e| StoreError {
                op: what,
                message: e.to_string(),
            }),
        None => Ok(None),
    }
}

/// Checks a file path inside a version: relative, '/'-separated, no empty, `.` or
/// `..` segments.
pub fn validate_path(path: &str) -> Result<(), Rejection> {
    let ok = !path.is_empty()
        && path.len() <= 4096
        && !path.starts_with('/')
        && path
            .split('/')
            .all(|seg| !seg.is_empty() && seg != "." && seg != ".." && !seg.contains('\0'));
    if ok {
        Ok(())
    } else {
        Err(format!(
            "file path '{path}' must be relative, '/'-separated, without '.' or '..'"
        ))
    }
}

/// Resolves `selector` for artifact `name` to a version number, if it names one.
pub fn resolve(
    state: &dyn StateRead,
    name: &str,
    selector: &Selector,
) -> Result<Option<u64>, StoreError> {
    let version = match selector {
        Selector::Latest => read_counter(state, &keys::artifact_latest(name))?,
        Selector::Version(v) => *v,
        Selector::Tag(tag) => read_counter(state, &keys::artifact_tag(name, tag))?,
    };
    if version == 0
        || state
            .read(&keys::artifact_version(name, version))?
            .is_none()
    {
        return Ok(None);
    }
    Ok(Some(version))
}

/// Merges `placements` into the recorded chunk records, checked, without writing:
/// returns the records to write by key, or why the placements are refused.
pub(super) fn merge_placements(
    txn: &Txn<'_>,
    placements: &[ChunkPlacement],
    replicas: u32,
    now_ms: u64,
) -> Result<Result<BTreeMap<Vec<u8>, ChunkRecord>, Rejection>, StoreError> {
    let mut placed: BTreeMap<Vec<u8>, ChunkRecord> = BTreeMap::new();
    for placement in placements {
        if placement.id.len() != 32 {
            return Ok(Err(format!(
                "a placement names a chunk id of {} bytes",
                placement.id.len()
            )));
        }
        if placement.workers.is_empty() {
            return Ok(Err(format!(
                "chunk {} was placed on no worker",
                hex::encode(&placement.id)
            )));
        }
        let key = keys::chunk(&placement.id);
        let mut record = match placed.remove(&key) {
            Some(record) => record,
            None => read_record::<ChunkRecord>(txn, &key, "decode chunk record")?.unwrap_or(
                ChunkRecord {
                    created_at_ms: now_ms,
                    ..Default::default()
                },
            ),
        };
        record.size = placement.size;
        record.replicas = record.replicas.max(replicas);
        for worker in &placement.workers {
            if txn.get(&keys::worker(worker))?.is_none() {
                return Ok(Err(format!("worker {worker} is not registered")));
            }
            if !record.workers.contains(worker) {
                record.workers.push(worker.clone());
            }
        }
        placed.insert(key, record);
    }
    Ok(Ok(placed))
}

/// Writes merged chunk records; when one is left with fewer replicas than it
/// wants, bumps `meta/chunks_short` so that the leader's repair loop looks again.
pub(super) fn write_placed(
    txn: &mut Txn<'_>,
    placed: BTreeMap<Vec<u8>, ChunkRecord>,
) -> Result<(), StoreError> {
    if placed
        .values()
        .any(|r| r.workers.len() < r.replicas as usize)
    {
        bump_counter(txn, keys::CHUNKS_SHORT)?;
    }
    for (key, record) in placed {
        txn.put(key, record.encode_to_vec());
    }
    Ok(())
}

/// Checks one file of a manifest: its path, and that each chunk is well named, has
/// a replica (placed by this command or recorded), and that the sizes add up.
pub(super) fn check_file(
    txn: &Txn<'_>,
    placed: &BTreeMap<Vec<u8>, ChunkRecord>,
    file: &ArtifactFile,
) -> Result<Result<(), Rejection>, StoreError> {
    if let Err(reason) = validate_path(&file.path) {
        return Ok(Err(reason));
    }
    let mut file_size = 0u64;
    for chunk in &file.chunks {
        if chunk.id.len() != 32 {
            return Ok(Err(format!(
                "file {} names a chunk id of {} bytes",
                file.path,
                chunk.id.len()
            )));
        }
        let key = keys::chunk(&chunk.id);
        let has_replica = match placed.get(&key) {
            Some(record) => !record.workers.is_empty(),
            None => read_record::<ChunkRecord>(txn, &key, "decode chunk record")?
                .is_some_and(|r| !r.workers.is_empty()),
        };
        if !has_replica {
            return Ok(Err(format!(
                "chunk {} of {} has no replica on any worker; push it first",
                hex::encode(&chunk.id),
                file.path
            )));
        }
        file_size = file_size.saturating_add(chunk.size);
    }
    if file_size != file.size {
        return Ok(Err(format!(
            "file {} is {} bytes but its chunks add up to {file_size}",
            file.path, file.size
        )));
    }
    Ok(Ok(()))
}

/// Counts one more (`up`) or one fewer reference on each distinct chunk of `ids`,
/// in `placed` (records are read into it when absent); the caller writes `placed`.
pub(super) fn count_refs<'i>(
    txn: &Txn<'_>,
    placed: &mut BTreeMap<Vec<u8>, ChunkRecord>,
    ids: impl Iterator<Item = &'i [u8]>,
    up: bool,
) -> Result<(), StoreError> {
    let distinct: BTreeSet<&[u8]> = ids.collect();
    for id in distinct {
        let key = keys::chunk(id);
        let record = match placed.remove(&key) {
            Some(record) => record,
            None => {
                read_record::<ChunkRecord>(txn, &key, "decode chunk record")?.unwrap_or_default()
            }
        };
        let refs = if up {
            record.refs + 1
        } else {
            record.refs.saturating_sub(1)
        };
        placed.insert(key, ChunkRecord { refs, ..record });
    }
    Ok(())
}

/// Records replicas of chunks (a push batch, a repair).
pub fn apply_add_replicas(
    txn: &mut Txn<'_>,
    add: &AddChunkReplicas,
    now_ms: u64,
) -> Result<Result<u64, Rejection>, StoreError> {
    let placed = match merge_placements(txn, &add.placements, add.replicas, now_ms)? {
        Ok(placed) => placed,
        Err(reason) => return Ok(Err(reason)),
    };
    write_placed(txn, placed)?;
    Ok(Ok(0))
}

/// Forgets one worker's replicas of chunks (it found them corrupt and dropped them).
pub fn apply_drop_replicas(
    txn: &mut Txn<'_>,
    drop: &DropChunkReplicas,
) -> Result<Result<u64, Rejection>, StoreError> {
    let mut dropped = false;
    for id in &drop.ids {
        let key = keys::chunk(id);
        if let Some(mut record) = read_record::<ChunkRecord>(txn, &key, "decode chunk record")? {
            let before = record.workers.len();
            record.workers.retain(|w| *w != drop.worker_id);
            dropped |= record.workers.len() < before;
            txn.put(key, record.encode_to_vec());
        }
    }
    if dropped {
        bump_counter(txn, keys::CHUNKS_SHORT)?;
    }
    Ok(Ok(0))
}

/// Forgets chunk records (garbage collection); returns how many. A chunk that a
/// version lists is kept, whatever the proposer believed: a push may have
/// committed since it looked.
pub fn apply_delete_records(
    txn: &mut Txn<'_>,
    delete: &DeleteChunkRecords,
) -> Result<Result<u64, Rejection>, StoreError> {
    let mut deleted = 0;
    for id in &delete.ids {
        let key = keys::chunk(id);
        match read_record::<ChunkRecord>(txn, &key, "decode chunk record")? {
            Some(record) if record.refs == 0 => {
                txn.delete(key);
                deleted += 1;
            }
            _ => {}
        }
    }
    Ok(Ok(deleted))
}

/// Applies a commit; returns the new version number.
pub fn apply_commit(
    txn: &mut Txn<'_>,
    commit: &CommitArtifact,
    now_ms: u64,
    who: &str,
) -> Result<Result<u64, Rejection>, StoreError> {
    let Some(version) = &commit.version else {
        return Ok(Err("commit_artifact without a version".into()));
    };
    let name = version.name.as_str();
    if let Err(e) = validate_name(name) {
        return Ok(Err(e.to_string()));
    }
    for tag in &commit.tags {
        if let Err(e) = validate_tag(tag) {
            return Ok(Err(e.to_string()));
        }
    }
    for parent in &version.parents {
        let found = match kiln_common::artifact::parse_reference(parent) {
            Ok((parent_name, Selector::Version(v))) => {
                resolve(txn, &parent_name, &Selector::Version(v))?.is_some()
            }
            _ => {
                return Ok(Err(format!(
                    "parent '{parent}' must be NAME@VERSION with a version number"
                )))
            }
        };
        if !found {
            return Ok(Err(format!("parent {parent} does not exist")));
        }
    }

    // The replicas this push placed, merged with what is recorded.
    let placed = match merge_placements(txn, &commit.placements, version.replicas, now_ms)? {
        Ok(placed) => placed,
        Err(reason) => return Ok(Err(reason)),
    };

    // Every chunk of every file has a replica; sizes add up; paths are unique.
    let mut paths = BTreeSet::new();
    let mut total = 0u64;
    for file in &version.files {
        if let Err(reason) = check_file(txn, &placed, file)? {
            return Ok(Err(reason));
        }
        if !paths.insert(file.path.as_str()) {
            return Ok(Err(format!("file {} is listed twice", file.path)));
        }
        total = total.saturating_add(file.size);
    }
    if total != version.size {
        return Ok(Err(format!(
            "the version is {} bytes but its files add up to {total}",
            version.size
        )));
    }
    if !version.directory && version.files.len() != 1 {
        return Ok(Err(format!(
            "a single-file version lists {} files",
            version.files.len()
        )));
    }

    let number = read_counter(txn, &keys::artifact_latest(name))? + 1;
    let mut record = version.clone();
    record.version = number;
    record.created_at_ms = now_ms;
    record.created_by = who.to_string();
    record.tags.clear();
    let encoded = record.encode_to_vec();
    if encoded.len() > keys::MAX_MANIFEST_BYTES {
        return Ok(Err(format!(
            "the manifest is {} bytes; at most {} fit in one version",
            encoded.len(),
            keys::MAX_MANIFEST_BYTES
        )));
    }

    // Checked: now write. Each chunk the version lists counts one more reference.
    bump_counter(txn, &keys::artifact_latest(name))?;
    txn.put(keys::artifact_version(name, number), encoded);
    let mut placed = placed;
    let listed = version
        .files
        .iter()
        .flat_map(|f| f.chunks.iter().map(|c| c.id.as_slice()));
    count_refs(txn, &mut placed, listed, true)?;
    write_placed(txn, placed)?;
    for tag in &commit.tags {
        txn.put(keys::artifact_tag(name, tag), number.to_be_bytes().to_vec());
    }
    Ok(Ok(number))
}

/// Points a tag at an existing version; returns the version.
pub fn apply_tag(
    txn: &mut Txn<'_>,
    set: &SetArtifactTag,
) -> Result<Result<u64, Rejection>, StoreError> {
    if let Err(e) = validate_name(&set.name).and_then(|()| validate_tag(&set.tag)) {
        return Ok(Err(e.to_string()));
    }
    if resolve(txn, &set.name, &Selector::Version(set.version))?.is_none() {
        return Ok(Err(format!("{}@{} does not exist", set.name, set.version)));
    }
    txn.put(
        keys::artifact_tag(&set.name, &set.tag),
        set.version.to_be_bytes().to_vec(),
    );
    Ok(Ok(set.version))
}

/// Returns the manifest of `name@version`.
pub fn read_version(
    state: &dyn StateRead,
    name: &str,
    version: u64,
) -> Result<Option<ArtifactVersion>, StoreError> {
    read_record(
        state,
        &keys::artifact_version(name, version),
        "decode artifact version",
    )
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::state::machine::apply_command;
    use kiln_proto::v1::{
        command, ArtifactFile, ChunkPlacement, ChunkRef, Command, RegisterWorker, WorkerRecord,
    };

    use crate::state::machine::testing::Empty;

    fn cmd(kind: command::Kind) -> Command {
        Command {
            proposed_at_ms: 5,
            audit: None,
            kind: Some(kind),
        }
    }

    fn commit(name: &str, chunks: &[(u8, u64)], placed_on: &[&str]) -> command::Kind {
        let refs: Vec<ChunkRef> = chunks
            .iter()
            .map(|(b, size)| ChunkRef {
                id: vec![*b; 32],
                size: *size,
            })
            .collect();
        let size = chunks.iter().map(|(_, s)| s).sum();
        command::Kind::CommitArtifact(CommitArtifact {
            version: Some(ArtifactVersion {
                name: name.into(),
                size,
                files: vec![ArtifactFile {
                    path: "data.csv".into(),
                    size,
                    chunks: refs,
                    ..Default::default()
                }],
                ..Default::default()
            }),
            placements: chunks
                .iter()
                .filter(|_| !placed_on.is_empty())
                .map(|(b, size)| ChunkPlacement {
                    id: vec![*b; 32],
                    size: *size,
                    workers: placed_on.iter().map(|w| w.to_string()).collect(),
                })
                .collect(),
            tags: vec!["prod".into()],
        })
    }

    fn register_w1(txn: &mut Txn<'_>) {
        let register = command::Kind::RegisterWorker(RegisterWorker {
            worker: Some(WorkerRecord {
                id: "w1".into(),
                ..Default::default()
            }),
        });
        apply_command(txn, &cmd(register))
            .expect("io")
            .expect("registered");
    }

    #[test]
    fn commits_number_versions_and_need_replicas() {
        let base = Empty;
        let mut txn = Txn::new(&base);
        register_w1(&mut txn);

        let unplaced = apply_command(&mut txn, &cmd(commit("iris", &[(1, 10)], &[]))).expect("io");
        assert!(unplaced.expect_err("no replica").contains("no replica"));
        let unknown =
            apply_command(&mut txn, &cmd(commit("iris", &[(1, 10)], &["w9"]))).expect("io");
        assert!(unknown
            .expect_err("unknown worker")
            .contains("not registered"));
        assert!(
            txn.get(&keys::artifact_latest("iris"))
                .expect("io")
                .is_none(),
            "a rejected commit writes nothing"
        );

        let v1 = apply_command(&mut txn, &cmd(commit("iris", &[(1, 10), (2, 5)], &["w1"])))
            .expect("io")
            .expect("committed");
        assert_eq!(v1, 1);
        // The same chunks again need no placement: they have replicas now.
        let v2 = apply_command(&mut txn, &cmd(commit("iris", &[(2, 5), (1, 10)], &[])))
            .expect("io")
            .expect("committed");
        assert_eq!(v2, 2);
        assert_eq!(
            resolve(&txn, "iris", &Selector::Tag("prod".into())).expect("io"),
            Some(2)
        );
        assert_eq!(
            resolve(&txn, "iris", &Selector::Latest).expect("io"),
            Some(2)
        );
        assert_eq!(
            resolve(&txn, "iris", &Selector::Version(3)).expect("io"),
            None
        );
        let stored = read_version(&txn, "iris", 1).expect("io").expect("v1");
        assert_eq!(stored.created_at_ms, 5);
        assert_eq!(stored.size, 15);

        let retag = command::Kind::SetArtifactTag(SetArtifactTag {
            name: "iris".into(),
            tag: "prod".into(),
            version: 1,
        });
        apply_command(&mut txn, &cmd(retag))
            .expect("io")
            .expect("tagged");
        assert_eq!(
            resolve(&txn, "iris", &Selector::Tag("prod".into())).expect("io"),
            Some(1)
        );
    }

    #[test]
    fn bad_manifests_are_rejected() {
        let base = Empty;
        let mut txn = Txn::new(&base);
        register_w1(&mut txn);
        let mut bad_size = commit("a", &[(1, 10)], &["w1"]);
        if let command::Kind::CommitArtifact(c) = &mut bad_size {
            c.version.as_mut().expect("v").files[0].size = 11;
        }
        let e = apply_command(&mut txn, &cmd(bad_size)).expect("io");
        assert!(e.expect_err("bad size").contains("add up"));
        let mut twice = commit("a", &[(1, 10)], &["w1"]);
        if let command::Kind::CommitArtifact(c) = &mut twice {
            let v = c.version.as_mut().expect("v");
            v.directory = true;
            v.files.push(v.files[0].clone());
            v.size *= 2;
        }
        let e = apply_command(&mut txn, &cmd(twice)).expect("io");
        assert!(e.expect_err("listed twice").contains("twice"));
        let mut orphan = commit("a", &[(1, 10)], &["w1"]);
        if let command::Kind::CommitArtifact(c) = &mut orphan {
            c.version.as_mut().expect("v").parents = vec!["b@1".into()];
        }
        let e = apply_command(&mut txn, &cmd(orphan)).expect("io");
        assert!(e.expect_err("no parent").contains("does not exist"));
        for path in ["/etc/passwd", "../x", "a//b", ""] {
            assert!(validate_path(path).is_err(), "{path}");
        }
        assert!(validate_path("dir/file.csv").is_ok());
    }

    #[test]
    fn only_chunks_no_version_lists_are_collected() {
        let base = Empty;
        let mut txn = Txn::new(&base);
        register_w1(&mut txn);
        // Chunk 1 is recorded by a push batch, chunk 2 too, but only chunk 1 is
        // listed by a committed version.
        let add = command::Kind::AddChunkReplicas(AddChunkReplicas {
            placements: [1u8, 2u8]
                .iter()
                .map(|b| ChunkPlacement {
                    id: vec![*b; 32],
                    size: 10,
                    workers: vec!["w1".into()],
                })
                .collect(),
            replicas: 2,
        });
        apply_command(&mut txn, &cmd(add))
            .expect("io")
            .expect("recorded");
        apply_command(&mut txn, &cmd(commit("m", &[(1, 10)], &[])))
            .expect("io")
            .expect("committed");
        let record = |txn: &Txn<'_>, b: u8| {
            read_record::<ChunkRecord>(txn, &keys::chunk(&[b; 32]), "chunk").expect("io")
        };
        assert_eq!(record(&txn, 1).expect("chunk 1").refs, 1);
        assert_eq!(record(&txn, 2).expect("chunk 2").refs, 0);
        assert_eq!(record(&txn, 2).expect("chunk 2").replicas, 2);
        assert_eq!(record(&txn, 2).expect("chunk 2").created_at_ms, 5);

        let delete = command::Kind::DeleteChunkRecords(DeleteChunkRecords {
            ids: vec![vec![1; 32], vec![2; 32]],
        });
        let deleted = apply_command(&mut txn, &cmd(delete))
            .expect("io")
            .expect("applied");
        assert_eq!(deleted, 1, "the listed chunk is kept");
        assert!(record(&txn, 1).is_some());
        assert!(record(&txn, 2).is_none());

        let drop = command::Kind::DropChunkReplicas(DropChunkReplicas {
            worker_id: "w1".into(),
            ids: vec![vec![1; 32]],
        });
        apply_command(&mut txn, &cmd(drop))
            .expect("io")
            .expect("applied");
        assert!(record(&txn, 1).expect("chunk 1").workers.is_empty());
    }
}
