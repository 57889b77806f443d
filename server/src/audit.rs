//! The audit log (`serve --audit-log`): one structured line per request answered on the HTTP port
//! (except the kubelet's health and readiness probes) and per gRPC inference, metadata or config
//! call (each request of a stream counts), so "who called what, and how did it go" is answerable
//! from the pod's log. Lines go through the server's logger with the target [`TARGET`] (JSON with
//! `--log-format json`); they carry the caller's key ID, never a key.

use std::time::Duration;

/// The `target` of audit lines (filter on it, e.g. `--log-level info,kubemaas_audit=info`).
pub const TARGET: &str = "kubemaas_audit";

/// One request, as audited.
#[derive(Debug)]
pub struct Record<'a> {
    /// `http` or `grpc`.
    pub protocol: &'static str,
    /// The path (REST) or method (gRPC).
    pub route: &'a str,
    /// The model addressed, if any.
    pub model: Option<&'a str>,
    /// The version asked for, if any.
    pub version: Option<&'a str>,
    /// The API key's ID; None without API keys (or before a key was accepted).
    pub caller: Option<&'a str>,
    /// HTTP status code, or the gRPC status code's name.
    pub status: &'a str,
    /// Request body bytes (REST: as declared by Content-Length; gRPC: the message).
    pub bytes_in: u64,
    /// Response body bytes.
    pub bytes_out: u64,
    /// From receipt to answer.
    pub latency: Duration,
}

/// Writes one audit line.
pub fn write(r: &Record<'_>) {
    tracing::info!(
        target: TARGET,
        protocol = r.protocol,
        route = r.route,
        model = r.model.unwrap_or(""),
        version = r.version.unwrap_or(""),
        caller = r.caller.unwrap_or("anonymous"),
        status = r.status,
        bytes_in = r.bytes_in,
        bytes_out = r.bytes_out,
        latency_ms = r.latency.as_secs_f64() * 1000.0,
        "request"
    );
}
