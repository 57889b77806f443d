//! Admission control: bounds on what clients together can make the server hold at once —
//! connections, inference requests in flight, and bytes of request bodies — so that one client (or
//! a burst) cannot exhaust memory or file descriptors. What is over a bound is refused at once with
//! 503 and `Retry-After` (gRPC UNAVAILABLE), never queued without limit.

use std::fmt::Write as _;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering::Relaxed};

use tokio::sync::{OwnedSemaphorePermit, Semaphore};

use crate::protocol::error::ApiError;
use crate::tensor::{Tensor, TensorData};

/// Bytes a decoded BYTES element holds beyond its data, as measured: its handle here (32) and as
/// much again of the list's spare room, a `String` and a `CString` on the way into ONNX Runtime
/// (about 56 with their allocations) and the runtime's `std::string` (32), and the output's
/// handle; 2.8 million empty strings grew the server by 527 MiB, about 197 bytes each with the
/// body and the answer. [`Admission::reserve_decoded`].
pub const STRING_ELEMENT_BYTES: usize = 192;

/// The bounds (from `serve` flags).
#[derive(Debug, Clone, Copy)]
pub struct Limits {
    /// Open client connections per listener (`--max-connections`).
    pub connections: usize,
    /// Inference requests in flight, all protocols together (`--max-concurrent-requests`).
    pub requests: usize,
    /// Bytes of request bodies held at once (`--max-buffered-request-bytes`).
    pub body_bytes: usize,
}

/// Shared counters and semaphores for [`Limits`].
#[derive(Debug)]
pub struct Admission {
    limits: Limits,
    requests: Arc<Semaphore>,
    body_bytes: Arc<Semaphore>,
    shed_requests: AtomicU64,
    shed_bytes: AtomicU64,
    shed_connections: AtomicU64,
}

/// Held while a request is in the server; dropping it frees its share.
#[derive(Debug, Default)]
pub struct Ticket {
    request: Option<OwnedSemaphorePermit>,
    bytes: Option<OwnedSemaphorePermit>,
}

impl Admission {
    /// Counters for `limits`.
    pub fn new(limits: Limits) -> Admission {
        // A semaphore holds at most usize::MAX >> 3 permits.
        let bytes = limits.body_bytes.min(Semaphore::MAX_PERMITS);
        Admission {
            limits,
            requests: Arc::new(Semaphore::new(limits.requests)),
            body_bytes: Arc::new(Semaphore::new(bytes)),
            shed_requests: AtomicU64::new(0),
            shed_bytes: AtomicU64::new(0),
            shed_connections: AtomicU64::new(0),
        }
    }

    /// The bounds in force.
    pub fn limits(&self) -> Limits {
        self.limits
    }

    /// Admits `ticket`'s request as one in flight, or refuses it when `--max-concurrent-requests`
    /// are. Called once its body is in: a client that sends headers and no body holds no place.
    pub fn admit(&self, ticket: &mut Ticket) -> Result<(), ApiError> {
        if ticket.request.is_some() {
            return Ok(());
        }
        match self.requests.clone().try_acquire_owned() {
            Ok(p) => {
                ticket.request = Some(p);
                Ok(())
            }
            Err(_) => {
                self.shed_requests.fetch_add(1, Relaxed);
                Err(ApiError::Overloaded(format!(
                    "the server is at its limit of {} inference requests in flight \
                     (--max-concurrent-requests); retry shortly or send to another replica",
                    self.limits.requests
                )))
            }
        }
    }

    /// Reserves `n` more bytes of request body for `ticket`, or refuses when the bodies held by
    /// all requests would exceed `--max-buffered-request-bytes`.
    pub fn reserve(&self, ticket: &mut Ticket, n: usize) -> Result<(), ApiError> {
        if n == 0 {
            return Ok(());
        }
        let refused = || {
            self.shed_bytes.fetch_add(1, Relaxed);
            ApiError::Overloaded(format!(
                "the server already holds request bodies close to its budget of {} bytes \
                 (--max-buffered-request-bytes); retry shortly or send to another replica",
                self.limits.body_bytes
            ))
        };
        if n > self.body_bytes.available_permits() {
            return Err(refused());
        }
        // A semaphore hands out at most u32::MAX permits at once.
        let mut left = n;
        while left > 0 {
            let step = left.min(u32::MAX as usize);
            let permit = self
                .body_bytes
                .clone()
                .try_acquire_many_owned(step as u32)
                .map_err(|_| refused())?;
            match &mut ticket.bytes {
                Some(held) => held.merge(permit),
                None => ticket.bytes = Some(permit),
            }
            left -= step;
        }
        Ok(())
    }

