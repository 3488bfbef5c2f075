//! The storage conformance suite: every [`RaftStore`] passes the same tests, so
//! the in-memory store used for simulation and the RocksDB store agree.

use raft::eraftpb::{ConfState, Entry, HardState, SnapshotMetadata};
use raft::{GetEntriesContext, RawNode, Storage, StorageError};

use super::storage::{ApplyBatch, MemStore, RaftStore, RocksStore, KEY_APPLIED};
use kiln_proto::v1::AppliedState;

/// Creates stores and reopens them as after a crash.
trait Harness {
    type Store: RaftStore;
    fn create(&mut self) -> Self::Store;
    /// Drops `store` without any further write and opens what is durable.
    fn crash_and_reopen(&mut self, store: Self::Store) -> Self::Store;
}

struct Mem;
impl Harness for Mem {
    type Store = MemStore;
    fn create(&mut self) -> MemStore {
        MemStore::new()
    }
    fn crash_and_reopen(&mut self, store: MemStore) -> MemStore {
        store.reopen()
    }
}

struct Rocks {
    dirs: Vec<tempfile::TempDir>,
}
impl Harness for Rocks {
    type Store = RocksStore;
    fn create(&mut self) -> RocksStore {
        let dir = tempfile::tempdir().expect("temp dir");
        let store = RocksStore::open(dir.path()).expect("open rocks store");
        self.dirs.push(dir);
        store
    }
    fn crash_and_reopen(&mut self, store: RocksStore) -> RocksStore {
        let path = store.dir_path();
        drop(store);
        RocksStore::open(&path).expect("reopen rocks store")
    }
}

fn entry(index: u64, term: u64) -> Entry {
    Entry {
        index,
        term,
        data: format!("e{index}t{term}").into_bytes(),
        ..Default::default()
    }
}

fn entries<S: Storage>(s: &S, low: u64, high: u64) -> Vec<(u64, u64)> {
    s.entries(low, high, None, GetEntriesContext::empty(false))
        .expect("entries")
        .iter()
        .map(|e| (e.index, e.term))
        .collect()
}

fn hs(term: u64, vote: u64, commit: u64) -> HardState {
    HardState { term, vote, commit }
}

fn bootstrap<S: RaftStore>(s: &mut S, voters: Vec<u64>) {
    let mut meta = SnapshotMetadata {
        index: 1,
        term: 1,
        ..Default::default()
    };
    meta.set_conf_state(ConfState {
        voters,
        ..Default::default()
    });
    s.install_snapshot(&meta, None, &mut std::iter::empty())
        .expect("bootstrap");
}

fn run_suite<H: Harness>(mut h: H) {
    empty_store_is_truncated_at_zero(&mut h);
    append_truncates_conflicting_tail(&mut h);
    persist_survives_reopen(&mut h);
    crash_between_append_and_hard_state(&mut h);
    compaction_keeps_term_of_truncation_point(&mut h);
    snapshot_install_replaces_log_and_state(&mut h);
    apply_moves_applied_with_effects(&mut h);
    append_refuses_gaps(&mut h);
    snapshot_writes_its_hard_state_in_the_same_batch(&mut h);
}

/// A follower at term 3 that voted for 2 is sent a snapshot by the leader of term
/// 6: whatever the crash, it never wakes with the new state and its old vote
/// under the new term (a vote it never cast).
fn snapshot_writes_its_hard_state_in_the_same_batch<H: Harness>(h: &mut H) {
    let snapshot = |term| {
        let mut meta = SnapshotMetadata {
            index: 20,
            term,
            ..Default::default()
        };
        meta.set_conf_state(ConfState {
            voters: vec![1, 2, 3],
            ..Default::default()
        });
        meta
    };
    // With the Ready's hard state: it is what a crash right after finds, with the
    // commit index where the log now ends (the Ready's entries past the snapshot
    // are persisted after it).
    let mut s = h.create();
    bootstrap(&mut s, vec![1, 2, 3]);
    s.persist(&[], Some(&hs(3, 2, 1)))
        .expect("persist the vote");
    s.install_snapshot(&snapshot(5), Some(&hs(6, 0, 25)), &mut std::iter::empty())
        .expect("install");
    let s = h.crash_and_reopen(s);
    assert_eq!(s.initial_state().expect("state").hard_state, hs(6, 0, 20));

    // Without one (bootstrap, older callers): a newer term drops the old vote.
    let mut s = h.create();
    bootstrap(&mut s, vec![1, 2, 3]);
    s.persist(&[], Some(&hs(3, 2, 1)))
        .expect("persist the vote");
    s.install_snapshot(&snapshot(5), None, &mut std::iter::empty())
        .expect("install");
    let s = h.crash_and_reopen(s);
    assert_eq!(s.initial_state().expect("state").hard_state, hs(5, 0, 20));
}

