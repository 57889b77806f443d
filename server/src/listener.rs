//! Accepting client connections for the HTTP and gRPC ports: the connection cap, the first-byte
//! timeout and TLS (with certificates reloaded when their files change, and optional client
//! certificates). Each accepted connection is handed over already admitted and, with TLS, already
//! past its handshake, so a slow or silent client never holds up the accept loop.

use std::future::Future;
use std::io;
use std::path::{Path, PathBuf};
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;

use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer};
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{OwnedSemaphorePermit, Semaphore, mpsc, watch};

use crate::admission::Admission;
use crate::watched::Watched;

/// Errors reading the TLS files.
#[derive(Debug, thiserror::Error)]
pub enum TlsError {
    /// A file cannot be read.
    #[error("cannot read {what} {}: {source}", path.display())]
    Read {
        /// Which file.
        what: &'static str,
        /// Path.
        path: PathBuf,
        /// Cause.
        source: io::Error,
    },
    /// A file holds no usable PEM item.
    #[error("{what} {} holds no {expected} in PEM form{}", path.display(), detail.as_deref().map(|d| format!(" ({d})")).unwrap_or_default())]
    Pem {
        /// Which file.
        what: &'static str,
        /// Path.
        path: PathBuf,
        /// What was looked for.
        expected: &'static str,
        /// The parser's words, if any.
        detail: Option<String>,
    },
    /// rustls refused the certificate, key or CA.
    #[error("the TLS configuration is invalid: {0}")]
    Config(String),
}

/// Where the server's certificate chain, its key and (for mutual TLS) the client CA bundle are.
#[derive(Debug, Clone)]
pub struct TlsFiles {
    /// PEM certificate chain, leaf first (`--tls-cert`).
    pub cert: PathBuf,
    /// PEM private key (`--tls-key`).
    pub key: PathBuf,
    /// PEM CA bundle: when set, clients must present a certificate it signed (`--tls-client-ca`).
    pub client_ca: Option<PathBuf>,
}

impl TlsFiles {
    fn paths(&self) -> Vec<&Path> {
        let mut p = vec![self.cert.as_path(), self.key.as_path()];
        p.extend(self.client_ca.as_deref());
        p
    }

    /// Reads the files into a rustls server configuration (HTTP/2 and HTTP/1.1 offered by ALPN).
    pub fn load(&self) -> Result<rustls::ServerConfig, TlsError> {
        let read = |what: &'static str, path: &Path| {
            std::fs::read(path).map_err(|source| TlsError::Read {
                what,
                path: path.to_path_buf(),
                source,
            })
        };
        let pem =
            |what: &'static str, path: &Path, expected: &'static str, detail: Option<String>| TlsError::Pem {
                what,
                path: path.to_path_buf(),
                expected,
                detail,
            };
        let certs_in = |what: &'static str, path: &Path| -> Result<Vec<CertificateDer<'static>>, TlsError> {
            let bytes = read(what, path)?;
            let certs = CertificateDer::pem_slice_iter(&bytes)
                .collect::<Result<Vec<_>, _>>()
                .map_err(|e| pem(what, path, "certificate", Some(e.to_string())))?;
            if certs.is_empty() {
                return Err(pem(what, path, "certificate", None));
            }
            Ok(certs)
        };
        let chain = certs_in("--tls-cert", &self.cert)?;
        let key_bytes = read("--tls-key", &self.key)?;
        let key = PrivateKeyDer::from_pem_slice(&key_bytes)
            .map_err(|e| pem("--tls-key", &self.key, "private key", Some(e.to_string())))?;
        let provider = Arc::new(rustls::crypto::ring::default_provider());
        let builder = rustls::ServerConfig::builder_with_provider(provider.clone())
            .with_safe_default_protocol_versions()
            .map_err(|e| TlsError::Config(e.to_string()))?;
        let builder = match &self.client_ca {
            None => builder.with_no_client_auth(),
            Some(path) => {
                let mut roots = rustls::RootCertStore::empty();
                for c in certs_in("--tls-client-ca", path)? {
                    roots
                        .add(c)
                        .map_err(|e| TlsError::Config(format!("{}: {e}", path.display())))?;
                }
                let verifier =
                    rustls::server::WebPkiClientVerifier::builder_with_provider(Arc::new(roots), provider)
                        .build()
                        .map_err(|e| TlsError::Config(e.to_string()))?;
                builder.with_client_cert_verifier(verifier)
            }
        };
        let mut config = builder
            .with_single_cert(chain, key)
            .map_err(|e| TlsError::Config(format!("certificate and key: {e}")))?;
        config.alpn_protocols = vec![b"h2".to_vec(), b"http/1.1".to_vec()];
        Ok(config)
    }
}

