//! The gRPC handlers: `inference.GRPCInferenceService` and `grpc.health.v1.Health`.

use std::pin::Pin;
use std::sync::Arc;
use std::time::{Duration, Instant};

use futures::{Stream, StreamExt};
use prost::Message as _;
use serde_json::Value;
use tokio::sync::watch;
use tonic::metadata::{Ascii, MetadataMap, MetadataValue};
use tonic::server::NamedService;
use tonic::{Request, Response, Status, Streaming};
use tracing::Instrument;

use super::health_pb::health_check_response::ServingStatus;
use super::health_pb::{HealthCheckRequest, HealthCheckResponse};
use super::pb::grpc_inference_service_server::{GrpcInferenceService, GrpcInferenceServiceServer};
use super::pb::*;
use super::{codec, status};
use crate::http::AppState;
use crate::http::routes;
use crate::inference;
use crate::protocol::error::ApiError;
use crate::protocol::v2;

/// Requests one `ModelStreamInfer` stream may have in flight; the stream reads no further
/// requests until one is answered (flow control towards the client).
pub const STREAM_CONCURRENCY: usize = 256;

type BoxStream<T> = Pin<Box<dyn Stream<Item = Result<T, Status>> + Send>>;

fn version_arg(v: &str) -> Option<&str> {
    Some(v).filter(|v| !v.is_empty())
}

/// Checks the caller's `authorization` metadata against the API keys (see [`crate::auth::authorize`]).
fn authorize(
    state: &AppState,
    metadata: &tonic::metadata::MetadataMap,
    model: Option<&str>,
    caller: &mut Option<String>,
) -> Result<(), ApiError> {
    let header = metadata.get("authorization").map(|v| v.as_bytes());
    crate::auth::authorize(state.api_keys.as_deref(), header, model, caller)
}

/// Which models a server-wide listing shows the caller with `metadata`.
fn listing(state: &AppState, metadata: &MetadataMap) -> crate::auth::Listing {
    let header = metadata.get("authorization").map(|v| v.as_bytes());
    crate::auth::Listing::for_caller(state.api_keys.as_deref(), header)
}

/// [`authorize`] for a unary call, as a gRPC status.
fn authorize_call<T>(
    state: &AppState,
    req: &Request<T>,
    model: Option<&str>,
    caller: &mut Option<String>,
) -> Result<(), Status> {
    authorize(state, req.metadata(), model, caller).map_err(|e| status(&e))
}

/// What an audit line says about one gRPC call or streamed request.
struct Audited {
    method: &'static str,
    model: String,
    version: String,
    caller: Option<String>,
    started: Instant,
    bytes_in: usize,
}

impl Audited {
    /// Starts the record of a call of `method` on `model`/`version` (sizes only measured when
    /// `--audit-log` is on).
    fn start<T: prost::Message>(
        state: &AppState,
        method: &'static str,
        msg: &T,
        model: &str,
        version: &str,
    ) -> Audited {
        Audited {
            method,
            model: model.to_string(),
            version: version.to_string(),
            caller: None,
            started: Instant::now(),
            bytes_in: if state.audit { msg.encoded_len() } else { 0 },
        }
    }

    /// Writes the line for an answer with `code` and `bytes_out` when `--audit-log` is on.
    fn write(&self, state: &AppState, code: tonic::Code, bytes_out: usize) {
        if !state.audit {
            return;
        }
        crate::audit::write(&crate::audit::Record {
            protocol: "grpc",
            route: self.method,
            model: Some(self.model.as_str()).filter(|m| !m.is_empty()),
            version: version_arg(&self.version),
            caller: self.caller.as_deref(),
            status: &format!("{code:?}"),
            bytes_in: self.bytes_in as u64,
            bytes_out: bytes_out as u64,
            latency: self.started.elapsed(),
        });
    }

    /// [`Audited::write`] for a unary call's result.
    fn result<T: prost::Message>(&self, state: &AppState, r: &Result<Response<T>, Status>) {
        match r {
            Ok(r) => self.write(state, tonic::Code::Ok, r.get_ref().encoded_len()),
            Err(s) => self.write(state, s.code(), 0),
        }
    }
}

