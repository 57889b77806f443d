"""Loopback-only artifact stores for the `kubemaas-server pull` tests: real servers on real sockets,
each bound to 127.0.0.1 on an OS-assigned (or freshly probed) port, each recording what it was asked.

- `TestCA`: a CA and a server certificate (IP 127.0.0.1, DNS localhost) made at test time.
- `FileServer`: HTTP or HTTPS; ETag, Range/If-Range, and per-path failure behaviours (fixed status,
  N failures then OK, redirects, a connection dropped mid-body, a stalled body, no Content-Length,
  bearer-token auth).
- `FakeHub`: the Hugging Face Hub endpoints `pull` uses (paginated tree listing, resolve with LFS
  302 redirects to a second server, private repos, `X-Error-Code`).
- `MotoS3`: moto's S3 server in a subprocess with IAM authentication enforced.
- `FakeGcs`: fsouza/fake-gcs-server (built by `scripts/setup.sh --test`), in-memory backend.

Every class is a context manager; `start()`/`stop()` are idempotent enough for fixtures.
"""

from __future__ import annotations

import datetime
import email.utils
import hashlib
import ipaddress
import json
import os
import re
import socket
import ssl
import subprocess
import sys
import threading
import time
from collections import deque
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from urllib.parse import parse_qs, quote, unquote, urlsplit

import requests

LOOPBACK = "127.0.0.1"
CHUNK = 64 * 1024


def free_port() -> int:
    """A port the OS just handed out on 127.0.0.1 (for servers that cannot bind port 0 and report it)."""
    with socket.socket() as s:
        s.bind((LOOPBACK, 0))
        return s.getsockname()[1]


def sha256_hex(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


# --------------------------------------------------------------------------------------------------
# TLS


class TestCA:
    """A throwaway CA plus one server certificate for 127.0.0.1 and localhost, written as PEM files."""

    __test__ = False  # not a pytest test class

    def __init__(self, directory: Path, dns_names=("localhost",), ips=(LOOPBACK,)):
        from cryptography import x509
        from cryptography.hazmat.primitives import hashes, serialization
        from cryptography.hazmat.primitives.asymmetric import ec
        from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

        directory.mkdir(parents=True, exist_ok=True)
        now = datetime.datetime.now(datetime.timezone.utc)
        ca_key = ec.generate_private_key(ec.SECP256R1())
        ca_name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "KubeMaaS test CA")])
        no_usage = dict(content_commitment=False, data_encipherment=False, key_agreement=False,
                        encipher_only=False, decipher_only=False)
        ca_cert = (
            x509.CertificateBuilder()
            .subject_name(ca_name).issuer_name(ca_name)
            .public_key(ca_key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(now - datetime.timedelta(minutes=5))
            .not_valid_after(now + datetime.timedelta(days=2))
            .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
            .add_extension(x509.KeyUsage(digital_signature=True, key_encipherment=False, key_cert_sign=True,
                                         crl_sign=True, **no_usage), critical=True)
            .add_extension(x509.SubjectKeyIdentifier.from_public_key(ca_key.public_key()), critical=False)
            .sign(ca_key, hashes.SHA256())
        )
        key = ec.generate_private_key(ec.SECP256R1())
        sans = [x509.DNSName(n) for n in dns_names] + [x509.IPAddress(ipaddress.ip_address(i)) for i in ips]
        cert = (
            x509.CertificateBuilder()
            .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, dns_names[0] if dns_names else ips[0])]))
            .issuer_name(ca_name)
            .public_key(key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(now - datetime.timedelta(minutes=5))
            .not_valid_after(now + datetime.timedelta(days=1))
            .add_extension(x509.SubjectAlternativeName(sans), critical=False)
            .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
            .add_extension(x509.KeyUsage(digital_signature=True, key_encipherment=False, key_cert_sign=False,
                                         crl_sign=False, **no_usage), critical=True)
            .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH]), critical=False)
            .add_extension(x509.AuthorityKeyIdentifier.from_issuer_public_key(ca_key.public_key()), critical=False)
            .sign(ca_key, hashes.SHA256())
        )
        self._ca_key, self._ca_name, self._directory = ca_key, ca_name, directory
        pem = serialization.Encoding.PEM
        self.ca_file = directory / "ca.pem"
        self.cert_file = directory / "server.pem"
        self.key_file = directory / "server-key.pem"
        self.ca_file.write_bytes(ca_cert.public_bytes(pem))
        self.cert_file.write_bytes(cert.public_bytes(pem))
        self.key_file.write_bytes(key.private_bytes(pem, serialization.PrivateFormat.PKCS8,
                                                    serialization.NoEncryption()))

    def issue_client(self, name: str) -> tuple[Path, Path]:
        """A client certificate (for mutual TLS) signed by this CA: (certificate PEM, key PEM)."""
        from cryptography import x509
        from cryptography.hazmat.primitives import hashes, serialization
        from cryptography.hazmat.primitives.asymmetric import ec
        from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

        now = datetime.datetime.now(datetime.timezone.utc)
        key = ec.generate_private_key(ec.SECP256R1())
        cert = (
            x509.CertificateBuilder()
            .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, name)]))
            .issuer_name(self._ca_name)
            .public_key(key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(now - datetime.timedelta(minutes=5))
            .not_valid_after(now + datetime.timedelta(days=1))
            .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
            .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.CLIENT_AUTH]), critical=False)
            .sign(self._ca_key, hashes.SHA256())
        )
        pem = serialization.Encoding.PEM
        cert_file, key_file = self._directory / f"{name}.pem", self._directory / f"{name}-key.pem"
        cert_file.write_bytes(cert.public_bytes(pem))
        key_file.write_bytes(key.private_bytes(pem, serialization.PrivateFormat.PKCS8,
                                               serialization.NoEncryption()))
        return cert_file, key_file

    def server_context(self) -> ssl.SSLContext:
        ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        ctx.load_cert_chain(self.cert_file, self.key_file)
        return ctx

    def client_context(self) -> ssl.SSLContext:
        return ssl.create_default_context(cafile=str(self.ca_file))


