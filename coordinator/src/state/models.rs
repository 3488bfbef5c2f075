//! Applying model registrations: each registration of a name is its next version.
//!
//! Keys (see `keys`): `model_head/<name>` holds the newest version number (listing
//! scans these), `model/<name>/v/<ver:020>` each [`ModelVersion`], and
//! `registered_model/<name>` a [`RegisteredModel`]'s description and tags once
//! MLflow's registry API set them (or made the model before any version).
//!
//! Rejections that MLflow's REST API maps start with its error code
//! (`RESOURCE_DOES_NOT_EXIST:`, ...).

use kiln_proto::v1::{
    CreateRegisteredModel, DeleteRegisteredModel, ModelVersion, RegisterModel, RegisteredModel,
    RenameRegisteredModel, SetModelAlias, UpdateModelVersion, UpdateRegisteredModel,
};
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
    if model.artifact.is_empty() && model.undeployable.is_empty() {
        return Ok(Err(format!("model {} names no artifact", model.name)));
    }
    if register.require_registered && !model_exists(txn, &model.name)? {
        return Ok(missing_model(&model.name));
    }
    let version = latest(txn, &model.name)? + 1;
    let record = ModelVersion {
        version,
        created_at_ms: now_ms,
        updated_at_ms: now_ms,
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

/// Most versions a rename, delete or head search walks.
pub const MAX_MODEL_VERSIONS: u64 = 100_000;

/// Returns a model's own record.
pub fn read_registered(
    state: &dyn StateRead,
    name: &str,
) -> Result<Option<RegisteredModel>, StoreError> {
    read_record(
        state,
        &keys::registered_model(name),
        "decode registered model",
    )
}

/// Says whether a model exists: it has a record or a version.
pub fn model_exists(state: &dyn StateRead, name: &str) -> Result<bool, StoreError> {
    Ok(state.read(&keys::registered_model(name))?.is_some() || latest(state, name)? > 0)
}

fn missing_model<T>(name: &str) -> Result<T, Rejection> {
    Err(format!(
        "RESOURCE_DOES_NOT_EXIST: registered model {name} does not exist"
    ))
}

/// Creates a registered model without versions.
pub fn apply_create_registered(
    txn: &mut Txn<'_>,
    create: &CreateRegisteredModel,
    now_ms: u64,
) -> Result<Result<u64, Rejection>, StoreError> {
    let Some(model) = &create.model else {
        return Ok(Err("create_registered_model without a model".into()));
    };
    if let Err(e) = kiln_common::artifact::validate_name(&model.name) {
        return Ok(Err(format!("INVALID_PARAMETER_VALUE: model name: {e}")));
    }
    if model_exists(txn, &model.name)? {
        return Ok(Err(format!(
            "RESOURCE_ALREADY_EXISTS: registered model {} exists already",
            model.name
        )));
    }
    let record = RegisteredModel {
        created_at_ms: now_ms,
        updated_at_ms: now_ms,
        ..model.clone()
    };
    txn.put(keys::registered_model(&model.name), record.encode_to_vec());
    Ok(Ok(0))
}

/// Returns a model's record, or for a model known by its versions alone one made
/// from their times (first created, newest changed); None when it does not exist.
pub fn record_or_default(
    state: &dyn StateRead,
    name: &str,
) -> Result<Option<RegisteredModel>, StoreError> {
    if let Some(record) = read_registered(state, name)? {
        return Ok(Some(record));
    }
    let newest = latest(state, name)?;
    let Some(last) = read_model(state, name, newest)? else {
        return Ok(None);
    };
    let first = (1..newest)
        .find_map(|v| read_model(state, name, v).ok().flatten())
        .unwrap_or_else(|| last.clone());
    Ok(Some(RegisteredModel {
        name: name.to_string(),
        created_at_ms: first.created_at_ms,
        updated_at_ms: last.updated_at_ms.max(last.created_at_ms),
        ..Default::default()
    }))
}

/// Changes a registered model's description or tags.
pub fn apply_update_registered(
    txn: &mut Txn<'_>,
    update: &UpdateRegisteredModel,
    now_ms: u64,
) -> Result<Result<u64, Rejection>, StoreError> {
    let Some(mut record) = record_or_default(txn, &update.name)? else {
        return Ok(missing_model(&update.name));
    };
    if update.set_description {
        record.description = update.description.clone();
    }
    for (k, v) in &update.set_tags {
        record.tags.insert(k.clone(), v.clone());
    }
    for k in &update.delete_tags {
        record.tags.remove(k);
    }
    record.updated_at_ms = now_ms;
    txn.put(keys::registered_model(&update.name), record.encode_to_vec());
    Ok(Ok(0))
}

/// Checks that the versions a proposer listed are still the model's: the newest
/// is the highest listed, and each listed one exists.
fn check_listed(
    txn: &Txn<'_>,
    name: &str,
    versions: &[u64],
) -> Result<Result<(), Rejection>, StoreError> {
    let newest = latest(txn, name)?;
    let highest = versions.iter().copied().max().unwrap_or(0);
    if newest != highest {
        return Ok(Err(format!(
            "RESOURCE_CONFLICT: model {name} changed meanwhile (its newest version is {newest}); try again"
        )));
    }
    for v in versions {
        if read_model(txn, name, *v)?.is_none() {
            return Ok(Err(format!(
                "RESOURCE_CONFLICT: {name}@{v} changed meanwhile; try again"
            )));
        }
    }
    Ok(Ok(()))
}

/// Moves a model's record, versions and aliases to a new name.
pub fn apply_rename(
    txn: &mut Txn<'_>,
    rename: &RenameRegisteredModel,
    now_ms: u64,
) -> Result<Result<u64, Rejection>, StoreError> {
    let (old, new) = (rename.name.as_str(), rename.new_name.as_str());
    let Some(mut record) = record_or_default(txn, old)? else {
        return Ok(missing_model(old));
    };
    if let Err(e) = kiln_common::artifact::validate_name(new) {
        return Ok(Err(format!("INVALID_PARAMETER_VALUE: model name: {e}")));
    }
    if model_exists(txn, new)? {
        return Ok(Err(format!(
            "RESOURCE_ALREADY_EXISTS: registered model {new} exists already"
        )));
    }
    if let Err(e) = check_listed(txn, old, &rename.versions)? {
        return Ok(Err(e));
    }
    for v in &rename.versions {
        let Some(mut version) = read_model(txn, old, *v)? else {
            continue;
        };
        version.name = new.to_string();
        version.updated_at_ms = now_ms;
        txn.delete(keys::model_version(old, *v));
        txn.put(keys::model_version(new, *v), version.encode_to_vec());
    }
    for a in &rename.aliases {
        let v = alias(txn, old, a)?;
        if v != 0 {
            txn.delete(keys::model_alias(old, a));
            txn.put(keys::model_alias(new, a), v.to_be_bytes().to_vec());
        }
    }
    let newest = latest(txn, old)?;
    txn.delete(keys::model_latest(old));
    if newest > 0 {
        txn.put(keys::model_latest(new), newest.to_be_bytes().to_vec());
    }
    txn.delete(keys::registered_model(old));
    record.name = new.to_string();
    record.updated_at_ms = now_ms;
    txn.put(keys::registered_model(new), record.encode_to_vec());
    Ok(Ok(0))
}

/// Deletes a model with the versions and aliases the proposer listed.
pub fn apply_delete_registered(
    txn: &mut Txn<'_>,
    delete: &DeleteRegisteredModel,
) -> Result<Result<u64, Rejection>, StoreError> {
    let name = delete.name.as_str();
    if !model_exists(txn, name)? {
        return Ok(missing_model(name));
    }
    if let Err(e) = check_listed(txn, name, &delete.versions)? {
        return Ok(Err(e));
    }
    for v in &delete.versions {
        txn.delete(keys::model_version(name, *v));
    }
    for a in &delete.aliases {
        txn.delete(keys::model_alias(name, a));
    }
    txn.delete(keys::model_latest(name));
    txn.delete(keys::registered_model(name));
    Ok(Ok(0))
}

/// Changes a version's description or tags, or deletes it with the aliases listed
/// that point at it; the newest version number moves down past a deleted one.
pub fn apply_update_version(
    txn: &mut Txn<'_>,
    update: &UpdateModelVersion,
    now_ms: u64,
) -> Result<Result<u64, Rejection>, StoreError> {
    let (name, number) = (update.name.as_str(), update.version);
    let Some(mut version) = read_model(txn, name, number)? else {
        return Ok(Err(format!(
            "RESOURCE_DOES_NOT_EXIST: model version {name}/{number} does not exist"
        )));
    };
    if update.delete {
        txn.delete(keys::model_version(name, number));
        for a in &update.aliases {
            if alias(txn, name, a)? == number {
                txn.delete(keys::model_alias(name, a));
            }
        }
        if latest(txn, name)? == number {
            let lowest = number.saturating_sub(MAX_MODEL_VERSIONS).max(1);
            let below = (lowest..number)
                .rev()
                .find(|v| matches!(read_model(txn, name, *v), Ok(Some(_))));
            match below {
                Some(v) => txn.put(keys::model_latest(name), v.to_be_bytes().to_vec()),
                None => txn.delete(keys::model_latest(name)),
            }
        }
        return Ok(Ok(0));
    }
    if update.set_description {
        version.description = update.description.clone();
    }
    for (k, v) in &update.set_tags {
        version.tags.insert(k.clone(), v.clone());
    }
    for k in &update.delete_tags {
        version.tags.remove(k);
    }
    version.updated_at_ms = now_ms;
    txn.put(keys::model_version(name, number), version.encode_to_vec());
    Ok(Ok(0))
}

#[cfg(test)]
mod tests {
    use super::*;
    use kiln_proto::v1::command;

    use crate::state::machine::testing::{apply_at, Empty};

    fn apply(txn: &mut Txn<'_>, kind: command::Kind) -> Result<u64, Rejection> {
        apply_at(txn, 3, kind)
    }

    fn register(name: &str, require: bool) -> command::Kind {
        command::Kind::RegisterModel(RegisterModel {
            model: Some(ModelVersion {
                name: name.into(),
                artifact: format!("{name}-model@1"),
                ..Default::default()
            }),
            require_registered: require,
        })
    }

    fn alias_to(name: &str, alias: &str, version: u64) -> command::Kind {
        command::Kind::SetModelAlias(SetModelAlias {
            name: name.into(),
            alias: alias.into(),
            version,
        })
    }

    #[test]
    fn mlflow_versions_need_their_registered_model_and_kiln_versions_make_it() {
        let base = Empty;
        let mut txn = Txn::new(&base);
        let missing = apply(&mut txn, register("iris", true));
        assert!(missing
            .expect_err("no model")
            .starts_with("RESOURCE_DOES_NOT_EXIST"));
        assert_eq!(
            apply(&mut txn, register("iris", false)),
            Ok(1),
            "kiln's door"
        );
        assert_eq!(
            apply(&mut txn, register("iris", true)),
            Ok(2),
            "now it exists"
        );

        let create = |name: &str| {
            command::Kind::CreateRegisteredModel(CreateRegisteredModel {
                model: Some(RegisteredModel {
                    name: name.into(),
                    description: "d".into(),
                    ..Default::default()
                }),
            })
        };
        let twice = apply(&mut txn, create("iris"));
        assert!(twice
            .expect_err("exists")
            .starts_with("RESOURCE_ALREADY_EXISTS"));
        apply(&mut txn, create("empty")).expect("created without versions");
        assert!(model_exists(&txn, "empty").expect("io"));
        assert!(apply(&mut txn, create("bad name")).is_err());
    }

    #[test]
    fn a_rename_moves_versions_and_aliases_unless_the_model_changed_meanwhile() {
        let base = Empty;
        let mut txn = Txn::new(&base);
        apply(&mut txn, register("iris", false)).expect("v1");
        apply(&mut txn, register("iris", false)).expect("v2");
        apply(&mut txn, alias_to("iris", "champion", 1)).expect("alias");

        let stale = command::Kind::RenameRegisteredModel(RenameRegisteredModel {
            name: "iris".into(),
            new_name: "flowers".into(),
            versions: vec![1],
            aliases: vec!["champion".into()],
        });
        let refused = apply(&mut txn, stale);
        assert!(refused.expect_err("stale").starts_with("RESOURCE_CONFLICT"));

        let rename = command::Kind::RenameRegisteredModel(RenameRegisteredModel {
            name: "iris".into(),
            new_name: "flowers".into(),
            versions: vec![1, 2],
            aliases: vec!["champion".into()],
        });
        apply(&mut txn, rename).expect("renamed");
        assert!(!model_exists(&txn, "iris").expect("io"));
        assert_eq!(latest(&txn, "flowers").expect("io"), 2);
        assert_eq!(alias(&txn, "flowers", "champion").expect("io"), 1);
        let moved = read_model(&txn, "flowers", 1).expect("io").expect("moved");
        assert_eq!(moved.name, "flowers");
    }

    #[test]
    fn deleting_the_newest_version_moves_the_head_down_and_drops_its_aliases() {
        let base = Empty;
        let mut txn = Txn::new(&base);
        for _ in 0..3 {
            apply(&mut txn, register("iris", false)).expect("version");
        }
        apply(&mut txn, alias_to("iris", "champion", 3)).expect("alias");
        apply(&mut txn, alias_to("iris", "old", 1)).expect("alias");
        let delete = |version: u64| {
            command::Kind::UpdateModelVersion(UpdateModelVersion {
                name: "iris".into(),
                version,
                delete: true,
                aliases: vec!["champion".into(), "old".into()],
                ..Default::default()
            })
        };
        apply(&mut txn, delete(2)).expect("deleted 2");
        assert_eq!(latest(&txn, "iris").expect("io"), 3);
        apply(&mut txn, delete(3)).expect("deleted 3");
        assert_eq!(latest(&txn, "iris").expect("io"), 1, "past the hole at 2");
        assert_eq!(alias(&txn, "iris", "champion").expect("io"), 0);
        assert_eq!(alias(&txn, "iris", "old").expect("io"), 1);
        assert!(apply(&mut txn, delete(3)).is_err(), "gone already");

        let described = command::Kind::UpdateModelVersion(UpdateModelVersion {
            name: "iris".into(),
            version: 1,
            set_description: true,
            description: "first".into(),
            set_tags: [("stage".to_string(), "prod".to_string())].into(),
            ..Default::default()
        });
        apply(&mut txn, described).expect("updated");
        let v1 = read_model(&txn, "iris", 1).expect("io").expect("v1");
        assert_eq!(v1.description, "first");
        assert_eq!(v1.tags.get("stage").map(String::as_str), Some("prod"));

        let delete_model = command::Kind::DeleteRegisteredModel(DeleteRegisteredModel {
            name: "iris".into(),
            versions: vec![1],
            aliases: vec!["old".into()],
        });
        apply(&mut txn, delete_model).expect("model deleted");
        assert!(!model_exists(&txn, "iris").expect("io"));
        assert_eq!(alias(&txn, "iris", "old").expect("io"), 0);
    }
}
