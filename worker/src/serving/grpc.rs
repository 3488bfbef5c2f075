//! The KServe v2 gRPC service (`inference.GRPCInferenceService`) on the worker's
//! inference gRPC port: the same router as the REST endpoints, with requests
//! forwarded to replicas on other workers through their gRPC port (metadata
//! `kiln-replica` names the replica, as the REST header does). Of Triton's
//! extensions it answers `ModelStatistics` (summed over the cluster by the
//! router, whose peers answer over HTTP), `RepositoryIndex`, and
//! `RepositoryModelLoad`/`Unload` with UNIMPLEMENTED naming `kiln deploy`.

use std::sync::Arc;
use std::time::{Duration, Instant};

use kiln_common::Error;
use kiln_proto::inference::grpc_inference_service_server::GrpcInferenceService;
use kiln_proto::inference::*;
use tonic::{Request, Response, Status};

use super::feedback::Feedback;
use super::protocol;
use super::replicas::LocalReplica;
use super::router::{
    sooner, Failure, Router, Target, Version, DEFAULT_DEADLINE, MAX_BODY_BYTES, REPLICA_HEADER,
};
use super::statistics::repository_change_refusal;
use kiln_common::client::ClusterClient;

/// The gRPC face of a worker's router.
pub struct InferenceService {
    pub router: Arc<Router>,
    /// Channels to other workers' inference ports.
    pub peers: Arc<ClusterClient>,
    /// False until the coordinators know this worker.
    pub registered: tokio::sync::watch::Receiver<crate::agent::Registration>,
}

impl std::fmt::Debug for InferenceService {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("InferenceService").finish_non_exhaustive()
    }
}

fn version_of(text: &str) -> kiln_common::Result<Version> {
    Version::parse((!text.is_empty()).then_some(text))
}

/// A gRPC request's deadline: [`DEFAULT_DEADLINE`] from now, or sooner when the
/// caller's `grpc-timeout` (which a forwarding worker sets to the time left) or
/// its `timeout` parameter (microseconds, Triton's) asks for less.
fn grpc_deadline(request: &Request<ModelInferRequest>) -> kiln_common::Result<Instant> {
    use kiln_common::Error;
    let now = Instant::now();
    let mut deadline = now + DEFAULT_DEADLINE;
    if let Some(value) = request.metadata().get("grpc-timeout") {
        let timeout = value
            .to_str()
            .ok()
            .and_then(grpc_timeout)
            .ok_or_else(|| Error::InvalidArgument("bad grpc-timeout metadata".into()))?;
        deadline = sooner(deadline, now, timeout);
    }
    if let Some(parameter) = request.get_ref().parameters.get("timeout") {
        use kiln_proto::inference::infer_parameter::ParameterChoice;
        let us = match parameter.parameter_choice {
            Some(ParameterChoice::Int64Param(us)) => u64::try_from(us).ok(),
            Some(ParameterChoice::Uint64Param(us)) => Some(us),
            _ => None,
        }
        .ok_or_else(|| {
            Error::InvalidArgument(
                "parameter timeout is a whole number of microseconds (int64_param)".into(),
            )
        })?;
        deadline = sooner(deadline, now, Duration::from_micros(us));
    }
    Ok(deadline)
}

/// Parses gRPC's `grpc-timeout` value: at most 8 digits and a unit (H, M, S, m,
/// u, n).
fn grpc_timeout(text: &str) -> Option<Duration> {
    let (digits, unit) = text.split_at(text.len().checked_sub(1)?);
    if digits.is_empty() || digits.len() > 8 {
        return None;
    }
    let n: u64 = digits.parse().ok()?;
    Some(match unit {
        "H" => Duration::from_secs(n * 3600),
        "M" => Duration::from_secs(n * 60),
        "S" => Duration::from_secs(n),
        "m" => Duration::from_millis(n),
        "u" => Duration::from_micros(n),
        "n" => Duration::from_nanos(n),
        _ => return None,
    })
}

fn authorization<T>(request: &Request<T>) -> Option<String> {
    kiln_common::auth::grpc_authorization(request).map(str::to_string)
}

/// Runs a gRPC request on a replica of this worker and remembers its answer for
/// feedback, under the caller's id or a new one that the response carries.
async fn local_infer(
    replica: &LocalReplica,
    feedback: &Feedback,
    request: ModelInferRequest,
    deadline: Instant,
) -> Result<ModelInferResponse, Status> {
    let mut parsed = protocol::parse_grpc_request(request)?;
    protocol::check_classification(&parsed.outputs, replica.engine.signature())?;
    let inputs = std::mem::take(&mut parsed.inputs);
    let wanted = (!parsed.outputs.is_empty())
        .then(|| parsed.outputs.iter().map(|o| o.name.clone()).collect());
    feedback.ensure_id(&mut parsed.id);
    let id = parsed.id.as_deref().unwrap_or_default();
    let outputs = feedback
        .infer(replica, id, inputs, wanted, deadline)
        .await?;
    let outputs = protocol::classify(outputs, &parsed.outputs)?;
    Ok(protocol::encode_grpc_response(
        &replica.deployment,
        &replica.version.to_string(),
        &parsed,
        outputs,
    ))
}

