//! The REST ports' body bounds, applied to gRPC: tonic buffers a whole message before a handler
//! sees it, so without this a client could hold up to `--max-request-bytes` per stream, on every
//! stream of every connection, uncounted, and trickle it in forever. Here the bytes of a message
//! still arriving count against `--max-buffered-request-bytes` as its frames come, and a message
//! must arrive whole within `--body-read-timeout` of its first byte (a unary call: of the call's
//! start). Once a message is whole, the handler counts it (`service::infer`), so its bytes are
//! released here.

use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll, ready};
use std::time::Duration;

use bytes::Bytes;
use hyper::body::{Body as HttpBody, Frame, SizeHint};
use tokio::time::Sleep;
use tonic::Status;
use tonic::body::Body;

use crate::admission::{Admission, Ticket};
use crate::protocol::error::ApiError;

/// Wraps each request's body in [`Budgeted`]; see the module's description.
#[derive(Debug, Clone)]
pub struct BodyBudget {
    /// The shared byte budget.
    pub admission: Arc<Admission>,
    /// `--body-read-timeout`.
    pub timeout: Duration,
}

impl BodyBudget {
    /// `req` with its body counted and timed.
    pub fn wrap(&self, req: http::Request<Body>) -> http::Request<Body> {
        // A stream may idle between messages; a unary call's one message is due from the start.
        let streaming = req.uri().path().ends_with("/ModelStreamInfer");
        req.map(|inner| {
            let mut body = Budgeted {
                inner,
                admission: self.admission.clone(),
                timeout: self.timeout,
                ticket: Ticket::default(),
                framing: Framing::default(),
                streaming,
                deadline: None,
            };
            if !streaming {
                body.deadline = Some(Deadline::after(self.timeout));
            }
            Body::new(body)
        })
    }
}

/// Where a body stands in gRPC's framing: each message is a 5-byte prefix (a compression flag
/// and a big-endian length) and then that many bytes.
#[derive(Debug, Default)]
struct Framing {
    prefix: [u8; 5],
    have: usize,
    left: u64,
    partial: u64,
}

impl Framing {
    /// Follows `data` through the framing; returns the bytes received so far (prefix included)
    /// of the message still incomplete after it, 0 when the body stands between messages.
    fn feed(&mut self, mut data: &[u8]) -> u64 {
        while !data.is_empty() {
            if self.have < self.prefix.len() {
                let n = (self.prefix.len() - self.have).min(data.len());
                self.prefix[self.have..self.have + n].copy_from_slice(&data[..n]);
                self.have += n;
                self.partial += n as u64;
                data = &data[n..];
                if self.have == self.prefix.len() {
                    let [_, a, b, c, d] = self.prefix;
                    self.left = u64::from(u32::from_be_bytes([a, b, c, d]));
                    if self.left == 0 {
                        self.end_message();
                    }
                }
                continue;
            }
            // `left` > 0 here; the cast is bounded by the slice's length.
            let n = self.left.min(data.len() as u64) as usize;
            self.left -= n as u64;
            self.partial += n as u64;
            data = &data[n..];
            if self.left == 0 {
                self.end_message();
            }
        }
        self.partial
    }

    fn end_message(&mut self) {
        self.have = 0;
        self.left = 0;
        self.partial = 0;
    }
}

/// When a message is due. The timer is made only once the body has to wait for the client: a
/// request that arrives whole, as most do, never registers one.
struct Deadline {
    at: tokio::time::Instant,
    timer: Option<Pin<Box<Sleep>>>,
}

impl Deadline {
    fn after(timeout: Duration) -> Deadline {
        Deadline {
            at: tokio::time::Instant::now() + timeout,
            timer: None,
        }
    }

    fn poll(&mut self, cx: &mut Context<'_>) -> Poll<()> {
        let at = self.at;
        self.timer
            .get_or_insert_with(|| Box::pin(tokio::time::sleep_until(at)))
            .as_mut()
            .poll(cx)
    }
}

