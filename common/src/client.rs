//! [`ClusterClient`]: reaches the coordinators as a group.
//!
//! It keeps one lazily connected channel per coordinator, sends each call to the
//! coordinator it believes leads, follows `NotLeader` hints, moves on from dead
//! nodes, and gives up at a deadline with the most telling error it saw: a cluster
//! without a leader is reported as "no quorum", not as a timeout.

use std::collections::HashMap;
use std::future::Future;
use std::sync::Mutex;
use std::time::{Duration, Instant};

use kiln_proto::v1::blobs_client::BlobsClient;
use kiln_proto::v1::coordinator_client::CoordinatorClient;
use kiln_proto::v1::{ChunkTarget, GetChunkRequest};
use tonic::metadata::{Ascii, MetadataValue};
use tonic::service::interceptor::InterceptedService;
use tonic::service::Interceptor;
use tonic::transport::Channel;

use crate::chunking::ChunkId;
use crate::error::{Error, Result};

/// A gRPC client of one coordinator, sending the bearer token when there is one.
pub type Client = CoordinatorClient<InterceptedService<Channel, BearerToken>>;
/// A gRPC client of one worker's chunk service.
pub type Blobs = BlobsClient<InterceptedService<Channel, BearerToken>>;
/// A client of a worker's KServe v2 gRPC inference service.
pub type Inference =
    kiln_proto::inference::grpc_inference_service_client::GrpcInferenceServiceClient<
        InterceptedService<Channel, BearerToken>,
    >;

/// Longest call to a worker's chunk service (a stream of chunks included).
pub const DATA_CALL_TIMEOUT: Duration = Duration::from_secs(120);
/// Largest message to or from a chunk service: one chunk of at most 16 MiB and
/// its id.
pub const MAX_DATA_MESSAGE_BYTES: usize = 17 << 20;

/// Adds `authorization: Bearer <token>` to every call.
#[derive(Clone, Default)]
pub struct BearerToken(Option<MetadataValue<Ascii>>);

impl std::fmt::Debug for BearerToken {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        // Never print the secret.
        f.write_str(if self.0.is_some() {
            "BearerToken(..)"
        } else {
            "BearerToken(None)"
        })
    }
}

impl Interceptor for BearerToken {
    fn call(
        &mut self,
        mut request: tonic::Request<()>,
    ) -> Result<tonic::Request<()>, tonic::Status> {
        if let Some(value) = &self.0 {
            request
                .metadata_mut()
                .insert("authorization", value.clone());
        }
        Ok(request)
    }
}

/// Timing bounds of a [`ClusterClient`].
#[derive(Clone)]
pub struct ClientOptions {
    /// Time for a TCP connection to one coordinator.
    pub connect_timeout: Duration,
    /// Time for one attempt on one coordinator.
    pub attempt_timeout: Duration,
    /// Time for the whole call, across attempts.
    pub deadline: Duration,
    /// First pause between attempts; doubles up to `max_backoff`.
    pub initial_backoff: Duration,
    pub max_backoff: Duration,
    /// TLS material; `None` speaks plaintext (`--insecure` clusters).
    pub tls: Option<crate::tls::TlsMaterial>,
    /// Bearer token sent with every call.
    pub token: Option<String>,
    /// Addresses dialled instead of the ones the cluster names (`NAME:PORT` to
    /// `HOST:PORT`), for a client outside the cluster's network that reaches
    /// the nodes through published ports (`kiln --resolve`).
    pub resolve: HashMap<String, String>,
}

impl std::fmt::Debug for ClientOptions {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ClientOptions")
            .field("connect_timeout", &self.connect_timeout)
            .field("attempt_timeout", &self.attempt_timeout)
            .field("deadline", &self.deadline)
            .field("tls", &self.tls.is_some())
            .field("resolve", &self.resolve)
            // Never print the secret.
            .field("token", &self.token.as_ref().map(|_| ".."))
            .finish()
    }
}

impl Default for ClientOptions {
    fn default() -> Self {
        ClientOptions {
            connect_timeout: Duration::from_millis(500),
            attempt_timeout: Duration::from_secs(3),
            deadline: Duration::from_secs(5),
            initial_backoff: Duration::from_millis(20),
            max_backoff: Duration::from_millis(300),
            tls: None,
            token: None,
            resolve: HashMap::new(),
        }
    }
}

/// A client of the coordinator group that finds the leader by itself.
#[derive(Debug)]
pub struct ClusterClient {
    endpoints: Vec<String>,
    options: ClientOptions,
    leader: Mutex<Option<String>>,
    channels: Mutex<HashMap<String, Channel>>,
    /// Channels to workers' chunk services.
    data_channels: Mutex<HashMap<String, Channel>>,
    bearer: BearerToken,
}