impl InferenceService {
    /// Forwards a request to a replica on another worker.
    async fn forward(
        &self,
        grpc_addr: &str,
        replica: u64,
        authorization: Option<&str>,
        request: ModelInferRequest,
        deadline: Instant,
    ) -> Result<ModelInferResponse, Failure<Result<ModelInferResponse, Status>>> {
        // A request this worker's server took is forwardable: the same limit.
        let mut client = self
            .peers
            .inference_for(grpc_addr)
            .map_err(|e| Failure::Retry(e.to_string()))?
            .max_decoding_message_size(MAX_BODY_BYTES)
            .max_encoding_message_size(MAX_BODY_BYTES);
        let mut outgoing = Request::new(request);
        // The time left travels as grpc-timeout, which the next worker reads.
        outgoing.set_timeout(deadline.saturating_duration_since(Instant::now()));
        let metadata = outgoing.metadata_mut();
        if let Ok(value) = replica.to_string().parse() {
            metadata.insert(REPLICA_HEADER, value);
        }
        if let Some(value) = authorization.and_then(|a| a.parse().ok()) {
            metadata.insert("authorization", value);
        }
        match client.model_infer(outgoing).await {
            Ok(response) => Ok(response.into_inner()),
            // The replica has left that worker, or the worker is unreachable.
            Err(status)
                if status.code() == tonic::Code::Unavailable
                    || status.code() == tonic::Code::Unknown =>
            {
                Err(Failure::Retry(status.message().to_string()))
            }
            Err(status) => Err(Failure::Final(Err(status))),
        }
    }
}

#[tonic::async_trait]
impl GrpcInferenceService for InferenceService {
    async fn server_live(
        &self,
        _request: Request<ServerLiveRequest>,
    ) -> Result<Response<ServerLiveResponse>, Status> {
        Ok(Response::new(ServerLiveResponse { live: true }))
    }

    async fn server_ready(
        &self,
        _request: Request<ServerReadyRequest>,
    ) -> Result<Response<ServerReadyResponse>, Status> {
        let ready = self.registered.borrow().is_registered();
        Ok(Response::new(ServerReadyResponse { ready }))
    }

    async fn model_ready(
        &self,
        request: Request<ModelReadyRequest>,
    ) -> Result<Response<ModelReadyResponse>, Status> {
        let req = request.into_inner();
        let version = version_of(&req.version)?;
        let ready = self.router.is_ready(&req.name, version)?;
        Ok(Response::new(ModelReadyResponse { ready }))
    }

    async fn server_metadata(
        &self,
        _request: Request<ServerMetadataRequest>,
    ) -> Result<Response<ServerMetadataResponse>, Status> {
        Ok(Response::new(protocol::grpc_server_metadata(env!(
            "CARGO_PKG_VERSION"
        ))))
    }

    async fn model_metadata(
        &self,
        request: Request<ModelMetadataRequest>,
    ) -> Result<Response<ModelMetadataResponse>, Status> {
        let authorization = authorization(&request);
        let req = request.into_inner();
        let version = version_of(&req.version)?;
        let route = self
            .router
            .authorized_route(&req.name, authorization.as_deref())
            .await?;
        let (names, local) = self.router.served(&route, version)?;
        if let Some(replica) = local {
            return Ok(Response::new(protocol::grpc_model_metadata(
                &req.name,
                &names,
                "onnx",
                replica.engine.signature(),
            )));
        }
        let endpoint = self.router.choose(&route, version, None).ok_or_else(|| {
            Error::Unavailable(format!("model {} has no ready replica yet", req.name))
        })?;
        let mut client = self.peers.inference_for(&endpoint.grpc_addr)?;
        let mut outgoing = Request::new(req);
        if let Some(value) = authorization.as_deref().and_then(|a| a.parse().ok()) {
            outgoing.metadata_mut().insert("authorization", value);
        }
        client.model_metadata(outgoing).await
    }

