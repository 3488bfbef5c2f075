//! Retrain policies: a deployment's answer to drift of its primary version.
//!
//! - [`Api::retrain_on`]: a newly opened dataset-drift alert submits the policy's
//!   job on the newest version of its dataset.
//! - [`Api::retrain_round`] (leader, every second): once the job has ended, the
//!   version it registered becomes the deployment's canary at the policy's
//!   percent; the canary is then judged on the serving windows since it started
//!   (`crate::canary`) and promoted or rolled back. Every step is recorded in the
//!   deployment's history through `RecordRetrain`, which also keeps the policy's
//!   job, alert and canary in the replicated state, so a new leader carries on.

use kiln_common::{Error, Result};
use kiln_proto::v1::*;

use super::grpc::{command, Api};
use super::{rejection, storage};
use crate::auth::Caller;
use crate::canary::{self, Verdict};
use crate::state::deployments::{read_deployment, target_text};
use crate::state::keys;
use crate::state::models::{latest, read_model};

/// Most serving windows a canary verdict reads.
const MAX_JUDGED_WINDOWS: usize = 10_000;

impl Api {
    /// Submits the retraining job of every deployment whose policy a newly opened
    /// dataset-drift alert calls for: the alert is about the deployment's primary
    /// version, and no job of the policy is still pending or running. The job is
    /// the policy's spec with its dataset at the newest version.
    pub async fn retrain_on(&self, alert: &DriftAlert) -> Result<()> {
        if alert.kind != "dataset_drift" {
            return Ok(());
        }
        for name in &alert.deployments {
            let Some(d) = read_deployment(&self.reader, name).map_err(storage)? else {
                continue;
            };
            let Some(policy) = d.retrain.clone() else {
                continue;
            };
            let serves = d
                .primary
                .as_ref()
                .is_some_and(|p| p.model == alert.model && p.version == alert.version);
            if !serves || policy.alert_id == alert.id {
                continue;
            }
            if !policy.canary.is_empty() {
                tracing::info!(deployment = %name, canary = %policy.canary, "drift while a retrained canary is judged; no second job");
                continue;
            }
            if policy.job_id != 0 {
                let job =
                    crate::state::jobs::read_job(&self.reader, policy.job_id).map_err(storage)?;
                if job.is_some_and(|j| !crate::state::jobs::is_terminal(j.state)) {
                    tracing::info!(deployment = %name, job = policy.job_id, "drift again while retraining; no second job");
                    continue;
                }
            }
            let newest = crate::state::machine::read_counter(
                &self.reader,
                &keys::artifact_latest(&policy.dataset),
            )
            .map_err(storage)?;
            if newest == 0 {
                tracing::warn!(deployment = %name, dataset = %policy.dataset, "no version of the retraining dataset; not retraining");
                continue;
            }
            let spec_toml = with_dataset(&policy.job_spec, &policy.dataset, newest)?;
            let submitted = self
                .submit_job_call(&Caller::Node, SubmitJobRequest { spec_toml })
                .await?;
            let message = format!(
                "drift alert #{}: retraining as job {} on {}@{newest}",
                alert.id, submitted.job_id, policy.dataset
            );
            tracing::info!(deployment = %name, %message, "retrain");
            let kind = command::Kind::RecordRetrain(RecordRetrain {
                deployment: name.clone(),
                job_id: submitted.job_id,
                alert_id: alert.id,
                message,
                ..RecordRetrain::default()
            });
            self.propose(command(kind), false)
                .await
                .map_err(rejection)?;
        }
        Ok(())
    }