/// `inference.GRPCInferenceService`.
pub struct Inference {
    state: Arc<AppState>,
    shutdown: watch::Receiver<bool>,
}

impl Inference {
    /// A call on the shared memory registry: it needs a key without a model list
    /// ([`crate::auth::SHARED_MEMORY`]) and is audited.
    fn shared_memory<T: prost::Message, R: prost::Message>(
        &self,
        method: &'static str,
        req: Request<T>,
        call: impl FnOnce(&crate::shm::SharedMemory, T) -> Result<R, crate::shm::ShmError>,
    ) -> Result<Response<R>, Status> {
        let mut audit = Audited::start(&self.state, method, req.get_ref(), "", "");
        let result = authorize_call(
            &self.state,
            &req,
            Some(crate::auth::SHARED_MEMORY),
            &mut audit.caller,
        )
        .and_then(|()| {
            call(&self.state.shm, req.into_inner()).map_err(|e| status(&crate::shm::registry_error(e)))
        })
        .map(Response::new);
        audit.result(&self.state, &result);
        result
    }

    /// The repository index (`only_ready`: only versions that serve) of the models `shown`.
    fn index(&self, only_ready: bool, shown: &crate::auth::Listing) -> RepositoryIndexResponse {
        let models = self
            .state
            .repo
            .index()
            .into_iter()
            .filter(|(name, _, state, _)| (!only_ready || *state == "READY") && shown.shows(name))
            .map(|(name, v, state, reason)| repository_index_response::ModelIndex {
                name,
                version: v.to_string(),
                state: state.into(),
                reason,
            })
            .collect();
        RepositoryIndexResponse { models }
    }

    /// Handlers over `state`; streams stop reading requests when `shutdown` turns true.
    pub fn new(state: Arc<AppState>, shutdown: watch::Receiver<bool>) -> Inference {
        Inference { state, shutdown }
    }
}

/// Runs one inference request through the shared execution path (statistics, metrics, batching).
/// `authorization`: the caller's key, kept when keys are on for a request that names shared memory.
async fn infer(
    state: &AppState,
    req: ModelInferRequest,
    authorization: Option<MetadataValue<Ascii>>,
) -> Result<ModelInferResponse, ApiError> {
    let span = inference::request_span("grpc", &req.model_name, version_arg(&req.model_version));
    infer_in_span(state, req, authorization).instrument(span).await
}

/// The caller's key, kept (a cheap clone) when keys are on: see [`infer`].
fn authorization(state: &AppState, metadata: &MetadataMap) -> Option<MetadataValue<Ascii>> {
    state
        .api_keys
        .as_ref()
        .and_then(|_| metadata.get("authorization").cloned())
}

async fn infer_in_span(
    state: &AppState,
    mut req: ModelInferRequest,
    authorization: Option<MetadataValue<Ascii>>,
) -> Result<ModelInferResponse, ApiError> {
    let shm = Some(state.shm.as_ref());
    let start = Instant::now();
    let version = version_arg(&req.model_version).map(str::to_owned);
    let (model, stats) = state
        .repo
        .ready_model(&req.model_name, version.as_deref())
        .map_err(inference::count_not_ready)?;
    let _inflight = inference::InFlight::enter(&stats);
    // The message is already decoded by tonic (within --max-request-bytes; `budget` counted its
    // bytes while they arrived); its size still counts against the body budget while its tensors
    // are decoded and run.
    let mut ticket = crate::admission::Ticket::default();
    let admitted = state
        .admission
        .reserve(&mut ticket, req.encoded_len())
        .and_then(|()| state.admission.admit(&mut ticket))
        .map(|()| ticket);
    let mut ticket = inference::counted(&stats, start, admitted)?;
    // Inputs read from shared memory are held like a message until the answer is built.
    let mut gate = crate::shm::gate(
        state.api_keys.as_deref(),
        authorization.as_ref().map(|v| v.as_bytes()),
        &state.admission,
        &mut ticket,
    );
    let decoded = inference::counted(
        &stats,
        start,
        codec::decode_request(model.backend.signature(), &mut req, shm, &mut gate),
    )?;
    drop(gate);
    let held = state.admission.reserve_decoded(&mut ticket, &decoded.inputs);
    inference::counted(&stats, start, held)?;
    let timeout = inference::counted(&stats, start, v2::timeout_param(Some(&decoded.parameters)))?;
    let outputs = inference::execute(
        model.clone(),
        &stats,
        start,
        decoded.inputs,
        decoded.outputs,
        timeout,
    )
    .await?;
    codec::encode_response(
        &req.model_name,
        model.version,
        &req,
        decoded.raw,
        outputs,
        &decoded.shm_outputs,
    )
}