impl ClusterClient {
    /// Creates a client of the coordinators at `endpoints` (HOST:PORT each).
    pub fn new(endpoints: Vec<String>, options: ClientOptions) -> Result<ClusterClient> {
        if endpoints.is_empty() {
            return Err(Error::InvalidArgument(
                "no coordinator address given".to_string(),
            ));
        }
        let bearer = match &options.token {
            Some(token) => BearerToken(Some(
                MetadataValue::try_from(format!("Bearer {}", token.trim())).map_err(|_| {
                    Error::InvalidArgument("the token holds characters a header cannot".into())
                })?,
            )),
            None => BearerToken(None),
        };
        Ok(ClusterClient {
            endpoints,
            options,
            leader: Mutex::new(None),
            channels: Mutex::new(HashMap::new()),
            data_channels: Mutex::new(HashMap::new()),
            bearer,
        })
    }

    /// Returns the coordinator addresses this client knows.
    pub fn endpoints(&self) -> &[String] {
        &self.endpoints
    }

    /// Returns a client of the coordinator at `addr`.
    pub fn client_for(&self, addr: &str) -> Result<Client> {
        let channel = self.channel(&self.channels, addr, self.options.attempt_timeout)?;
        Ok(CoordinatorClient::with_interceptor(
            channel,
            self.bearer.clone(),
        ))
    }

    /// Returns a client of the chunk service of the worker at `addr`, with the same
    /// TLS and token as the coordinator calls and a per-call bound of
    /// [`DATA_CALL_TIMEOUT`].
    pub fn blobs_for(&self, addr: &str) -> Result<Blobs> {
        let channel = self.channel(&self.data_channels, addr, DATA_CALL_TIMEOUT)?;
        Ok(BlobsClient::with_interceptor(channel, self.bearer.clone())
            .max_decoding_message_size(MAX_DATA_MESSAGE_BYTES)
            .max_encoding_message_size(MAX_DATA_MESSAGE_BYTES))
    }

    /// Returns a client of the KServe v2 gRPC service of the worker at `addr`
    /// (its inference gRPC port), with the same TLS as the other calls; the
    /// caller's own token travels in each request's metadata.
    pub fn inference_for(&self, addr: &str) -> Result<Inference> {
        let channel = self.channel(&self.data_channels, addr, DATA_CALL_TIMEOUT)?;
        use kiln_proto::inference::grpc_inference_service_client::GrpcInferenceServiceClient;
        Ok(
            GrpcInferenceServiceClient::with_interceptor(channel, self.bearer.clone())
                .max_decoding_message_size(MAX_DATA_MESSAGE_BYTES)
                .max_encoding_message_size(MAX_DATA_MESSAGE_BYTES),
        )
    }

    /// Reads chunk `id` from the first of `replicas` (workers' chunk services) that
    /// returns bytes matching the id; a replica that fails or sends bad bytes is
    /// skipped for the next. The error names what each replica did.
    pub async fn fetch_chunk(&self, id: ChunkId, replicas: &[ChunkTarget]) -> Result<Vec<u8>> {
        if replicas.is_empty() {
            return Err(Error::Unavailable(format!("chunk {id} has no replica")));
        }
        let mut errors = Vec::new();
        for replica in replicas {
            let answer = match self.blobs_for(&replica.addr) {
                Ok(mut blobs) => blobs
                    .get_chunk(GetChunkRequest { id: id.0.to_vec() })
                    .await
                    .map(|r| r.into_inner().data)
                    .map_err(Error::from),
                Err(e) => Err(e),
            };
            match answer {
                Ok(data) if ChunkId::of(&data) == id => return Ok(data),
                Ok(_) => errors.push(format!(
                    "worker {} sent bytes that do not match",
                    replica.worker_id
                )),
                Err(e) => errors.push(format!("worker {}: {e}", replica.worker_id)),
            }
            tracing::warn!(chunk = %id, worker = %replica.worker_id, "replica failed; trying the next");
        }
        Err(Error::Unavailable(format!(
            "no replica of chunk {id} could be read: {}",
            errors.join("; ")
        )))
    }

    /// Returns the cached channel to `addr` in `map`, connecting lazily.
    fn channel(
        &self,
        map: &Mutex<HashMap<String, Channel>>,
        addr: &str,
        timeout: Duration,
    ) -> Result<Channel> {
        let mut channels = map.lock().expect("channel map lock poisoned");
        if let Some(channel) = channels.get(addr) {
            return Ok(channel.clone());
        }
        let dial = self.options.resolve.get(addr).map_or(addr, String::as_str);
        let channel = crate::tls::endpoint_at(
            addr,
            dial,
            self.options.tls.as_ref(),
            self.options.connect_timeout,
        )?
        .timeout(timeout)
        .connect_lazy();
        channels.insert(addr.to_string(), channel.clone());
        Ok(channel)
    }