    /// Follows each retrain policy one step: a retraining job that has ended
    /// makes the version it registered the deployment's canary at the policy's
    /// percent (a job that failed, or registered nothing, is recorded as such); a
    /// canary is judged on what it served since it started and promoted or rolled
    /// back (see [`crate::canary`]). Then the policy is free for the next alert
    /// (its job and canary cleared).
    pub async fn retrain_round(&self, now_ms: u64) -> Result<()> {
        for d in self.deployments()? {
            let Some(policy) = d.retrain.clone() else {
                continue;
            };
            let step = if !policy.canary.is_empty() {
                self.follow_canary(&d, &policy, now_ms).await
            } else if policy.job_id != 0 {
                self.follow_job(&d, &policy, now_ms).await
            } else {
                continue;
            };
            let record = match step {
                Ok(Some(record)) => record,
                Ok(None) => continue,
                Err(e) => {
                    tracing::warn!(deployment = %d.name, error = %e, "retrain policy step");
                    continue;
                }
            };
            tracing::info!(deployment = %d.name, message = %record.message, "retrain");
            let retiring = if record.retired_model.is_empty() {
                Vec::new()
            } else {
                self.open_alerts(&record.retired_model, record.retired_version)?
            };
            let kind = command::Kind::RecordRetrain(RecordRetrain {
                deployment: d.name.clone(),
                alert_id: policy.alert_id,
                ..record
            });
            if let Err(e) = self.propose(command(kind), false).await {
                tracing::warn!(deployment = %d.name, error = %e, "record the retrain policy step");
                continue;
            }
            // The retired version's alerts resolved: their webhooks hear it.
            for id in retiring.into_iter().filter(|&id| id != 0) {
                if let Err(e) = self.notify(id).await {
                    tracing::warn!(alert = id, error = %e, "drift alert not sent");
                }
            }
        }
        Ok(())
    }

    /// Once the policy's job has ended: the record of what came of it (a canary
    /// started, or why not); `None` while it runs.
    async fn follow_job(
        &self,
        d: &DeploymentRecord,
        policy: &RetrainPolicy,
        now_ms: u64,
    ) -> Result<Option<RecordRetrain>> {
        let Some(job) =
            crate::state::jobs::read_job(&self.reader, policy.job_id).map_err(storage)?
        else {
            return Ok(Some(RecordRetrain {
                message: format!("retraining job {} is gone; no canary", policy.job_id),
                ..RecordRetrain::default()
            }));
        };
        if !crate::state::jobs::is_terminal(job.state) {
            return Ok(None);
        }
        if job.state != JobState::Succeeded as i32 {
            return Ok(Some(RecordRetrain {
                message: format!(
                    "retraining job {} ended {}: {}; no canary",
                    job.id,
                    kiln_common::status::job_state_name(job.state),
                    job.reason
                ),
                ..RecordRetrain::default()
            }));
        }
        let Some(version) = self.model_of_job(&job)? else {
            return Ok(Some(RecordRetrain {
                message: format!(
                    "retraining job {} succeeded but registered no model version",
                    job.id
                ),
                ..RecordRetrain::default()
            }));
        };
        let canary = format!("{}@{}", version.name, version.version);
        let primary = target_text(&d.primary);
        let request = redeploy_request(d, policy, &primary, Some(&canary));
        Ok(Some(match self.deploy_call(&Caller::Node, request).await {
            Ok(_) => RecordRetrain {
                message: format!(
                    "retraining job {} registered {canary}; canary at {}%",
                    job.id, policy.canary_percent
                ),
                // The job stays on the policy while its canary is judged, so
                // `deployments show` names what trained the canary.
                job_id: job.id,
                canary,
                canary_since_ms: now_ms,
                ..RecordRetrain::default()
            },
            Err(e) => RecordRetrain {
                message: format!(
                    "retraining job {} registered {canary}, but the canary was refused: {e}",
                    job.id
                ),
                ..RecordRetrain::default()
            },
        }))
    }