/// `version_policy` of `/config`'s JSON as the message's choice.
fn version_policy(v: &Value) -> model_version_policy::PolicyChoice {
    use model_version_policy::{Latest, PolicyChoice, Specific};
    if let Some(n) = v["latest"]["num_versions"].as_u64() {
        return PolicyChoice::Latest(Latest {
            num_versions: u32::try_from(n).unwrap_or(u32::MAX),
        });
    }
    if let Some(list) = v["specific"]["versions"].as_array() {
        return PolicyChoice::Specific(Specific {
            versions: list.iter().filter_map(Value::as_i64).collect(),
        });
    }
    PolicyChoice::All(model_version_policy::All {})
}

/// Triton's model configuration as the `ModelConfig` message, from the same JSON REST answers.
fn config_message(v: &Value) -> ModelConfig {
    let text = |v: &Value| v.as_str().unwrap_or_default().to_string();
    let dims = |v: &Value| -> Vec<i64> {
        v.as_array()
            .map(|a| a.iter().filter_map(Value::as_i64).collect())
            .unwrap_or_default()
    };
    let data_type = |v: &Value| {
        DataType::from_str_name(v.as_str().unwrap_or_default()).unwrap_or(DataType::TypeInvalid) as i32
    };
    let list = |v: &Value| v.as_array().cloned().unwrap_or_default();
    let batching = &v["dynamic_batching"];
    ModelConfig {
        name: text(&v["name"]),
        platform: text(&v["platform"]),
        backend: text(&v["backend"]),
        version_policy: Some(ModelVersionPolicy {
            policy_choice: Some(version_policy(&v["version_policy"])),
        }),
        max_batch_size: v["max_batch_size"].as_i64().unwrap_or(0) as i32,
        input: list(&v["input"])
            .iter()
            .map(|t| ModelInput {
                name: text(&t["name"]),
                data_type: data_type(&t["data_type"]),
                dims: dims(&t["dims"]),
            })
            .collect(),
        output: list(&v["output"])
            .iter()
            .map(|t| ModelOutput {
                name: text(&t["name"]),
                data_type: data_type(&t["data_type"]),
                dims: dims(&t["dims"]),
            })
            .collect(),
        instance_group: list(&v["instance_group"])
            .iter()
            .map(|g| ModelInstanceGroup {
                name: text(&g["name"]),
                count: g["count"].as_i64().unwrap_or(0) as i32,
                gpus: dims(&g["gpus"]).into_iter().map(|d| d as i32).collect(),
                kind: model_instance_group::Kind::from_str_name(g["kind"].as_str().unwrap_or_default())
                    .unwrap_or(model_instance_group::Kind::Auto) as i32,
            })
            .collect(),
        dynamic_batching: batching.is_object().then(|| ModelDynamicBatching {
            preferred_batch_size: dims(&batching["preferred_batch_size"])
                .into_iter()
                .map(|n| n as i32)
                .collect(),
            max_queue_delay_microseconds: batching["max_queue_delay_microseconds"].as_u64().unwrap_or(0),
            default_queue_policy: Some(ModelQueuePolicy {
                max_queue_size: batching["default_queue_policy"]["max_queue_size"]
                    .as_u64()
                    .unwrap_or(0) as u32,
            }),
        }),
        parameters: v["parameters"]
            .as_object()
            .map(|p| {
                p.iter()
                    .map(|(k, v)| {
                        (
                            k.clone(),
                            ModelParameter {
                                string_value: text(&v["string_value"]),
                            },
                        )
                    })
                    .collect()
            })
            .unwrap_or_default(),
    }
}