# --------------------------------------------------------------------------------------------------
# Recording HTTP(S) server base


@dataclass
class RecordedRequest:
    method: str
    path: str  # as sent on the request line (still percent-encoded), query included
    headers: dict  # lower-cased names
    client_port: int
    status: int | None = None  # what was answered (None: nothing, e.g. the client went away)
    sent: int = 0  # body bytes written to the socket
    at: float = field(default_factory=time.monotonic)  # when it arrived

    def header(self, name: str):
        return self.headers.get(name.lower())

    @property
    def route(self) -> str:
        """The decoded path without the query."""
        return unquote(urlsplit(self.path).path)

    @property
    def query(self) -> dict:
        return {k: v[-1] for k, v in parse_qs(urlsplit(self.path).query).items()}


class _Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    server_version = "kubemaas-test-artifacts/1"
    timeout = 60  # an idle keep-alive connection is closed after this

    def log_message(self, *args):  # quiet
        pass

    def _dispatch(self, head: bool):
        owner = self.server.owner
        rec = RecordedRequest(self.command, self.path, {k.lower(): v for k, v in self.headers.items()},
                              self.client_address[1])
        with owner.lock:
            owner.requests.append(rec)
        try:
            owner.respond(self, rec, head)
        except (BrokenPipeError, ConnectionResetError, ssl.SSLError, TimeoutError, OSError):
            self.close_connection = True

    def do_GET(self):
        self._dispatch(False)

    def do_HEAD(self):
        self._dispatch(True)

    def do_POST(self):
        self._dispatch(False)


class _Server(ThreadingHTTPServer):
    daemon_threads = True
    allow_reuse_address = False

    def handle_error(self, request, client_address):  # a client that hangs up or rejects our certificate
        self.owner.errors.append(sys.exc_info()[1])


