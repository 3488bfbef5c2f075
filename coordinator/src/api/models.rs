//! The model registry: register a version (a trainer at the end of a job, or a
//! person), list the models, show one with its versions.

use kiln_common::{Error, Result};
use kiln_proto::v1::*;

use super::grpc::{audited, Api};
use super::storage;
use crate::auth::Caller;
use crate::state::keys;
use crate::state::models::{latest, read_model};

/// Most models and versions one listing returns.
const MAX_LISTED: usize = 10_000;

impl Api {
    /// Registers the next version of a model.
    pub async fn register_model_call(
        &self,
        caller: &Caller,
        req: RegisterModelRequest,
    ) -> Result<u64> {
        let model = req
            .model
            .ok_or_else(|| Error::InvalidArgument("register_model without a model".into()))?;
        kiln_common::artifact::validate_name(&model.name)?;
        if !model.reference.is_empty() {
            kiln_common::reference::ReferenceStats::from_proto(&model.reference)?;
        }
        let what = format!("register model {} from {}", model.name, model.artifact);
        let kind = command::Kind::RegisterModel(RegisterModel {
            model: Some(model),
            require_registered: false,
        });
        Ok(self
            .propose(audited(caller, what, kind), false)
            .await?
            .value)
    }

    /// Lists the newest version of every model.
    pub async fn list_models_call(&self) -> Result<ListModelsResponse> {
        self.read_barrier(false).await?;
        let mut models = Vec::new();
        for (key, value) in self
            .reader
            .scan(keys::MODEL_HEAD.as_bytes(), MAX_LISTED)
            .map_err(storage)?
        {
            let name = String::from_utf8_lossy(&key[keys::MODEL_HEAD.len()..]).to_string();
            let version = value
                .as_slice()
                .try_into()
                .map(u64::from_be_bytes)
                .map_err(|_| Error::Internal(format!("model {name}'s head is corrupt")))?;
            if let Some(model) = read_model(&self.reader, &name, version).map_err(storage)? {
                models.push(model);
            }
        }
        Ok(ListModelsResponse { models })
    }

    /// Returns a version of a model (the newest when none is named), and every
    /// version when asked.
    pub async fn get_model_call(&self, req: GetModelRequest) -> Result<GetModelResponse> {
        self.read_barrier(false).await?;
        let newest = latest(&self.reader, &req.name).map_err(storage)?;
        if newest == 0 {
            return Err(Error::NotFound(format!("no model is named {}", req.name)));
        }
        let version = if req.version == 0 {
            newest
        } else {
            req.version
        };
        let model = read_model(&self.reader, &req.name, version)
            .map_err(storage)?
            .ok_or_else(|| Error::NotFound(format!("{}@{version} does not exist", req.name)))?;
        let mut versions = Vec::new();
        if req.all_versions {
            for (_, bytes) in self
                .reader
                .scan(&keys::model_versions(&req.name), MAX_LISTED)
                .map_err(storage)?
            {
                versions.push(
                    <ModelVersion as prost::Message>::decode(bytes.as_slice())
                        .map_err(|e| Error::Internal(format!("decode model version: {e}")))?,
                );
            }
            versions.reverse();
        }
        let prefix = keys::model_aliases(&req.name);
        let mut aliases = std::collections::BTreeMap::new();
        for (key, value) in self.reader.scan(&prefix, MAX_LISTED).map_err(storage)? {
            let alias = String::from_utf8_lossy(&key[prefix.len()..]).to_string();
            let version = value
                .as_slice()
                .try_into()
                .map(u64::from_be_bytes)
                .map_err(|_| Error::Internal(format!("alias {alias} is corrupt")))?;
            aliases.insert(alias, version);
        }
        Ok(GetModelResponse {
            model: Some(model),
            versions,
            aliases,
        })
    }
}