fn empty_store_is_truncated_at_zero<H: Harness>(h: &mut H) {
    let s = h.create();
    assert_eq!(s.first_index().expect("first"), 1);
    assert_eq!(s.last_index().expect("last"), 0);
    assert_eq!(s.term(0).expect("term 0"), 0);
    let st = s.initial_state().expect("initial state");
    assert_eq!(st.hard_state, HardState::default());
    drop(s);
}

fn append_truncates_conflicting_tail<H: Harness>(h: &mut H) {
    let mut s = h.create();
    bootstrap(&mut s, vec![1]);
    s.append(&[entry(2, 1), entry(3, 1), entry(4, 1), entry(5, 1)])
        .expect("append");
    // A new leader overwrites from index 3 with a shorter, newer tail.
    s.append(&[entry(3, 2), entry(4, 2)]).expect("overwrite");
    assert_eq!(s.last_index().expect("last"), 4);
    assert_eq!(entries(&s, 2, 5), vec![(2, 1), (3, 2), (4, 2)]);
    assert!(matches!(
        s.term(5),
        Err(raft::Error::Store(StorageError::Unavailable))
    ));
    let s = h.crash_and_reopen(s);
    assert_eq!(entries(&s, 2, 5), vec![(2, 1), (3, 2), (4, 2)]);
    assert_eq!(s.last_index().expect("last"), 4);
}

fn persist_survives_reopen<H: Harness>(h: &mut H) {
    let mut s = h.create();
    bootstrap(&mut s, vec![1, 2, 3]);
    s.persist(&[entry(2, 3), entry(3, 3)], Some(&hs(3, 2, 3)))
        .expect("persist");
    let s = h.crash_and_reopen(s);
    let st = s.initial_state().expect("state");
    assert_eq!(st.hard_state, hs(3, 2, 3));
    assert_eq!(st.conf_state.voters, vec![1, 2, 3]);
    assert_eq!(entries(&s, 2, 4), vec![(2, 3), (3, 3)]);
}

fn crash_between_append_and_hard_state<H: Harness>(h: &mut H) {
    let mut s = h.create();
    bootstrap(&mut s, vec![1]);
    s.set_hard_state(&hs(2, 1, 1)).expect("hard state");
    s.append(&[entry(2, 2), entry(3, 2)]).expect("append");
    // Crash here: the entries are durable, the hard state that would commit them is not.
    let s = h.crash_and_reopen(s);
    let st = s.initial_state().expect("state");
    assert_eq!(
        st.hard_state,
        hs(2, 1, 1),
        "hard state is the one written before the crash"
    );
    assert_eq!(s.last_index().expect("last"), 3, "appended entries survive");
    // A Raft node restarts from it: nothing beyond the durable commit is applied.
    let config = raft::Config {
        id: 1,
        applied: 1,
        ..Default::default()
    };
    let logger = slog::Logger::root(slog::Discard, slog::o!());
    let mut node = RawNode::new(&config, s, &logger).expect("raft restarts");
    assert_eq!(node.raft.raft_log.committed, 1);
    assert_eq!(node.raft.raft_log.last_index(), 3);
    assert_eq!(node.raft.term, 2);
    let ready = node.ready();
    assert!(ready.committed_entries().is_empty());
}