class RecordingServer:
    """A threaded HTTP (or HTTPS with `tls=TestCA`) server on 127.0.0.1:<OS port> that records every
    request in `.requests`. Subclasses implement `respond(handler, rec, head)`."""

    def __init__(self, *, tls: TestCA | None = None, name: str = "server"):
        self.tls = tls
        self.name = name
        self.lock = threading.Lock()
        self.requests: list[RecordedRequest] = []
        self.errors: list[BaseException] = []
        self.stopping = threading.Event()
        self._httpd = None
        self._thread = None

    # lifecycle
    def start(self):
        httpd = _Server((LOOPBACK, 0), _Handler)
        httpd.owner = self
        if self.tls is not None:
            # The handshake runs in the connection's own thread (on first read), never in accept().
            httpd.socket = self.tls.server_context().wrap_socket(httpd.socket, server_side=True,
                                                                 do_handshake_on_connect=False)
        self._httpd = httpd
        self.port = httpd.server_address[1]
        self._thread = threading.Thread(target=httpd.serve_forever, kwargs={"poll_interval": 0.05},
                                        name=f"{self.name}:{self.port}", daemon=True)
        self._thread.start()
        return self

    def stop(self):
        self.stopping.set()
        if self._httpd is not None:
            self._httpd.shutdown()
            self._httpd.server_close()
            self._thread.join(5)
            self._httpd = None

    def __enter__(self):
        return self.start()

    def __exit__(self, *exc):
        self.stop()

    # addresses
    @property
    def scheme(self) -> str:
        return "https" if self.tls else "http"

    def base(self, host: str = LOOPBACK) -> str:
        return f"{self.scheme}://{host}:{self.port}"

    @property
    def url(self) -> str:
        return self.base()

    def url_for(self, path: str, host: str = LOOPBACK) -> str:
        return self.base(host) + (path if path.startswith("/") else "/" + path)

    # what was asked
    def requests_for(self, route: str, method: str | None = None) -> list[RecordedRequest]:
        with self.lock:
            return [r for r in self.requests if r.route == route and (method is None or r.method == method)]

    def gets(self, route: str) -> list[RecordedRequest]:
        return self.requests_for(route, "GET")

    def clear(self):
        with self.lock:
            self.requests.clear()

    def respond(self, h: BaseHTTPRequestHandler, rec: RecordedRequest, head: bool):
        raise NotImplementedError

    # response helpers shared by the subclasses
    def send_status(self, h, rec, status: int, message: str = "", headers: dict | None = None):
        """A small JSON error (or empty) body with Content-Length."""
        body = json.dumps({"error": message or f"status {status}"}).encode() if status >= 400 else b""
        rec.status = status
        h.send_response(status)
        for k, v in (headers or {}).items():
            h.send_header(k, v)
        h.send_header("Content-Type", "application/json" if body else "text/plain")
        h.send_header("Content-Length", str(len(body)))
        h.end_headers()
        if rec.method != "HEAD":
            h.wfile.write(body)
            rec.sent += len(body)

    def send_content(self, h, rec, body: bytes, *, head: bool = False, etag: str | None = None,
                     ranges: bool = True, length: str = "content-length", drop_after: int | None = None,
                     stall_after: int | None = None, pause: tuple | None = None, headers: dict | None = None,
                     if_range: bool = True):
        """Answers with `body` (or the part a Range asks for).

        etag: sent as ETag (and compared with If-Range); ranges: honour Range (else always 200);
        length: "content-length" | "chunked" | "close" (close-delimited, no length);
        drop_after: close the connection after that many body bytes (Content-Length still promises all);
        stall_after: after that many body bytes send nothing more until the server stops (at most 60 s);
        pause: (after_bytes, seconds): wait that long once after that many body bytes, then go on.
        """
        total = len(body)
        status, start, end = 200, 0, total
        rng = rec.header("range")
        if ranges and rng and (not if_range or rec.header("if-range") is None or rec.header("if-range") == etag):
            m = re.fullmatch(r"bytes=(\d+)-(\d*)", rng.strip())
            if m:
                first = int(m.group(1))
                last = int(m.group(2)) if m.group(2) else total - 1
                if first >= total or last < first:
                    return self.send_status(h, rec, 416, "range not satisfiable",
                                            {"Content-Range": f"bytes */{total}"})
                status, start, end = 206, first, min(last, total - 1) + 1
        rec.status = status
        h.send_response(status)
        h.send_header("Content-Type", "application/octet-stream")
        h.send_header("Last-Modified", email.utils.formatdate(0, usegmt=True))
        if ranges:
            h.send_header("Accept-Ranges", "bytes")
        if etag is not None:
            h.send_header("ETag", etag)
        if status == 206:
            h.send_header("Content-Range", f"bytes {start}-{end - 1}/{total}")
        for k, v in (headers or {}).items():
            h.send_header(k, v)
        if length == "content-length" or head:
            h.send_header("Content-Length", str(end - start))
        elif length == "chunked":
            h.send_header("Transfer-Encoding", "chunked")
        elif length == "close":
            h.send_header("Connection", "close")
            h.close_connection = True
        else:
            raise ValueError(length)
        h.end_headers()
        if head:
            return
        limit = end
        if drop_after is not None:
            limit = min(limit, start + drop_after)
        if stall_after is not None:
            limit = min(limit, start + stall_after)
        pos = start
        paused = pause is None
        while pos < limit:
            if not paused and pos - start >= pause[0]:
                paused = True
                h.wfile.flush()
                self.stopping.wait(pause[1])
            stop = limit if paused else min(limit, start + pause[0])
            piece = body[pos:min(pos + CHUNK, stop)]
            if length == "chunked":
                h.wfile.write(b"%x\r\n%s\r\n" % (len(piece), piece))
            else:
                h.wfile.write(piece)
            h.wfile.flush()
            pos += len(piece)
            rec.sent += len(piece)
        if drop_after is not None and limit < end:
            h.wfile.flush()
            h.close_connection = True
            try:
                h.connection.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass
            return
        if stall_after is not None and limit < end:
            h.wfile.flush()
            self.stopping.wait(60)
            h.close_connection = True
            return
        if length == "chunked":
            h.wfile.write(b"0\r\n\r\n")
        h.wfile.flush()


