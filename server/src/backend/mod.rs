//! The runtime boundary: a loaded model that turns input [`Tensor`]s into output tensors.
//!
//! Protocols and the batcher see only [`Backend`]; ONNX Runtime specifics live in [`ort`].

pub mod ort;

use std::time::Duration;

use crate::tensor::{DataType, Tensor};

/// Name, type and shape of one model input or output; `-1` marks a dynamic dimension.
#[derive(Debug, Clone, PartialEq)]
pub struct TensorSpec {
    /// Tensor name in the model.
    pub name: String,
    /// Element type.
    pub datatype: DataType,
    /// Dimensions, `-1` where dynamic.
    pub shape: Vec<i64>,
}

/// Inputs and outputs of a model, read from the model itself.
#[derive(Debug, Clone, PartialEq, Default)]
pub struct Signature {
    /// Model inputs, in model order.
    pub inputs: Vec<TensorSpec>,
    /// Model outputs, in model order.
    pub outputs: Vec<TensorSpec>,
}

/// Time spent in each phase of one execution (Triton's compute_input / compute_infer / compute_output).
#[derive(Debug, Clone, Copy, Default)]
pub struct PhaseTimes {
    /// Converting request tensors into runtime values.
    pub input: Duration,
    /// The runtime's own execution.
    pub infer: Duration,
    /// Converting runtime values back into tensors.
    pub output: Duration,
}

/// Errors raised by a backend.
#[derive(Debug, thiserror::Error)]
pub enum BackendError {
    /// The ONNX Runtime library could not be loaded.
    #[error("failed to load the ONNX Runtime library: {0}")]
    Library(String),
    /// The model could not be loaded.
    #[error("failed to load model from {path}: {message}")]
    Load {
        /// Model file.
        path: String,
        /// Why.
        message: String,
    },
    /// The request's tensors are not acceptable to the model (a client error).
    #[error("{0}")]
    InvalidInput(String),
    /// The runtime failed while executing (a server error).
    #[error("inference failed: {0}")]
    Runtime(String),
}

/// A loaded model ready to execute. Implementations are blocking; callers run them off the reactor.
pub trait Backend: Send + Sync {
    /// Inputs and outputs as declared by the model.
    fn signature(&self) -> &Signature;
    /// The execution provider really in use, e.g. `CPUExecutionProvider`.
    fn execution_provider(&self) -> &str;
    /// Why CUDA was tried and not used (`--execution-provider auto` on a machine where CUDA
    /// failed), in the runtime's words; None when nothing fell back.
    fn execution_provider_fallback(&self) -> Option<&str> {
        None
    }
    /// Number of executions that may run at once.
    fn instances(&self) -> usize;
    /// Runs the model on `inputs` (validated against the signature) and returns the `outputs` asked
    /// for (all when empty), in the order asked.
    fn infer(
        &self,
        inputs: Vec<Tensor>,
        outputs: &[String],
    ) -> Result<(Vec<Tensor>, PhaseTimes), BackendError>;
}
