//! KubeMaaS operator: reconciles `ModelDeployment`s into GPU-aware serving pods and writes the
//! truth about them back to the resource's status.
//!
//! [`controller`] holds the reconcile pipeline (validate → build → apply → status); [`leader`]
//! the Lease-based election; [`render`] prints children without a cluster; [`metrics`] and
//! [`httpd`] the operator's own observability.

pub mod controller;
pub mod faults;
pub mod httpd;
pub mod leader;
pub mod metrics;
pub mod render;
pub mod strict;