    /// Judges the policy's canary on the serving windows since it started: the
    /// record of its promotion or rollback, or of a redeploy that took it away;
    /// `None` while it waits for time and traffic. A promotion or rollback the
    /// deploy refuses is an error, retried next round.
    async fn follow_canary(
        &self,
        d: &DeploymentRecord,
        policy: &RetrainPolicy,
        now_ms: u64,
    ) -> Result<Option<RecordRetrain>> {
        let serving = target_text(&d.canary);
        if serving != policy.canary {
            return Ok(Some(RecordRetrain {
                message: format!(
                    "canary {} was replaced by a redeploy (canary now: {}); no verdict",
                    policy.canary,
                    if serving.is_empty() { "none" } else { &serving }
                ),
                ..RecordRetrain::default()
            }));
        }
        let windows = crate::state::serving::windows_since(
            &self.reader,
            &d.name,
            policy.canary_since_ms,
            MAX_JUDGED_WINDOWS,
        )
        .map_err(storage)?;
        let of =
            |target: &Option<ModelTarget>| {
                let target = target.as_ref();
                crate::state::serving::sum(windows.iter().filter(|w| {
                    target.is_some_and(|t| t.model == w.model && t.version == w.version)
                }))
            };
        let elapsed_ms = now_ms.saturating_sub(policy.canary_since_ms);
        let primary = target_text(&d.primary);
        let (model, message) = match canary::judge(
            &self.canary,
            &of(&d.canary),
            &of(&d.primary),
            elapsed_ms,
        ) {
            Verdict::Wait(progress) => {
                tracing::debug!(deployment = %d.name, canary = %policy.canary, %progress, "canary not judged yet");
                return Ok(None);
            }
            Verdict::Promote(summary) => (
                policy.canary.clone(),
                format!(
                    "canary {} promoted over {primary}: {summary}",
                    policy.canary
                ),
            ),
            Verdict::RollBack(why) => (
                primary.clone(),
                format!(
                    "canary {} rolled back, {primary} stays: {why}",
                    policy.canary
                ),
            ),
        };
        self.deploy_call(&Caller::Node, redeploy_request(d, policy, &model, None))
            .await?;
        let mut record = RecordRetrain {
            message,
            ..RecordRetrain::default()
        };
        // A promoted canary retires the old primary; unless another deployment
        // still serves it, its firing alerts can never resolve by a window.
        if let Some(old) = d.primary.as_ref().filter(|_| model != primary) {
            let served_elsewhere = self.deployments()?.iter().any(|other| {
                other.name != d.name
                    && [&other.primary, &other.canary].into_iter().any(|t| {
                        t.as_ref()
                            .is_some_and(|t| t.model == old.model && t.version == old.version)
                    })
            });
            if !served_elsewhere {
                record.retired_model = old.model.clone();
                record.retired_version = old.version;
            }
        }
        Ok(Some(record))
    }

    /// The model version a job registered: of the model named as the job, the
    /// newest of the last few versions that names the job.
    fn model_of_job(&self, job: &JobRecord) -> Result<Option<ModelVersion>> {
        let newest = latest(&self.reader, &job.name).map_err(storage)?;
        for version in (newest.saturating_sub(16) + 1..=newest).rev() {
            if let Some(m) = read_model(&self.reader, &job.name, version).map_err(storage)? {
                if m.job_id == job.id {
                    return Ok(Some(m));
                }
            }
        }
        Ok(None)
    }
}

/// The retrain policy a deploy asks for: the job spec must parse (every problem
/// named) and the dataset be an artifact name.
pub(super) fn retrain_policy(req: &DeployRequest) -> Result<Option<RetrainPolicy>> {
    if req.retrain_job.is_empty() && req.retrain_dataset.is_empty() {
        return Ok(None);
    }
    if req.retrain_job.is_empty() || req.retrain_dataset.is_empty() {
        return Err(Error::InvalidArgument(
            "a retrain policy needs both a job spec and a dataset".into(),
        ));
    }
    kiln_common::artifact::validate_name(&req.retrain_dataset)?;
    // The spec must parse as it will be submitted (with some version named).
    let spec = kiln_common::jobspec::JobSpec::parse(&with_dataset(
        &req.retrain_job,
        &req.retrain_dataset,
        1,
    )?)
    .map_err(|e| Error::InvalidArgument(format!("retrain job spec: {e}")))?;
    if let Some(kiln_common::jobspec::Code::Path(path)) =
        spec.command().and_then(|c| c.command.code.as_ref())
    {
        return Err(Error::InvalidArgument(format!(
            "retrain job spec: command.code = \"{path}\" is a directory on this machine; push it (kiln artifact push) and name its version, NAME@NUMBER"
        )));
    }
    let canary_percent = match req.retrain_canary_percent {
        0 => 10,
        p @ 1..=99 => p,
        p => {
            return Err(Error::InvalidArgument(format!(
                "retrain canary percent must be 1 to 99, got {p}"
            )))
        }
    };
    Ok(Some(RetrainPolicy {
        job_spec: req.retrain_job.clone(),
        dataset: req.retrain_dataset.clone(),
        canary_percent,
        ..RetrainPolicy::default()
    }))
}