/// Triton's statistics as `ModelStatistics` messages, from the same JSON REST answers.
fn statistics_message(v: &Value) -> ModelStatisticsResponse {
    let duration = |d: &Value| {
        Some(StatisticDuration {
            count: d["count"].as_u64().unwrap_or(0),
            ns: d["ns"].as_u64().unwrap_or(0),
        })
    };
    let n = |v: &Value| v.as_u64().unwrap_or(0);
    let entries = v["model_stats"].as_array().cloned().unwrap_or_default();
    ModelStatisticsResponse {
        model_stats: entries
            .iter()
            .map(|m| {
                let s = &m["inference_stats"];
                ModelStatistics {
                    name: m["name"].as_str().unwrap_or_default().to_string(),
                    version: m["version"].as_str().unwrap_or_default().to_string(),
                    last_inference: n(&m["last_inference"]),
                    inference_count: n(&m["inference_count"]),
                    execution_count: n(&m["execution_count"]),
                    inference_stats: Some(InferStatistics {
                        success: duration(&s["success"]),
                        fail: duration(&s["fail"]),
                        queue: duration(&s["queue"]),
                        compute_input: duration(&s["compute_input"]),
                        compute_infer: duration(&s["compute_infer"]),
                        compute_output: duration(&s["compute_output"]),
                        cache_hit: duration(&s["cache_hit"]),
                        cache_miss: duration(&s["cache_miss"]),
                    }),
                    batch_stats: m["batch_stats"]
                        .as_array()
                        .map(|b| {
                            b.iter()
                                .map(|b| InferBatchStatistics {
                                    batch_size: n(&b["batch_size"]),
                                    compute_input: duration(&b["compute_input"]),
                                    compute_infer: duration(&b["compute_infer"]),
                                    compute_output: duration(&b["compute_output"]),
                                })
                                .collect()
                        })
                        .unwrap_or_default(),
                }
            })
            .collect(),
    }
}

impl Inference {
    fn metadata(
        &self,
        req: Request<ModelMetadataRequest>,
        caller: &mut Option<String>,
    ) -> Result<Response<ModelMetadataResponse>, Status> {
        authorize_call(&self.state, &req, Some(&req.get_ref().name), caller)?;
        let req = req.into_inner();
        let version = version_arg(&req.version);
        let (model, _) = self
            .state
            .repo
            .ready_model(&req.name, version)
            .map_err(|e| status(&e.into()))?;
        let versions = match version {
            Some(_) => vec![model.version],
            None => self.state.repo.ready_versions(&req.name),
        };
        let sig = model.backend.signature();
        let tensors = |specs: &[crate::backend::TensorSpec]| {
            specs
                .iter()
                .map(|s| model_metadata_response::TensorMetadata {
                    name: s.name.clone(),
                    datatype: s.datatype.v2_name().into(),
                    shape: s.shape.clone(),
                })
                .collect()
        };
        Ok(Response::new(ModelMetadataResponse {
            name: req.name,
            versions: versions.iter().map(u64::to_string).collect(),
            platform: v2::PLATFORM.into(),
            inputs: tensors(&sig.inputs),
            outputs: tensors(&sig.outputs),
        }))
    }

    fn config(
        &self,
        req: Request<ModelConfigRequest>,
        caller: &mut Option<String>,
    ) -> Result<Response<ModelConfigResponse>, Status> {
        authorize_call(&self.state, &req, Some(&req.get_ref().name), caller)?;
        let req = req.into_inner();
        let json = routes::model_config_json(&self.state, &req.name, version_arg(&req.version))
            .map_err(|e| status(&e))?;
        Ok(Response::new(ModelConfigResponse {
            config: Some(config_message(&json)),
        }))
    }
}

#[tonic::async_trait]
impl GrpcInferenceService for Inference {
    async fn server_live(
        &self,
        _: Request<ServerLiveRequest>,
    ) -> Result<Response<ServerLiveResponse>, Status> {
        Ok(Response::new(ServerLiveResponse { live: true }))
    }