    /// Reserves, beyond the body, what the decoded BYTES elements of `inputs` hold: an empty
    /// string is 4 bytes of binary body (about 3 in JSON) but [`STRING_ELEMENT_BYTES`] in memory,
    /// so without this one body could hold many times its size. A request that could never fit
    /// the budget is refused as too large rather than told to retry.
    pub fn reserve_decoded(&self, ticket: &mut Ticket, inputs: &[Tensor]) -> Result<(), ApiError> {
        let elements: usize = inputs
            .iter()
            .map(|t| match &t.data {
                TensorData::Strings(s) => s.len(),
                TensorData::Raw(_) => 0,
            })
            .sum();
        let n = elements.saturating_mul(STRING_ELEMENT_BYTES);
        if n > self.limits.body_bytes {
            return Err(ApiError::PayloadTooLarge(format!(
                "the request's {elements} BYTES elements take {n} bytes once decoded \
                 ({STRING_ELEMENT_BYTES} each beyond their data), more than \
                 --max-buffered-request-bytes ({}); send fewer elements per request",
                self.limits.body_bytes
            )));
        }
        self.reserve(ticket, n)
    }

    /// Counts a connection closed because `--max-connections` were open.
    pub fn shed_connection(&self) {
        self.shed_connections.fetch_add(1, Relaxed);
    }

    /// Prometheus families: what is held now and what was refused.
    pub fn render(&self) -> String {
        let mut out = String::new();
        let in_flight = self.limits.requests - self.requests.available_permits();
        let held = self.limits.body_bytes.min(Semaphore::MAX_PERMITS) - self.body_bytes.available_permits();
        let _ = writeln!(
            out,
            "# HELP kubemaas_requests_in_flight Inference requests admitted and not yet answered, all protocols\n\
             # TYPE kubemaas_requests_in_flight gauge\nkubemaas_requests_in_flight {in_flight}\n\
             # HELP kubemaas_request_body_bytes_held Bytes of request bodies the server holds now\n\
             # TYPE kubemaas_request_body_bytes_held gauge\nkubemaas_request_body_bytes_held {held}\n\
             # HELP kubemaas_requests_shed_total Requests and connections refused at a limit\n\
             # TYPE kubemaas_requests_shed_total counter"
        );
        for (limit, n) in [
            ("max_concurrent_requests", &self.shed_requests),
            ("max_buffered_request_bytes", &self.shed_bytes),
            ("max_connections", &self.shed_connections),
        ] {
            let _ = writeln!(
                out,
                "kubemaas_requests_shed_total{{limit=\"{limit}\"}} {}",
                n.load(Relaxed)
            );
        }
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn requests_and_bytes_are_bounded_and_freed_on_drop() {
        let a = Admission::new(Limits {
            connections: 1,
            requests: 2,
            body_bytes: 100,
        });
        let admitted = || {
            let mut t = Ticket::default();
            a.admit(&mut t).map(|()| t)
        };
        let mut t1 = admitted().unwrap();
        let t2 = admitted().unwrap();
        assert!(matches!(admitted(), Err(ApiError::Overloaded(_))));
        a.reserve(&mut t1, 60).unwrap();
        a.reserve(&mut t1, 30).unwrap();
        let mut t3 = {
            drop(t2);
            admitted().unwrap()
        };
        assert!(a.reserve(&mut t3, 11).is_err());
        assert!(a.render().contains("kubemaas_request_body_bytes_held 90"));
        drop(t1);
        a.reserve(&mut t3, 100).unwrap();
        assert!(
            a.render()
                .contains("kubemaas_requests_shed_total{limit=\"max_concurrent_requests\"} 1")
        );
        assert!(
            a.render()
                .contains("kubemaas_requests_shed_total{limit=\"max_buffered_request_bytes\"} 1")
        );
    }
}