    fn remember_leader(&self, addr: Option<String>) {
        *self.leader.lock().expect("leader lock poisoned") = addr;
    }

    /// Returns the address of the coordinator believed to lead, if any.
    pub fn leader_hint(&self) -> Option<String> {
        self.leader.lock().expect("leader lock poisoned").clone()
    }

    /// Asks the known coordinators, one at a time, who leads, and remembers the
    /// answer. Writes sent to a follower would be forwarded, costing every request
    /// a second hop; one status call up front sends them to the leader directly.
    pub async fn discover_leader(&self) -> Option<String> {
        for addr in &self.endpoints {
            let Ok(mut client) = self.client_for(addr) else {
                continue;
            };
            let call = client.node_status(kiln_proto::v1::NodeStatusRequest {});
            if let Ok(Ok(resp)) = tokio::time::timeout(self.options.connect_timeout * 2, call).await
            {
                let status = resp.into_inner();
                if !status.leader_addr.is_empty() {
                    self.remember_leader(Some(status.leader_addr.clone()));
                    return Some(status.leader_addr);
                }
            }
        }
        None
    }

    /// Runs `op` against the leader, following hints and retrying retryable errors
    /// until the deadline.
    pub async fn call<T, F, Fut>(&self, op: F) -> Result<T>
    where
        F: Fn(Client) -> Fut,
        Fut: Future<Output = std::result::Result<T, tonic::Status>>,
    {
        self.call_with_deadline(self.options.deadline, op).await
    }

    /// Like [`ClusterClient::call`] with an explicit overall deadline.
    pub async fn call_with_deadline<T, F, Fut>(&self, deadline: Duration, op: F) -> Result<T>
    where
        F: Fn(Client) -> Fut,
        Fut: Future<Output = std::result::Result<T, tonic::Status>>,
    {
        let started = Instant::now();
        let mut backoff = self.options.initial_backoff;
        let mut next_endpoint = 0usize;
        let mut unreachable: std::collections::HashSet<String> = Default::default();
        let mut no_leader_seen = false;
        if self.leader_hint().is_none() {
            self.discover_leader().await;
        }
        let last = loop {
            let target = match self.leader_hint() {
                Some(addr) => addr,
                None => {
                    let addr = self.endpoints[next_endpoint % self.endpoints.len()].clone();
                    next_endpoint += 1;
                    addr
                }
            };
            let remaining = deadline.saturating_sub(started.elapsed());
            let attempt = tokio::time::timeout(
                remaining.min(self.options.attempt_timeout),
                op(self.client_for(&target)?),
            )
            .await;
            let err = match attempt {
                Ok(Ok(value)) => {
                    self.remember_leader(Some(target));
                    return Ok(value);
                }
                Ok(Err(status)) => {
                    let transport = is_transport_failure(&status);
                    let err = Error::from(status);
                    if transport {
                        unreachable.insert(target.clone());
                    } else {
                        unreachable.remove(&target);
                    }
                    err
                }
                Err(_) => Error::Timeout(format!("no answer from coordinator {target}")),
            };
            match &err {
                Error::NotLeader {
                    leader_addr: Some(addr),
                    ..
                } if *addr != target => {
                    self.remember_leader(Some(addr.clone()));
                    // A fresh hint is worth trying at once.
                    if started.elapsed() < deadline {
                        continue;
                    }
                }
                Error::NotLeader { .. } | Error::NoQuorum(_) => {
                    no_leader_seen = true;
                    self.remember_leader(None);
                }
                Error::Unavailable(_) | Error::Timeout(_) => {
                    self.remember_leader(None);
                }
                _ => return Err(err),
            }
            if started.elapsed() + backoff >= deadline {
                break err;
            }
            tokio::time::sleep(backoff).await;
            backoff = (backoff * 2).min(self.options.max_backoff);
        };
        if no_leader_seen {
            let reachable = self
                .endpoints
                .iter()
                .filter(|e| !unreachable.contains(*e))
                .count();
            return Err(Error::NoQuorum(format!(
                "no leader within {:.1}s ({} of {} known coordinators answered; last error: {last})",
                deadline.as_secs_f64(),
                reachable,
                self.endpoints.len()
            )));
        }
        Err(match last {
            Error::Unavailable(msg) => Error::Unavailable(format!(
                "no coordinator reachable within {:.1}s at {}: {msg}{}",
                deadline.as_secs_f64(),
                self.endpoints.join(", "),
                if self.options.tls.is_none() {
                    " (this client speaks plaintext: pass --ca if the cluster uses TLS)"
                } else {
                    ""
                }
            )),
            other => other,
        })
    }
}

fn is_transport_failure(status: &tonic::Status) -> bool {
    status.code() == tonic::Code::Unavailable && status.metadata().is_empty()
}