    async fn server_ready(
        &self,
        _: Request<ServerReadyRequest>,
    ) -> Result<Response<ServerReadyResponse>, Status> {
        Ok(Response::new(ServerReadyResponse {
            ready: self.state.repo.all_ready(),
        }))
    }

    async fn model_ready(
        &self,
        req: Request<ModelReadyRequest>,
    ) -> Result<Response<ModelReadyResponse>, Status> {
        let req = req.into_inner();
        // As Triton answers: a model or version not served here is not ready, not an error
        // (`tritonclient.grpc`'s `is_model_ready` raises on an error status, where its HTTP twin
        // returns False).
        let ready = self
            .state
            .repo
            .ready_model(&req.name, version_arg(&req.version))
            .is_ok_and(|_| !self.state.repo.is_shutting_down());
        Ok(Response::new(ModelReadyResponse { ready }))
    }

    async fn server_metadata(
        &self,
        req: Request<ServerMetadataRequest>,
    ) -> Result<Response<ServerMetadataResponse>, Status> {
        let mut audit = Audited::start(&self.state, "ServerMetadata", req.get_ref(), "", "");
        let result = authorize_call(&self.state, &req, None, &mut audit.caller).map(|()| {
            Response::new(ServerMetadataResponse {
                name: "kubemaas".into(),
                version: env!("CARGO_PKG_VERSION").into(),
                extensions: v2::extensions(&self.state.shm)
                    .iter()
                    .map(|e| e.to_string())
                    .collect(),
            })
        });
        audit.result(&self.state, &result);
        result
    }

    async fn model_metadata(
        &self,
        req: Request<ModelMetadataRequest>,
    ) -> Result<Response<ModelMetadataResponse>, Status> {
        let m = req.get_ref();
        let mut audit = Audited::start(&self.state, "ModelMetadata", m, &m.name, &m.version);
        let result = self.metadata(req, &mut audit.caller);
        audit.result(&self.state, &result);
        result
    }

    async fn model_infer(
        &self,
        req: Request<ModelInferRequest>,
    ) -> Result<Response<ModelInferResponse>, Status> {
        let m = req.get_ref();
        let mut audit = Audited::start(&self.state, "ModelInfer", m, &m.model_name, &m.model_version);
        let key = authorization(&self.state, req.metadata());
        let result = match authorize_call(&self.state, &req, Some(&m.model_name), &mut audit.caller) {
            Err(s) => Err(s),
            Ok(()) => match infer(&self.state, req.into_inner(), key).await {
                Ok(r) => Ok(Response::new(r)),
                Err(e) => {
                    if matches!(e, ApiError::Internal(_)) {
                        tracing::error!(error = %e, "gRPC request failed");
                    }
                    Err(status(&e))
                }
            },
        };
        audit.result(&self.state, &result);
        result
    }

    type ModelStreamInferStream = BoxStream<ModelStreamInferResponse>;

