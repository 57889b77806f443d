//! Wire protocols. Each codec decodes into [`crate::tensor::Tensor`]s and encodes results back; none
//! knows the runtime.

pub mod bounded;
pub mod error;
pub mod v1;
pub mod v2;
