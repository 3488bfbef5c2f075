//! Layout of the state machine's key space (column family `state`).
//!
//! ```text
//! \0applied        AppliedState (written with every batch)
//! kv/<key>         user bytes of the small key-value namespace
//! worker/<id>      WorkerRecord
//! member/<id:020>  MemberRecord of a coordinator
//! token/<name>     TokenRecord (salt and hash, never the secret)
//! audit/<seq:020>  AuditRecord; meta/audit_seq holds the last seq
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

/// Prefix of bearer token records (salted hashes only).
pub const TOKEN: &str = "token/";
/// Counts changes to the token records, so that workers know when to refresh.
pub const TOKENS_VERSION: &[u8] = b"meta/tokens_version";

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
