//! Applying model registrations: each registration of a name is its next version.
//!
//! Keys (see `keys`): `model_head/<name>` holds the newest version number (listing
//! scans these), `model/<name>/v/<ver:020>` each [`ModelVersion`].

use kiln_proto::v1::{ModelVersion, RegisterModel, SetModelAlias};
use prost::Message;

use super::artifacts::read_record;
use super::keys;
use super::machine::{read_counter, Rejection, StateRead, Txn};
use crate::raft::storage::StoreError;

/// Returns version `version` of model `name`.
pub fn read_model(
    state: &dyn StateRead,
    name: &str,
    version: u64,
) -> Result<Option<ModelVersion>, StoreError> {
    read_record(
        state,
        &keys::model_version(name, version),
        "decode model version",
    )
}

/// Returns the newest version number of model `name` (0: none).
pub fn latest(state: &dyn StateRead, name: &str) -> Result<u64, StoreError> {
    read_counter(state, &keys::model_latest(name))
}

/// Registers the next version of a model; returns its number.
pub fn apply_register(
    txn: &mut Txn<'_>,
    register: &RegisterModel,
    now_ms: u64,
    who: &str,
) -> Result<Result<u64, Rejection>, StoreError> {
    let Some(model) = &register.model else {
        return Ok(Err("register_model without a model".into()));
    };
    if let Err(e) = kiln_common::artifact::validate_name(&model.name) {
        return Ok(Err(format!("model name: {e}")));
    }
    if model.artifact.is_empty() {
        return Ok(Err(format!("model {} names no artifact", model.name)));
    }
    let version = latest(txn, &model.name)? + 1;
    let record = ModelVersion {
        version,
        created_at_ms: now_ms,
        created_by: who.to_string(),
        ..model.clone()
    };
    txn.put(
        keys::model_version(&model.name, version),
        record.encode_to_vec(),
    );
    txn.put(
        keys::model_latest(&model.name),
        version.to_be_bytes().to_vec(),
    );
    Ok(Ok(version))
}

/// Returns the version alias `alias` of model `name` names (0: none).
pub fn alias(state: &dyn StateRead, name: &str, alias: &str) -> Result<u64, StoreError> {
    read_counter(state, &keys::model_alias(name, alias))
}

/// Points an alias at a version (version 0 removes it); the version must exist.
pub fn apply_set_alias(
    txn: &mut Txn<'_>,
    set: &SetModelAlias,
) -> Result<Result<u64, Rejection>, StoreError> {
    if let Err(e) = kiln_common::artifact::validate_tag(&set.alias) {
        return Ok(Err(format!("alias: {e}")));
    }
    let key = keys::model_alias(&set.name, &set.alias);
    if set.version == 0 {
        txn.delete(key);
        return Ok(Ok(0));
    }
    if read_model(txn, &set.name, set.version)?.is_none() {
        return Ok(Err(format!(
            "NOT_FOUND: {}@{} does not exist",
            set.name, set.version
        )));
    }
    txn.put(key, set.version.to_be_bytes().to_vec());
    Ok(Ok(set.version))
}