/// The TLS configuration in force, replaced when the files change (cert-manager rotating a
/// Secret); connections already open keep the certificate they were made with.
pub struct Tls(Arc<Watched<rustls::ServerConfig, TlsError>>);

impl Tls {
    /// Loads the files; an error stops the server (it must not start without the TLS it was asked
    /// for).
    pub fn load(files: TlsFiles) -> Result<Tls, TlsError> {
        let paths = files.paths().into_iter().map(Path::to_path_buf).collect();
        let (cert, mutual) = (files.cert.display().to_string(), files.client_ca.is_some());
        let tls = Watched::load("TLS certificate", paths, move || files.load())?;
        tracing::info!(cert, client_certificates = mutual, "TLS on");
        Ok(Tls(Arc::new(tls)))
    }

    fn current(&self) -> Option<Arc<rustls::ServerConfig>> {
        self.0.current()
    }

    /// Checks the files every `every` until the process ends.
    pub fn watch(&self, every: Duration) {
        self.0.clone().watch(every)
    }
}

/// A client connection, plain or TLS.
pub enum Io {
    /// Plain TCP.
    Plain(TcpStream),
    /// TLS over TCP, handshake done.
    Tls(Box<tokio_rustls::server::TlsStream<TcpStream>>),
}

/// An accepted connection; it holds its place under `--max-connections` until dropped.
pub struct Conn {
    io: Io,
    sniff: Option<Sniff>,
    _permit: OwnedSemaphorePermit,
}

/// HTTP/2's connection preface, which a client speaking HTTP/2 sends first.
const PREFACE: &[u8] = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n";

/// The wait for a connection's protocol. Until its bytes either differ from [`PREFACE`] or complete
/// it, hyper does not know whether it speaks HTTP/1 or HTTP/2, and neither protocol's timers run
/// (HTTP/1's header timeout starts once HTTP/1 is chosen; HTTP/2 waits for the preface without
/// one). A client that stops inside the preface, or sends nothing after its TLS handshake, would
/// hold its place for ever: reading fails once `deadline` passes first.
struct Sniff {
    deadline: Pin<Box<tokio::time::Sleep>>,
    /// Bytes read so far, all equal to the preface's first ones.
    seen: usize,
}

impl Sniff {
    /// Whether the protocol is known once `new` bytes follow what was seen (an empty read, the end
    /// of the stream, settles it too).
    fn settled_by(&mut self, new: &[u8]) -> bool {
        let n = new.len().min(PREFACE.len() - self.seen);
        if new.is_empty() || new[..n] != PREFACE[self.seen..self.seen + n] {
            return true;
        }
        self.seen += n;
        self.seen == PREFACE.len()
    }
}

impl AsyncRead for Conn {
    fn poll_read(self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &mut ReadBuf<'_>) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        let before = buf.filled().len();
        let read = match &mut this.io {
            Io::Plain(s) => Pin::new(s).poll_read(cx, buf),
            Io::Tls(s) => Pin::new(s).poll_read(cx, buf),
        };
        if let Some(sniff) = &mut this.sniff {
            match &read {
                Poll::Ready(Ok(())) if sniff.settled_by(&buf.filled()[before..]) => this.sniff = None,
                Poll::Pending if sniff.deadline.as_mut().poll(cx).is_ready() => {
                    return Poll::Ready(Err(io::Error::new(
                        io::ErrorKind::TimedOut,
                        "the client did not say which HTTP version it speaks within --header-read-timeout",
                    )));
                }
                _ => {}
            }
        }
        read
    }
}

impl AsyncWrite for Conn {
    fn poll_write(self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &[u8]) -> Poll<io::Result<usize>> {
        match &mut self.get_mut().io {
            Io::Plain(s) => Pin::new(s).poll_write(cx, buf),
            Io::Tls(s) => Pin::new(s).poll_write(cx, buf),
        }
    }
    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        match &mut self.get_mut().io {
            Io::Plain(s) => Pin::new(s).poll_flush(cx),
            Io::Tls(s) => Pin::new(s).poll_flush(cx),
        }
    }
    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        match &mut self.get_mut().io {
            Io::Plain(s) => Pin::new(s).poll_shutdown(cx),
            Io::Tls(s) => Pin::new(s).poll_shutdown(cx),
        }
    }
    fn poll_write_vectored(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        match &mut self.get_mut().io {
            Io::Plain(s) => Pin::new(s).poll_write_vectored(cx, bufs),
            Io::Tls(s) => Pin::new(s).poll_write_vectored(cx, bufs),
        }
    }
    fn is_write_vectored(&self) -> bool {
        match &self.io {
            Io::Plain(s) => s.is_write_vectored(),
            Io::Tls(s) => s.is_write_vectored(),
        }
    }
}