    async fn model_infer(
        &self,
        request: Request<ModelInferRequest>,
    ) -> Result<Response<ModelInferResponse>, Status> {
        let deadline = grpc_deadline(&request)?;
        let authorization = authorization(&request);
        let forwarded = request
            .metadata()
            .get(REPLICA_HEADER)
            .map(|v| v.to_str().ok().and_then(|v| v.parse::<u64>().ok()));
        let request = request.into_inner();
        let deployment = request.model_name.clone();
        let version = version_of(&request.model_version)?;
        if let Some(id) = forwarded {
            let id = id.ok_or_else(|| {
                Status::invalid_argument(format!("bad {REPLICA_HEADER} metadata"))
            })?;
            let replica = self
                .router
                .forwarded(&deployment, id, authorization.as_deref())
                .await?
                .ok_or_else(|| {
                    Status::unavailable(format!(
                        "replica {id} of {deployment} is not on this worker"
                    ))
                })?;
            let answer = local_infer(&replica, self.router.feedback(), request, deadline).await;
            if answer.is_ok() {
                self.router.note_inference(&replica);
            }
            return answer.map(Response::new);
        }
        let answer = self
            .router
            .dispatch(&deployment, version, authorization.as_deref(), |target| {
                let request = request.clone();
                let authorization = authorization.clone();
                async move {
                    match target {
                        Target::Local(replica) => {
                            let answer =
                                local_infer(&replica, self.router.feedback(), request, deadline)
                                    .await;
                            if answer.is_ok() {
                                self.router.note_inference(&replica);
                            }
                            Ok(answer)
                        }
                        Target::Remote(endpoint) => self
                            .forward(
                                &endpoint.grpc_addr,
                                endpoint.replica_id,
                                authorization.as_deref(),
                                request,
                                deadline,
                            )
                            .await
                            .map(Ok),
                    }
                }
            })
            .await?;
        answer.map(Response::new)
    }

    async fn model_statistics(
        &self,
        request: Request<ModelStatisticsRequest>,
    ) -> Result<Response<ModelStatisticsResponse>, Status> {
        let authorization = authorization(&request);
        let req = request.into_inner();
        let version = version_of(&req.version)?;
        let model = (!req.name.is_empty()).then_some(req.name.as_str());
        if model.is_none() && version != Version::Any {
            return Err(Status::invalid_argument(format!(
                "version {:?} needs a model name",
                req.version
            )));
        }
        let answer = self
            .router
            .statistics(model, version, authorization.as_deref(), false)
            .await?;
        Ok(Response::new(answer.to_proto()))
    }

    async fn repository_index(
        &self,
        request: Request<RepositoryIndexRequest>,
    ) -> Result<Response<RepositoryIndexResponse>, Status> {
        let authorization = authorization(&request);
        let req = request.into_inner();
        if !req.repository_name.is_empty() {
            return Err(Status::not_found(format!(
                "model repository {:?} does not exist: kiln has one, named by an empty \
                 repository_name",
                req.repository_name
            )));
        }
        let entries = self
            .router
            .repository_index(authorization.as_deref(), req.ready)
            .await?;
        Ok(Response::new(RepositoryIndexResponse {
            models: entries.iter().map(|e| e.to_proto()).collect(),
        }))
    }

    async fn repository_model_load(
        &self,
        request: Request<RepositoryModelLoadRequest>,
    ) -> Result<Response<RepositoryModelLoadResponse>, Status> {
        Err(Status::unimplemented(repository_change_refusal(
            &request.get_ref().model_name,
        )))
    }

    async fn repository_model_unload(
        &self,
        request: Request<RepositoryModelUnloadRequest>,
    ) -> Result<Response<RepositoryModelUnloadResponse>, Status> {
        Err(Status::unimplemented(repository_change_refusal(
            &request.get_ref().model_name,
        )))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn grpc_timeouts_are_read_in_every_unit_and_nonsense_is_refused() {
        assert_eq!(grpc_timeout("1500m"), Some(Duration::from_millis(1500)));
        assert_eq!(grpc_timeout("2S"), Some(Duration::from_secs(2)));
        assert_eq!(grpc_timeout("3M"), Some(Duration::from_secs(180)));
        assert_eq!(grpc_timeout("1H"), Some(Duration::from_secs(3600)));
        assert_eq!(grpc_timeout("250u"), Some(Duration::from_micros(250)));
        assert_eq!(grpc_timeout("7n"), Some(Duration::from_nanos(7)));
        for bad in ["", "m", "12", "123456789S", "1x", "-1S"] {
            assert_eq!(grpc_timeout(bad), None, "{bad:?}");
        }
        // The largest one gRPC allows does not overflow the clock.
        let mut huge = Request::new(ModelInferRequest::default());
        huge.metadata_mut()
            .insert("grpc-timeout", "99999999H".parse().expect("metadata"));
        assert!(grpc_deadline(&huge).is_ok());
        // The timeout parameter (microseconds) and grpc-timeout: the sooner wins.
        let mut request = Request::new(ModelInferRequest::default());
        request.get_mut().parameters.insert(
            "timeout".into(),
            kiln_proto::inference::InferParameter {
                parameter_choice: Some(
                    kiln_proto::inference::infer_parameter::ParameterChoice::Int64Param(50_000),
                ),
            },
        );
        let before = Instant::now();
        let deadline = grpc_deadline(&request).expect("a deadline");
        assert!(deadline <= Instant::now() + Duration::from_millis(50) && deadline > before);
        request
            .metadata_mut()
            .insert("grpc-timeout", "5m".parse().expect("metadata"));
        let deadline = grpc_deadline(&request).expect("a deadline");
        assert!(deadline <= Instant::now() + Duration::from_millis(5));
        request
            .metadata_mut()
            .insert("grpc-timeout", "soon".parse().expect("metadata"));
        assert!(matches!(
            grpc_deadline(&request),
            Err(kiln_common::Error::InvalidArgument(_))
        ));
    }
}