    async fn model_stream_infer(
        &self,
        req: Request<Streaming<ModelInferRequest>>,
    ) -> Result<Response<Self::ModelStreamInferStream>, Status> {
        // A stream needs a valid key to open; each request is then checked for its model.
        authorize_call(&self.state, &req, None, &mut None)?;
        let metadata = req.metadata().clone();
        let state = self.state.clone();
        let mut stop = self.shutdown.clone();
        // At shutdown the stream reads no more requests, answers those it holds, then ends with
        // UNAVAILABLE, so a client knows that what it sent after them did not run.
        let cut = Arc::new(std::sync::atomic::AtomicBool::new(false));
        let cut_by_stop = cut.clone();
        let stopped = async move {
            let _ = stop.wait_for(|s| *s).await;
            cut_by_stop.store(true, std::sync::atomic::Ordering::SeqCst);
        };
        let rewrite = super::transport_status(state.max_request_bytes);
        let answers = req
            .into_inner()
            .take_until(stopped)
            .map(move |item| {
                let state = state.clone();
                let rewrite = rewrite.clone();
                let metadata = metadata.clone();
                async move {
                    // A request that cannot be decoded from the wire breaks the stream's framing:
                    // it ends the stream with its status. Any other failure is one error message.
                    let req = item.map_err(rewrite)?;
                    let echo = ModelInferResponse {
                        model_name: req.model_name.clone(),
                        model_version: req.model_version.clone(),
                        id: req.id.clone(),
                        ..Default::default()
                    };
                    let mut audit = Audited::start(
                        &state,
                        "ModelStreamInfer",
                        &req,
                        &req.model_name,
                        &req.model_version,
                    );
                    let answer = match authorize(&state, &metadata, Some(&req.model_name), &mut audit.caller)
                    {
                        Ok(()) => infer(&state, req, authorization(&state, &metadata)).await,
                        Err(e) => Err(e),
                    };
                    match &answer {
                        Ok(r) => audit.write(&state, tonic::Code::Ok, r.encoded_len()),
                        Err(e) => audit.write(&state, status(e).code(), 0),
                    }
                    let (error_message, mut r) = match answer {
                        Ok(r) => (String::new(), r),
                        Err(e) => (e.to_string(), echo),
                    };
                    // As Triton marks each streamed answer: one request, one answer, so every
                    // answer is its request's last.
                    r.parameters.insert(
                        "triton_final_response".into(),
                        InferParameter {
                            parameter_choice: Some(infer_parameter::ParameterChoice::BoolParam(true)),
                        },
                    );
                    Ok(ModelStreamInferResponse {
                        error_message,
                        infer_response: Some(r),
                    })
                }
            })
            // Answers leave in request order; up to STREAM_CONCURRENCY run at once.
            .buffered(STREAM_CONCURRENCY);
        let end = futures::stream::once(async move { cut.load(std::sync::atomic::Ordering::SeqCst) })
            .filter_map(|cut| async move {
                cut.then(|| {
                    Err(Status::unavailable(
                        "the server is shutting down: the requests above were answered; any sent after them were not read and did not run (send them to another replica)",
                    ))
                })
            });
        Ok(Response::new(Box::pin(answers.chain(end))))
    }

    async fn model_config(
        &self,
        req: Request<ModelConfigRequest>,
    ) -> Result<Response<ModelConfigResponse>, Status> {
        let m = req.get_ref();
        let mut audit = Audited::start(&self.state, "ModelConfig", m, &m.name, &m.version);
        let result = self.config(req, &mut audit.caller);
        audit.result(&self.state, &result);
        result
    }

    async fn model_statistics(
        &self,
        req: Request<ModelStatisticsRequest>,
    ) -> Result<Response<ModelStatisticsResponse>, Status> {
        let m = req.get_ref();
        let mut audit = Audited::start(&self.state, "ModelStatistics", m, &m.name, &m.version);
        let model = Some(m.name.as_str()).filter(|n| !n.is_empty());
        let result = authorize_call(&self.state, &req, model, &mut audit.caller).and_then(|()| {
            let shown = listing(&self.state, req.metadata());
            let json =
                routes::stats(&self.state, model, version_arg(&m.version), &shown).map_err(|e| status(&e))?;
            Ok(Response::new(statistics_message(&json)))
        });
        audit.result(&self.state, &result);
        result
    }

    async fn repository_index(
        &self,
        req: Request<RepositoryIndexRequest>,
    ) -> Result<Response<RepositoryIndexResponse>, Status> {
        let mut audit = Audited::start(&self.state, "RepositoryIndex", req.get_ref(), "", "");
        let result = authorize_call(&self.state, &req, None, &mut audit.caller)
            .map(|()| Response::new(self.index(req.get_ref().ready, &listing(&self.state, req.metadata()))));
        audit.result(&self.state, &result);
        result
    }

    async fn system_shared_memory_status(
        &self,
        req: Request<SystemSharedMemoryStatusRequest>,
    ) -> Result<Response<SystemSharedMemoryStatusResponse>, Status> {
        self.shared_memory("SystemSharedMemoryStatus", req, |shm, r| {
            let regions = shm
                .status(Some(r.name.as_str()).filter(|n| !n.is_empty()))?
                .into_iter()
                .map(|r| {
                    let region = system_shared_memory_status_response::RegionStatus {
                        name: r.name.clone(),
                        key: r.key,
                        offset: r.offset,
                        byte_size: r.byte_size,
                    };
                    (r.name, region)
                })
                .collect();
            Ok(SystemSharedMemoryStatusResponse { regions })
        })
    }