impl tonic::transport::server::Connected for Conn {
    type ConnectInfo = ();
    fn connect_info(&self) {}
}

/// How a listener accepts.
#[derive(Clone)]
pub struct AcceptOptions {
    /// Bounds shared with the request path (connections counted per listener).
    pub admission: Arc<Admission>,
    /// A client that has not sent its first byte, finished its TLS handshake, or said which HTTP
    /// version it speaks in this time (each step its own wait) is closed.
    pub first_byte_timeout: Duration,
    /// TLS, when on for this listener.
    pub tls: Option<Arc<Tls>>,
}

/// Accepts connections until `shutdown` flips, handing each over once it is admitted, has sent
/// data and (with TLS) completed its handshake. Handshakes run in their own tasks.
pub fn accept(
    listener: TcpListener,
    opts: AcceptOptions,
    mut shutdown: watch::Receiver<bool>,
) -> mpsc::Receiver<Conn> {
    let (tx, rx) = mpsc::channel(64);
    let slots = Arc::new(Semaphore::new(opts.admission.limits().connections));
    tokio::spawn(async move {
        loop {
            let accepted = tokio::select! {
                accepted = listener.accept() => accepted,
                _ = shutdown.wait_for(|s| *s) => break,
            };
            let stream = match accepted {
                Ok((s, _peer)) => s,
                Err(e) => {
                    // E.g. EMFILE: back off instead of spinning; the listener stays up.
                    tracing::warn!(error = %e, "accept failed");
                    tokio::time::sleep(Duration::from_millis(50)).await;
                    continue;
                }
            };
            // Over the cap the connection is closed at once rather than left in the backlog.
            let Ok(permit) = slots.clone().try_acquire_owned() else {
                opts.admission.shed_connection();
                continue;
            };
            let _ = stream.set_nodelay(true);
            let (tx, opts) = (tx.clone(), opts.clone());
            tokio::spawn(async move {
                let timeout = opts.first_byte_timeout;
                // Until a client sends its first byte the protocol is unknown and hyper's header
                // timeout has not started: a silent client is closed here.
                let mut first = [0u8; 1];
                if tokio::time::timeout(timeout, stream.peek(&mut first))
                    .await
                    .is_err()
                {
                    return;
                }
                let io = match &opts.tls {
                    None => Io::Plain(stream),
                    Some(tls) => {
                        let Some(config) = tls.current() else { return };
                        let acceptor = tokio_rustls::TlsAcceptor::from(config);
                        match tokio::time::timeout(timeout, acceptor.accept(stream)).await {
                            Ok(Ok(s)) => Io::Tls(Box::new(s)),
                            Ok(Err(e)) => {
                                tracing::debug!(error = %e, "TLS handshake failed");
                                return;
                            }
                            Err(_) => return,
                        }
                    }
                };
                let sniff = Some(Sniff {
                    deadline: Box::pin(tokio::time::sleep(timeout)),
                    seen: 0,
                });
                let _ = tx
                    .send(Conn {
                        io,
                        sniff,
                        _permit: permit,
                    })
                    .await;
            });
        }
    });
    rx
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sniff() -> Sniff {
        Sniff {
            deadline: Box::pin(tokio::time::sleep(Duration::from_secs(1))),
            seen: 0,
        }
    }

    #[tokio::test]
    async fn the_protocol_is_known_at_the_first_byte_off_the_preface_or_once_it_is_whole() {
        assert!(sniff().settled_by(b"GET / HTTP/1.1\r\n"));
        assert!(sniff().settled_by(b""));
        let mut s = sniff();
        assert!(!s.settled_by(b"PRI"));
        assert!(!s.settled_by(b" * HTTP/2.0\r\n\r\nSM\r\n\r"));
        assert!(s.settled_by(b"\n\x00\x00"));
        let mut s = sniff();
        assert!(!s.settled_by(b"PR"));
        assert!(s.settled_by(b"X"));
    }
}