# --------------------------------------------------------------------------------------------------
# Plain files over HTTP(S)


@dataclass
class Route:
    """How FileServer answers one path. Counters are per route and count GET requests."""

    body: bytes = b""
    status: int | None = None  # always answer this status
    error_body: bytes | None = None  # with `status`: this body instead of a small JSON error
    # statuses for the first GETs, then the body; "stall": no answer; (status, {header: value}): with headers
    fail_first: list = field(default_factory=list)
    redirect: str | None = None  # Location (relative or absolute)
    redirect_status: int = 302
    drop_after: int | None = None  # first GET only: close after this many body bytes
    changed_body: bytes | None = None  # from the second GET on: this content (and its own ETag)
    stall_after: int | None = None  # every GET: stop sending after this many body bytes (0: after headers)
    pause: tuple | None = None  # (after_bytes, seconds): every GET pauses once there, then goes on
    length: str = "content-length"  # or "chunked" / "close"
    token: str | None = None  # require "Authorization: Bearer <token>", else 401
    etag: str | None = "auto"  # "auto": a strong ETag from the content; None: no ETag
    ranges: bool = True  # honour Range requests
    if_range: bool = True  # honour If-Range (False: serve the range whatever changed, as some servers do)
    headers: dict = field(default_factory=dict)
    # S3 in this region: a request signed for another answers 301 PermanentRedirect with
    # x-amz-bucket-region, as AWS does for a bucket addressed in the wrong region
    s3_region: str | None = None
    stall_heads: int = 0  # the first HEADs get no answer
    served: int = 0  # GETs seen so far
    heads: int = 0  # HEADs seen so far

    def etag_value(self, body: bytes | None = None):
        if self.etag == "auto":
            return '"' + sha256_hex(self.body if body is None else body)[:32] + '"'
        return self.etag


class FileServer(RecordingServer):
    """Serves `files` ({path: bytes}) or the files below `directory`, each path configurable with
    `route(path, **Route fields)`."""

    def __init__(self, files: dict | None = None, *, directory: Path | None = None, tls: TestCA | None = None,
                 name: str = "files"):
        super().__init__(tls=tls, name=name)
        self.routes: dict[str, Route] = {}
        if directory is not None:
            for p in sorted(Path(directory).rglob("*")):
                if p.is_file():
                    self.route("/" + p.relative_to(directory).as_posix(), body=p.read_bytes())
        for path, body in (files or {}).items():
            self.route(path, body=body)

    def route(self, path: str, **kw) -> Route:
        """Adds or replaces the route at `path` (leading / optional)."""
        path = path if path.startswith("/") else "/" + path
        with self.lock:
            r = self.routes[path] = Route(**kw)
        return r

    def update(self, path: str, **kw) -> Route:
        """Changes fields of an existing route (e.g. make it fail from now on)."""
        path = path if path.startswith("/") else "/" + path
        with self.lock:
            r = self.routes[path]
            for k, v in kw.items():
                setattr(r, k, v)
        return r

    def respond(self, h, rec, head):
        with self.lock:
            route = self.routes.get(rec.route)
            if route is None:
                n = None
            else:
                n = route.served
                if rec.method == "GET":
                    route.served += 1
                stalled_head = rec.method == "HEAD" and route.heads < route.stall_heads
                if rec.method == "HEAD":
                    route.heads += 1
        if route is None:
            return self.send_status(h, rec, 404, f"no such file {rec.route}")
        if stalled_head:
            self.stopping.wait(60)
            h.close_connection = True
            return None
        if route.token is not None and rec.header("authorization") != f"Bearer {route.token}":
            return self.send_status(h, rec, 401, "missing or wrong bearer token", {"WWW-Authenticate": "Bearer"})
        if route.s3_region is not None and f"/{route.s3_region}/s3/aws4_request" not in (rec.header("authorization") or ""):
            body = (b'<?xml version="1.0" encoding="UTF-8"?>\n<Error><Code>PermanentRedirect</Code><Message>The bucket '
                    b'you are attempting to access must be addressed using the specified endpoint.</Message>'
                    b'<Endpoint>models.s3.' + route.s3_region.encode() + b'.amazonaws.com</Endpoint>'
                    b'<Bucket>models</Bucket></Error>')
            rec.status = 301
            h.send_response(301)
            h.send_header("x-amz-bucket-region", route.s3_region)
            h.send_header("Content-Type", "application/xml")
            h.send_header("Content-Length", str(len(body)))
            h.end_headers()
            if not head:
                h.wfile.write(body)
                rec.sent += len(body)
            return None
        if route.status is not None and route.error_body is not None:
            rec.status = route.status
            h.send_response(route.status)
            h.send_header("Content-Type", "text/plain")
            h.send_header("Content-Length", str(len(route.error_body)))
            h.end_headers()
            h.wfile.write(route.error_body)
            rec.sent += len(route.error_body)
            return None
        if route.status is not None:
            return self.send_status(h, rec, route.status)
        if rec.method == "GET" and n < len(route.fail_first):
            if route.fail_first[n] == "stall":
                # Accepted, never answered (a hung proxy or store): held until the server stops.
                self.stopping.wait(60)
                h.close_connection = True
                return None
            if isinstance(route.fail_first[n], tuple):
                status, headers = route.fail_first[n]
                return self.send_status(h, rec, status, headers=headers)
            return self.send_status(h, rec, route.fail_first[n])
        if route.redirect is not None:
            return self.send_status(h, rec, route.redirect_status, headers={"Location": route.redirect})
        body = route.body if route.changed_body is None or n == 0 else route.changed_body
        self.send_content(h, rec, body, head=head, etag=route.etag_value(body), ranges=route.ranges,
                          length=route.length, drop_after=route.drop_after if n == 0 else None,
                          stall_after=route.stall_after, pause=route.pause, headers=route.headers,
                          if_range=route.if_range)