fn compaction_keeps_term_of_truncation_point<H: Harness>(h: &mut H) {
    let mut s = h.create();
    bootstrap(&mut s, vec![1]);
    s.append(&[entry(2, 1), entry(3, 2), entry(4, 2), entry(5, 3)])
        .expect("append");
    // Compaction needs the entries applied first.
    assert!(s.compact(4).is_err());
    s.apply(&ApplyBatch {
        applied: AppliedState { index: 4, term: 2 },
        ..Default::default()
    })
    .expect("apply");
    s.compact(3).expect("compact");
    let s = h.crash_and_reopen(s);
    assert_eq!(s.first_index().expect("first"), 4);
    assert_eq!(s.term(3).expect("term of truncation point"), 2);
    assert!(matches!(
        s.term(2),
        Err(raft::Error::Store(StorageError::Compacted))
    ));
    assert!(matches!(
        s.entries(3, 5, None, GetEntriesContext::empty(false)),
        Err(raft::Error::Store(StorageError::Compacted))
    ));
    assert_eq!(entries(&s, 4, 6), vec![(4, 2), (5, 3)]);
}

fn snapshot_install_replaces_log_and_state<H: Harness>(h: &mut H) {
    let mut s = h.create();
    bootstrap(&mut s, vec![1]);
    s.append(&[entry(2, 1), entry(3, 1)]).expect("append");
    let mut batch = ApplyBatch {
        applied: AppliedState { index: 2, term: 1 },
        ..Default::default()
    };
    batch.writes.insert(b"kv/old".to_vec(), Some(b"1".to_vec()));
    s.apply(&batch).expect("apply");
    let mut meta = SnapshotMetadata {
        index: 10,
        term: 4,
        ..Default::default()
    };
    meta.set_conf_state(ConfState {
        voters: vec![1, 2, 3],
        learners: vec![4],
        ..Default::default()
    });
    let mut pairs = vec![
        Ok((b"kv/new".to_vec(), b"2".to_vec())),
        Ok((KEY_APPLIED.to_vec(), b"ignored".to_vec())),
    ]
    .into_iter();
    s.install_snapshot(&meta, None, &mut pairs)
        .expect("install");
    let s = h.crash_and_reopen(s);
    assert_eq!(s.first_index().expect("first"), 11);
    assert_eq!(s.last_index().expect("last"), 10);
    assert_eq!(s.term(10).expect("term"), 4);
    assert_eq!(s.applied(), AppliedState { index: 10, term: 4 });
    assert_eq!(s.get(b"kv/old").expect("get"), None);
    assert_eq!(s.get(b"kv/new").expect("get"), Some(b"2".to_vec()));
    let st = s.initial_state().expect("state");
    assert_eq!(st.conf_state.voters, vec![1, 2, 3]);
    assert_eq!(st.conf_state.learners, vec![4]);
    assert!(st.hard_state.commit >= 10 && st.hard_state.term >= 4);
}

fn apply_moves_applied_with_effects<H: Harness>(h: &mut H) {
    let mut s = h.create();
    bootstrap(&mut s, vec![1]);
    s.append(&[entry(2, 1)]).expect("append");
    let mut batch = ApplyBatch {
        applied: AppliedState { index: 2, term: 1 },
        conf_state: Some(ConfState {
            voters: vec![1, 2],
            ..Default::default()
        }),
        ..Default::default()
    };
    batch.writes.insert(b"kv/a".to_vec(), Some(b"x".to_vec()));
    batch.writes.insert(b"kv/b".to_vec(), None);
    s.apply(&batch).expect("apply");
    let s = h.crash_and_reopen(s);
    assert_eq!(s.applied(), AppliedState { index: 2, term: 1 });
    assert_eq!(s.get(b"kv/a").expect("get"), Some(b"x".to_vec()));
    assert_eq!(
        s.initial_state().expect("state").conf_state.voters,
        vec![1, 2]
    );
}

fn append_refuses_gaps<H: Harness>(h: &mut H) {
    let mut s = h.create();
    bootstrap(&mut s, vec![1]);
    assert!(
        s.append(&[entry(5, 1)]).is_err(),
        "a gap in the log is refused"
    );
    assert!(
        s.append(&[entry(1, 1)]).is_err(),
        "an entry inside the snapshot is refused"
    );
    assert_eq!(s.last_index().expect("last"), 1);
}

#[test]
fn mem_store_conforms() {
    run_suite(Mem);
}

#[test]
fn rocks_store_conforms() {
    run_suite(Rocks { dirs: Vec::new() });
}
