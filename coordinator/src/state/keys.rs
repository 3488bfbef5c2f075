//! Layout of the state machine's key space (column family `state`).
//!
//! ```text
//! \0applied        AppliedState (written with every batch)
//! kv/<key>         user bytes of the small key-value namespace
//! worker/<id>      WorkerRecord
//! member/<id:020>  MemberRecord of a coordinator
//! token/<name>     TokenRecord (salt and hash, never the secret)
//! ```

/// Prefix of the key-value namespace.
pub const KV: &str = "kv/";
/// Prefix of worker records.
pub const WORKER: &str = "worker/";
/// Prefix of coordinator member records.
pub const MEMBER: &str = "member/";
/// Prefix of bearer token records (salted hashes only).
pub const TOKEN: &str = "token/";

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