# --------------------------------------------------------------------------------------------------
# Hugging Face Hub


def git_blob_sha1(data: bytes) -> str:
    return hashlib.sha1(b"blob %d\0" % len(data) + data).hexdigest()


@dataclass
class HubRepo:
    revisions: dict  # revision -> {path: bytes}
    private: bool = False
    lfs: set = field(default_factory=set)  # paths stored in LFS (resolve answers a 302 to the LFS host)


class FakeHub(RecordingServer):
    """The Hub endpoints `pull` uses:

    GET /api/models/{org}/{repo}/tree/{revision}[/{path}]?recursive=true  -> JSON list, `page_size` entries
        per page, the next page in a `Link: <...>; rel="next"` header (cursor= query parameter);
    GET|HEAD /{org}/{repo}/resolve/{revision}/{path}  -> the file, or a 302 to `lfs` for LFS files.

    The revision is one path segment (so `refs/pr/1` must arrive as `refs%2Fpr%2F1`). Private and unknown
    repos answer 401 without a valid `Authorization: Bearer <token>` (as the Hub does), an unknown file
    404 with `X-Error-Code: EntryNotFound`, an unknown revision 404 with `RevisionNotFound`.
    """

    def __init__(self, *, page_size: int = 2, tokens=("hf_test_token",), tls: TestCA | None = None,
                 lfs_host: str = LOOPBACK):
        super().__init__(tls=tls, name="hub")
        self.page_size = page_size
        self.tokens = set(tokens)
        self.repos: dict[str, HubRepo] = {}
        self.lfs = FileServer(tls=tls, name="hub-lfs")
        self.lfs_host = lfs_host

    def start(self):
        self.lfs.start()
        return super().start()

    def stop(self):
        super().stop()
        self.lfs.stop()

    def add_repo(self, repo_id: str, files: dict, *, revision: str = "main", private: bool = False,
                 lfs=()):
        repo = self.repos.setdefault(repo_id, HubRepo(revisions={}, private=private))
        repo.private = private
        repo.revisions[revision] = dict(files)
        repo.lfs |= set(lfs)
        for p in lfs:
            data = files[p]
            self.lfs.route(f"/repos/{repo_id}/{sha256_hex(data)}", body=data, etag=f'"{sha256_hex(data)}"')
        return repo

    def listing_requests(self, repo_id: str) -> list[RecordedRequest]:
        return [r for r in self.requests if r.route.startswith(f"/api/models/{repo_id}/tree/")]

    def _authorized(self, rec, repo: HubRepo | None) -> bool:
        auth = rec.header("authorization") or ""
        valid = auth.startswith("Bearer ") and auth[len("Bearer "):] in self.tokens
        if repo is None or repo.private:
            return valid
        return True

    def _repo_or_error(self, h, rec, repo_id, revision):
        repo = self.repos.get(repo_id)
        if not self._authorized(rec, repo):
            self.send_status(h, rec, 401, "Invalid username or password.", {"X-Error-Code": "RepoNotFound"})
            return None
        if repo is None:
            self.send_status(h, rec, 404, f"Repository {repo_id} not found", {"X-Error-Code": "RepoNotFound"})
            return None
        if revision not in repo.revisions:
            self.send_status(h, rec, 404, f"Invalid rev id: {revision}", {"X-Error-Code": "RevisionNotFound"})
            return None
        return repo

    def respond(self, h, rec, head):
        raw = urlsplit(rec.path).path
        parts = [unquote(p) for p in raw.split("/")[1:]]
        if len(parts) >= 6 and parts[:2] == ["api", "models"] and parts[4] == "tree":
            return self._tree(h, rec, parts[2] + "/" + parts[3], parts[5], "/".join(parts[6:]))
        if len(parts) >= 5 and parts[2] == "resolve":
            return self._resolve(h, rec, head, parts[0] + "/" + parts[1], parts[3], "/".join(parts[4:]))
        self.send_status(h, rec, 404, "Not Found")

    def _tree(self, h, rec, repo_id, revision, path):
        repo = self._repo_or_error(h, rec, repo_id, revision)
        if repo is None:
            return
        files = repo.revisions[revision]
        path = path.strip("/")
        under = path + "/" if path else ""
        recursive = rec.query.get("recursive", "").lower() == "true"
        entries = {}
        for p, data in files.items():
            if not p.startswith(under):
                continue
            rel = p[len(under):].split("/")
            # every directory between `path` and the file, then the file (only the first level unless recursive)
            for depth in range(1, len(rel)):
                d = under + "/".join(rel[:depth])
                entries.setdefault(d, {"type": "directory", "oid": git_blob_sha1(d.encode()), "size": 0, "path": d})
                if not recursive:
                    break
            if recursive or len(rel) == 1:
                e = {"type": "file", "oid": git_blob_sha1(data), "size": len(data), "path": p}
                if p in repo.lfs:
                    e["lfs"] = {"oid": sha256_hex(data), "size": len(data), "pointerSize": 134}
                entries[p] = e
        if path and not entries:
            return self.send_status(h, rec, 404, f"{path} does not exist on {revision}",
                                    {"X-Error-Code": "EntryNotFound"})
        ordered = [entries[k] for k in sorted(entries)]
        cursor = int(rec.query.get("cursor", "0"))
        page = ordered[cursor:cursor + self.page_size]
        headers = {}
        if cursor + self.page_size < len(ordered):
            q = f"recursive={'true' if recursive else 'false'}&cursor={cursor + self.page_size}"
            tail = "/" + quote(path) if path else ""
            nxt = f"{self.url}/api/models/{repo_id}/tree/{quote(revision, safe='')}{tail}?{q}"
            headers["Link"] = f'<{nxt}>; rel="next"'
        body = json.dumps(page).encode()
        rec.status = 200
        h.send_response(200)
        h.send_header("Content-Type", "application/json")
        h.send_header("Content-Length", str(len(body)))
        for k, v in headers.items():
            h.send_header(k, v)
        h.end_headers()
        h.wfile.write(body)
        rec.sent += len(body)

    def _resolve(self, h, rec, head, repo_id, revision, path):
        repo = self._repo_or_error(h, rec, repo_id, revision)
        if repo is None:
            return
        files = repo.revisions[revision]
        if path not in files:
            return self.send_status(h, rec, 404, "Entry not found", {"X-Error-Code": "EntryNotFound"})
        data = files[path]
        commit = hashlib.sha1(f"{repo_id}@{revision}".encode()).hexdigest()
        if path in repo.lfs:
            digest = sha256_hex(data)
            location = self.lfs.url_for(f"/repos/{repo_id}/{digest}", host=self.lfs_host) + "?X-Signature=test"
            return self.send_status(h, rec, 302, headers={
                "Location": location, "X-Repo-Commit": commit, "X-Linked-Etag": f'"{digest}"',
                "X-Linked-Size": str(len(data)), "ETag": f'"{git_blob_sha1(data)}"'})
        self.send_content(h, rec, data, head=head, etag=f'"{git_blob_sha1(data)}"', headers={"X-Repo-Commit": commit})


