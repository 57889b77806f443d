//! KubeMaaS inference server: serves ONNX models through ONNX Runtime behind the KServe Open
//! Inference Protocol (V2, with Triton's binary tensor extension, model configuration and
//! statistics) and the TF-Serving REST API, so existing clients work unchanged.
//!
//! Layout: [`tensor`] is the protocol-neutral tensor; [`protocol`] holds the codecs; [`backend`]
//! the runtime; [`repository`] the models and their states; [`inference`] executes validated
//! requests; [`http`] is the REST transport and [`grpc`] the gRPC one; [`metrics`] renders Prometheus text; [`serve`] wires them.

pub mod admission;
pub mod audit;
pub mod auth;
pub mod backend;
pub mod batcher;
pub mod compress;
pub mod gpu;
pub mod grpc;
pub mod http;
pub mod inference;
pub mod jsonfloat;
pub mod listener;
pub mod metrics;
pub mod model_config;
pub mod offload;
pub mod protocol;
pub mod pull;
pub mod repository;
pub mod serve;
pub mod shm;
pub mod tensor;
pub mod watched;