    async fn system_shared_memory_register(
        &self,
        req: Request<SystemSharedMemoryRegisterRequest>,
    ) -> Result<Response<SystemSharedMemoryRegisterResponse>, Status> {
        self.shared_memory("SystemSharedMemoryRegister", req, |shm, r| {
            shm.register(&r.name, &r.key, r.offset, r.byte_size)
                .map(|()| SystemSharedMemoryRegisterResponse {})
        })
    }

    async fn system_shared_memory_unregister(
        &self,
        req: Request<SystemSharedMemoryUnregisterRequest>,
    ) -> Result<Response<SystemSharedMemoryUnregisterResponse>, Status> {
        self.shared_memory("SystemSharedMemoryUnregister", req, |shm, r| {
            shm.unregister(Some(r.name.as_str()).filter(|n| !n.is_empty()))
                .map(|()| SystemSharedMemoryUnregisterResponse {})
        })
    }
}

/// `grpc.health.v1.Health`: what Kubernetes' gRPC probes and meshes ask.
pub struct Health {
    state: Arc<AppState>,
    shutdown: watch::Receiver<bool>,
}

/// How often `Watch` re-reads readiness.
const WATCH_INTERVAL: Duration = Duration::from_millis(250);

impl Health {
    /// Health of the server over `state`; `Watch` streams end when `shutdown` turns true.
    pub fn new(state: Arc<AppState>, shutdown: watch::Receiver<bool>) -> Health {
        Health { state, shutdown }
    }
}

/// The status of `service` ("" is the whole server); None for a service not served here.
fn serving(state: &AppState, service: &str) -> Option<ServingStatus> {
    let inference = <GrpcInferenceServiceServer<Inference> as NamedService>::NAME;
    (service.is_empty() || service == inference).then(|| {
        if state.repo.all_ready() {
            ServingStatus::Serving
        } else {
            ServingStatus::NotServing
        }
    })
}

#[tonic::async_trait]
impl super::health_pb::health_server::Health for Health {
    async fn check(&self, req: Request<HealthCheckRequest>) -> Result<Response<HealthCheckResponse>, Status> {
        let service = req.into_inner().service;
        let s = serving(&self.state, &service).ok_or_else(|| {
            // The name is the client's: quoted, it may be megabytes.
            let message = format!(
                "unknown service {service:?}; this server reports \"\" and \"{}\"",
                <GrpcInferenceServiceServer<Inference> as NamedService>::NAME
            );
            Status::not_found(crate::protocol::error::clip(&message, super::GRPC_MESSAGE_BYTES).into_owned())
        })?;
        Ok(Response::new(HealthCheckResponse { status: s as i32 }))
    }

    type WatchStream = BoxStream<HealthCheckResponse>;

    async fn watch(&self, req: Request<HealthCheckRequest>) -> Result<Response<Self::WatchStream>, Status> {
        let service = req.into_inner().service;
        let start = (
            self.state.clone(),
            self.shutdown.clone(),
            None::<ServingStatus>,
            false,
        );
        // The current status at once, then every change; the stream ends at shutdown (after
        // reporting NOT_SERVING) so it does not hold the drain open.
        let updates = futures::stream::unfold(start, move |(state, mut stop, last, done)| {
            let service = service.clone();
            async move {
                if done {
                    return None;
                }
                loop {
                    let now = serving(&state, &service).unwrap_or(ServingStatus::ServiceUnknown);
                    let stopping = *stop.borrow();
                    if last != Some(now) {
                        let msg = HealthCheckResponse { status: now as i32 };
                        return Some((Ok(msg), (state, stop, Some(now), stopping)));
                    }
                    if stopping {
                        return None;
                    }
                    tokio::select! {
                        _ = tokio::time::sleep(WATCH_INTERVAL) => {}
                        _ = stop.changed() => {}
                    }
                }
            }
        });
        Ok(Response::new(Box::pin(updates)))
    }
}