# --------------------------------------------------------------------------------------------------
# S3 (moto)


class _Subprocess:
    """A child process whose stderr is drained into a bounded buffer (for error messages)."""

    def __init__(self, cmd, env=None, ready_pattern: str | None = None, timeout: float = 60):
        self.proc = subprocess.Popen(cmd, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                                     stderr=subprocess.STDOUT, env=env, text=True, errors="replace")
        self.lines = deque(maxlen=200)
        self.match = None
        found = threading.Event()

        def pump():
            for line in self.proc.stdout:
                self.lines.append(line)
                if ready_pattern and self.match is None:
                    m = re.search(ready_pattern, line)
                    if m:
                        self.match = m
                        found.set()
            found.set()

        self.thread = threading.Thread(target=pump, daemon=True)
        self.thread.start()
        if ready_pattern and not (found.wait(timeout) and self.match):
            self.stop()
            raise RuntimeError(f"{cmd[0]} did not start:\n{self.log()}")

    def log(self) -> str:
        return "".join(self.lines)

    def stop(self):
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self.thread.join(5)


class MotoS3:
    """moto's server (`python -m moto.server -H 127.0.0.1 -p 0`) with authentication enforced.

    moto checks SigV4 signatures and IAM policies once its request counter reaches
    INITIAL_NO_AUTH_ACTION_COUNT (default: never). We create an IAM user, an access key and an allow-all
    inline policy while it is unauthenticated, then set the count to 0 through POST /moto-api/reset-auth,
    so from then on every request must be signed with that key: an unknown key answers
    InvalidAccessKeyId (403), a wrong secret SignatureDoesNotMatch (403).
    """

    def __init__(self, region: str = "us-east-1", tls: "TestCA | None" = None):
        self.region = region
        self.tls = tls
        self._proc = None

    def start(self):
        env = {k: v for k, v in os.environ.items() if not k.startswith("AWS_") and k != "INITIAL_NO_AUTH_ACTION_COUNT"}
        args = [sys.executable, "-m", "moto.server", "-H", LOOPBACK, "-p", "0"]
        if self.tls is not None:
            # HTTPS with the test CA's certificate (STS web identity refuses plain http).
            args += ["-c", str(self.tls.cert_file), "-k", str(self.tls.key_file)]
        scheme = "https" if self.tls is not None else "http"
        self._proc = _Subprocess(args, env=env, ready_pattern=scheme + r"://127\.0\.0\.1:(\d+)")
        self.port = int(self._proc.match.group(1))
        self.url = f"{scheme}://{LOOPBACK}:{self.port}"
        iam = self._client("iam", "bootstrap", "bootstrap")
        iam.create_user(UserName="puller")
        key = iam.create_access_key(UserName="puller")["AccessKey"]
        iam.put_user_policy(UserName="puller", PolicyName="allow-all", PolicyDocument=json.dumps(
            {"Version": "2012-10-17", "Statement": [{"Effect": "Allow", "Action": "*", "Resource": "*"}]}))
        self.access_key, self.secret_key = key["AccessKeyId"], key["SecretAccessKey"]
        r = requests.post(f"{self.url}/moto-api/reset-auth", data=b"0", timeout=10,
                          verify=str(self.tls.ca_file) if self.tls is not None else True)
        r.raise_for_status()
        return self

    def stop(self):
        if self._proc is not None:
            self._proc.stop()
            self._proc = None

    def __enter__(self):
        return self.start()

    def __exit__(self, *exc):
        self.stop()

    def log(self) -> str:
        return self._proc.log() if self._proc else ""

    def _client(self, service, access_key, secret_key):
        import boto3
        from botocore.config import Config

        return boto3.client(service, endpoint_url=self.url, region_name=self.region,
                            verify=str(self.tls.ca_file) if self.tls is not None else None,
                            aws_access_key_id=access_key, aws_secret_access_key=secret_key,
                            config=Config(s3={"addressing_style": "path"}, retries={"max_attempts": 1},
                                          connect_timeout=10, read_timeout=60))

    def client(self, access_key: str | None = None, secret_key: str | None = None):
        """A boto3 S3 client (path-style) signing with the IAM user's key unless told otherwise."""
        return self._client("s3", access_key or self.access_key, secret_key or self.secret_key)

    def role_arn(self) -> str:
        """An allow-all IAM role anyone may assume (also with a web identity token)."""
        iam = self._client("iam", self.access_key, self.secret_key)
        if not any(r["RoleName"] == "puller" for r in iam.list_roles()["Roles"]):
            iam.create_role(RoleName="puller", AssumeRolePolicyDocument=json.dumps({
                "Version": "2012-10-17",
                "Statement": [{"Effect": "Allow", "Principal": {"AWS": "*"}, "Action": "sts:AssumeRole"},
                              {"Effect": "Allow", "Principal": {"Federated": "*"},
                               "Action": "sts:AssumeRoleWithWebIdentity"}]}))
            iam.put_role_policy(RoleName="puller", PolicyName="allow-all", PolicyDocument=json.dumps(
                {"Version": "2012-10-17", "Statement": [{"Effect": "Allow", "Action": "*", "Resource": "*"}]}))
        return iam.get_role(RoleName="puller")["Role"]["Arn"]

    def temporary_credentials(self) -> dict:
        """STS AssumeRole credentials (ASIA… key, secret, session token) for an allow-all role: moto
        checks the X-Amz-Security-Token of requests signed with them."""
        role = self.role_arn()
        sts = self._client("sts", self.access_key, self.secret_key)
        c = sts.assume_role(RoleArn=role, RoleSessionName="kubemaas-pull-test")["Credentials"]
        return {"AWS_ACCESS_KEY_ID": c["AccessKeyId"], "AWS_SECRET_ACCESS_KEY": c["SecretAccessKey"],
                "AWS_SESSION_TOKEN": c["SessionToken"]}

    def env(self, **override) -> dict:
        """The variables `pull` reads for this endpoint and the IAM user's key."""
        env = {"AWS_ENDPOINT_URL": self.url, "AWS_ACCESS_KEY_ID": self.access_key,
               "AWS_SECRET_ACCESS_KEY": self.secret_key, "AWS_REGION": self.region,
               "AWS_DEFAULT_REGION": self.region}
        env.update(override)
        return {k: v for k, v in env.items() if v is not None}