/// The deploy that keeps `d` as it is (replicas, limits, webhook, policy) and
/// serves `model` as its primary with `canary` at the policy's percent, or no
/// canary.
fn redeploy_request(
    d: &DeploymentRecord,
    policy: &RetrainPolicy,
    model: &str,
    canary: Option<&str>,
) -> DeployRequest {
    let autoscaled = d.min_replicas != d.max_replicas;
    DeployRequest {
        name: d.name.clone(),
        model: model.to_string(),
        replicas: if autoscaled { 0 } else { d.replicas },
        min_replicas: if autoscaled { d.min_replicas } else { 0 },
        max_replicas: if autoscaled { d.max_replicas } else { 0 },
        canary: canary.unwrap_or_default().to_string(),
        canary_percent: if canary.is_some() {
            policy.canary_percent
        } else {
            0
        },
        cpus_per_replica: d.cpus_per_replica,
        gpus_per_replica: d.gpus_per_replica,
        memory_mib_per_replica: d.memory_per_replica >> 20,
        max_batch_size: match Batching::try_from(d.batching) {
            Ok(Batching::Off) => Some(0),
            Ok(Batching::Declared) => Some(d.max_batch_size),
            _ => None,
        },
        preferred_batch_sizes: d.preferred_batch_sizes.clone(),
        instances: d.instances,
        input_limits: d.input_limits.clone(),
        max_queue_delay_us: d.max_queue_delay_us,
        queue_capacity: d.queue_capacity,
        public: d.public,
        target_in_flight: d.target_in_flight,
        drift_webhook: d.drift_webhook.clone(),
        retrain_job: policy.job_spec.clone(),
        retrain_dataset: policy.dataset.clone(),
        retrain_canary_percent: policy.canary_percent,
        engine: d.engine.clone(),
    }
}

/// A job spec with `[data] artifact = "DATASET@VERSION"`.
fn with_dataset(spec: &str, dataset: &str, version: u64) -> Result<String> {
    let mut doc: toml::Table = spec
        .parse()
        .map_err(|e| Error::InvalidArgument(format!("retrain job spec: {e}")))?;
    let data = doc
        .entry("data")
        .or_insert_with(|| toml::Value::Table(toml::Table::new()));
    let toml::Value::Table(data) = data else {
        return Err(Error::InvalidArgument(
            "retrain job spec: data must be a table".into(),
        ));
    };
    data.insert(
        "artifact".into(),
        toml::Value::String(format!("{dataset}@{version}")),
    );
    toml::to_string(&doc).map_err(|e| Error::Internal(format!("write the retrain job spec: {e}")))
}
#[cfg(test)]
mod tests {
    use super::*;

    const SPEC: &str = "name = \"m\"\n[data]\nartifact = \"old@1\"\nlabel = \"y\"\n";

    #[test]
    fn a_retrain_spec_learns_from_the_newest_dataset_version() {
        let spec = with_dataset(SPEC, "fresh", 7).expect("rewrite");
        let parsed = kiln_common::jobspec::JobSpec::parse(&spec).expect("parses");
        let data = &parsed.builtin().expect("the built-in trainer").data;
        assert_eq!((data.artifact.as_str(), data.version), ("fresh", 7));
        assert_eq!(data.label, "y", "the rest of the spec is kept");
    }

    #[test]
    fn a_retrain_policy_is_checked_at_deploy_time() {
        let req = |job: &str, dataset: &str, percent: u32| DeployRequest {
            retrain_job: job.into(),
            retrain_dataset: dataset.into(),
            retrain_canary_percent: percent,
            ..DeployRequest::default()
        };
        assert_eq!(retrain_policy(&req("", "", 0)).expect("none"), None);
        let policy = retrain_policy(&req(SPEC, "data", 0))
            .expect("valid")
            .expect("a policy");
        assert_eq!((policy.canary_percent, policy.job_id), (10, 0));
        for (bad, why) in [
            (req(SPEC, "", 0), "both a job spec and a dataset"),
            (
                req(
                    "name = \"m\"\n[data]\nlabel = \"y\"\nbogus = 1\n",
                    "data",
                    0,
                ),
                "bogus",
            ),
            (req("not toml at all [", "data", 0), "retrain job spec"),
            (req(SPEC, "data", 100), "1 to 99"),
        ] {
            let err = retrain_policy(&bad).expect_err(why).to_string();
            assert!(err.contains(why), "{why}: {err}");
        }
    }
}