/// A request body whose incomplete message holds its bytes of the budget and runs against a
/// deadline.
struct Budgeted {
    inner: Body,
    admission: Arc<Admission>,
    timeout: Duration,
    /// The reservation for the incomplete message's bytes.
    ticket: Ticket,
    framing: Framing,
    /// Whether this is `ModelStreamInfer`, whose stream may idle between messages.
    streaming: bool,
    /// Armed while a message is due: a stream's from the first byte of each message; a unary
    /// call's from its start until its body ends (tonic waits for the end before the handler).
    deadline: Option<Deadline>,
}

impl Budgeted {
    fn timed_out(&self) -> Status {
        super::status(&ApiError::RequestTimeout(format!(
            "the request did not arrive whole within {} s (--body-read-timeout); {} bytes of its \
             last message came",
            self.timeout.as_secs(),
            self.framing.partial
        )))
    }

    /// Holds the budget for what is now incomplete, and arms or disarms the deadline.
    fn account(&mut self, data: &[u8]) -> Result<(), Status> {
        let before = self.framing.partial;
        let partial = self.framing.feed(data);
        if partial == 0 {
            self.ticket = Ticket::default();
            if self.streaming {
                self.deadline = None;
            }
            return Ok(());
        }
        // The ticket holds exactly `partial` bytes: it grows with a message and starts afresh
        // when a frame ends one message and begins a smaller one.
        let more = if partial < before {
            self.ticket = Ticket::default();
            partial
        } else {
            partial - before
        };
        self.admission
            .reserve(&mut self.ticket, more as usize)
            .map_err(|e| super::status(&e))?;
        if self.deadline.is_none() {
            self.deadline = Some(Deadline::after(self.timeout));
        }
        Ok(())
    }
}

impl HttpBody for Budgeted {
    type Data = Bytes;
    type Error = Status;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, Status>>> {
        let this = &mut *self;
        match Pin::new(&mut this.inner).poll_frame(cx) {
            Poll::Ready(Some(Ok(frame))) => {
                if let Some(data) = frame.data_ref()
                    && let Err(e) = this.account(data)
                {
                    return Poll::Ready(Some(Err(e)));
                }
                Poll::Ready(Some(Ok(frame)))
            }
            Poll::Ready(other) => {
                this.ticket = Ticket::default();
                this.deadline = None;
                Poll::Ready(other)
            }
            Poll::Pending => {
                if let Some(deadline) = this.deadline.as_mut() {
                    ready!(deadline.poll(cx));
                    let e = this.timed_out();
                    this.deadline = None;
                    this.ticket = Ticket::default();
                    return Poll::Ready(Some(Err(e)));
                }
                Poll::Pending
            }
        }
    }

    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        self.inner.size_hint()
    }
}

#[cfg(test)]
mod tests {
    use super::Framing;

    fn message(len: u32) -> Vec<u8> {
        let mut m = vec![0];
        m.extend_from_slice(&len.to_be_bytes());
        m.resize(5 + len as usize, 7);
        m
    }

    #[test]
    fn framing_counts_the_incomplete_message_across_frames() {
        let mut f = Framing::default();
        let m = message(10);
        assert_eq!(f.feed(&m[..3]), 3, "part of the prefix");
        assert_eq!(f.feed(&m[3..9]), 9);
        assert_eq!(f.feed(&m[9..]), 0, "the message is whole");
        // One frame ends a message, holds an empty one and starts a third.
        let mut frame = m.clone();
        frame.extend(message(0));
        frame.extend(&message(4)[..6]);
        assert_eq!(Framing::default().feed(&frame), 6);
        let mut f = Framing::default();
        f.feed(&m[..7]);
        assert_eq!(f.feed(&frame[7..]), 6);
    }

    #[test]
    fn a_declared_length_near_the_u32_limit_is_followed_without_overflow() {
        let mut f = Framing::default();
        assert_eq!(f.feed(&[0, 0xff, 0xff, 0xff, 0xff, 1, 2]), 7);
        assert_eq!(f.left, u64::from(u32::MAX) - 2);
    }
}