# --------------------------------------------------------------------------------------------------
# GCS (fake-gcs-server)


def fake_gcs_binary() -> Path:
    path = os.environ.get("KUBEMAAS_FAKE_GCS")
    if not path:
        raise RuntimeError("KUBEMAAS_FAKE_GCS is not set: run `eval \"$(bash scripts/setup.sh --test)\"; "
                           "export KUBEMAAS_FAKE_GCS`")
    if not os.access(path, os.X_OK):
        raise RuntimeError(f"KUBEMAAS_FAKE_GCS={path} is not an executable: run scripts/setup.sh --test")
    return Path(path)


class FakeGcs:
    """fsouza/fake-gcs-server on 127.0.0.1 with the memory backend; objects are created through its JSON
    API. `pull` reaches it through STORAGE_EMULATOR_HOST (no authentication)."""

    def __init__(self, binary: Path | None = None):
        self.binary = binary or fake_gcs_binary()
        self._proc = None

    def start(self):
        last = ""
        for _ in range(3):  # the probed port may be taken again before the emulator binds it
            self.port = free_port()
            self.url = f"http://{LOOPBACK}:{self.port}"
            self._proc = _Subprocess([str(self.binary), "-scheme", "http", "-host", LOOPBACK, "-port", str(self.port),
                                      "-backend", "memory", "-public-host", f"{LOOPBACK}:{self.port}",
                                      "-external-url", self.url, "-log-level", "warn"])
            deadline = time.monotonic() + 30
            while time.monotonic() < deadline and self._proc.proc.poll() is None:
                try:
                    if requests.get(f"{self.url}/storage/v1/b", timeout=2).status_code == 200:
                        return self
                except requests.ConnectionError:
                    pass
                time.sleep(0.1)
            last = self._proc.log()
            self._proc.stop()
        raise RuntimeError(f"fake-gcs-server did not start:\n{last}")

    def stop(self):
        if self._proc is not None:
            self._proc.stop()
            self._proc = None

    def __enter__(self):
        return self.start()

    def __exit__(self, *exc):
        self.stop()

    def create_bucket(self, name: str):
        r = requests.post(f"{self.url}/storage/v1/b", json={"name": name}, timeout=10)
        assert r.status_code == 200, r.text

    def upload(self, bucket: str, name: str, data: bytes):
        r = requests.post(f"{self.url}/upload/storage/v1/b/{quote(bucket, safe='')}/o",
                          params={"uploadType": "media", "name": name}, data=data,
                          headers={"Content-Type": "application/octet-stream"}, timeout=30)
        assert r.status_code == 200, r.text
        return r.json()

    def env(self) -> dict:
        return {"STORAGE_EMULATOR_HOST": self.url}
