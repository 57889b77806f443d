//! Real servers behind fake pods: kwok only pretends to run pods, so for every running pod of a
//! ModelDeployment this starts what the kubelet would. It runs the pod's own init container
//! (`kubemaas-server pull` with the pod's arguments) into a local directory, then the pod's own
//! server container (`kubemaas-server serve` with the pod's arguments) bound to the pod's
//! loopback IP and ports, and stops it when the pod goes away.
//!
//! Paths inside the pod are mapped to local ones: the model repository to a directory per pod,
//! and `pvc://CLAIM/...` to `PVC_ROOT/CLAIM/...` (so `pvc://models/ocr-cls/1/model.onnx` serves
//! the cached real model when `PVC_ROOT` is the cache directory). Secret volumes of the server
//! container are written into the pod's directory from the apiserver's Secret and rewritten when
//! the Secret changes, as the kubelet does (atomically: a new file renamed over the old).

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use k8s_openapi::api::core::v1::{Pod, Secret};
use kube::api::ListParams;
use kube::{Api, Client, ResourceExt};

/// Mount points inside the pod, as the operator builds it.
const MODELS_DIR: &str = "/models";
const PVC_MOUNT: &str = "/mnt/pvc";

/// How the pods' processes are run.
#[derive(Debug, Clone)]
pub struct RunnerConfig {
    /// The `kubemaas-server` binary.
    pub server: PathBuf,
    /// Where `pvc://CLAIM/...` URIs resolve (`PVC_ROOT/CLAIM/...`); a pod with a PVC schedules only
    /// where the claim is bound, so the suite serves models over HTTP ([`file_store`]) instead.
    pub pvc_root: PathBuf,
    /// Work directories (one per pod) and logs.
    pub work: PathBuf,
    /// Serve `accelerator: cuda` pods with `--execution-provider auto`: a node whose GPU is
    /// missing but whose server falls back to CPU (this machine has no GPU).
    pub cuda_as_auto: bool,
    /// Run only the pods of these ModelDeployments (all when None).
    pub only: Option<Vec<String>>,
}

impl RunnerConfig {
    /// The harness's settings: the debug server binary, `pvc://` from the cache directory that
    /// holds the real models (`pvc://models/ocr-cls/1/model.onnx`), work under `target/e2e/<label>`.
    pub fn for_tests(label: &str) -> RunnerConfig {
        let env = crate::env();
        let models = std::env::var("KUBEMAAS_MODELS").unwrap_or_default();
        let pvc_root = Path::new(&models)
            .parent()
            .map(Path::to_path_buf)
            .unwrap_or_default();
        RunnerConfig {
            server: env.root.join("target/debug/kubemaas-server"),
            pvc_root,
            work: env.root.join("target/e2e").join(label),
            cuda_as_auto: false,
            only: None,
        }
    }
}

/// One pod's server.
struct Running {
    child: Child,
    ip: String,
}

/// Runs servers for the pods of a namespace until dropped.
pub struct PodRunner {
    task: tokio::task::JoinHandle<()>,
    servers: Arc<Mutex<HashMap<String, Running>>>,
}

impl PodRunner {
    /// Starts watching `namespace` (polling every 300 ms).
    pub fn start(client: Client, namespace: &str, config: RunnerConfig) -> PodRunner {
        let servers: Arc<Mutex<HashMap<String, Running>>> = Default::default();
        let api: Api<Pod> = Api::namespaced(client.clone(), namespace);
        let secrets: Api<Secret> = Api::namespaced(client, namespace);
        let shared = servers.clone();
        let task = tokio::spawn(async move {
            let params = ListParams::default().labels("kubemaas.io/model-deployment");
            loop {
                if let Ok(list) = api.list(&params).await {
                    reconcile(&list.items, &config, &shared, &secrets).await;
                }
                tokio::time::sleep(Duration::from_millis(300)).await;
            }
        });
        PodRunner { task, servers }
    }

    /// Pod IPs with a running server.
    pub fn serving(&self) -> Vec<String> {
        let mut ips: Vec<String> = self
            .servers
            .lock()
            .map(|s| s.values().map(|r| r.ip.clone()).collect())
            .unwrap_or_default();
        ips.sort();
        ips
    }

    /// Stops every server.
    pub fn stop(&self) {
        self.task.abort();
        if let Ok(mut s) = self.servers.lock() {
            for (_, mut r) in s.drain() {
                stop_child(&mut r.child);
            }
        }
    }
}

impl Drop for PodRunner {
    fn drop(&mut self) {
        self.stop();
    }
}

fn stop_child(c: &mut Child) {
    // SIGTERM first so the server drains; then make sure.
    let _ = Command::new("kill").arg(c.id().to_string()).status();
    for _ in 0..50 {
        if matches!(c.try_wait(), Ok(Some(_))) {
            return;
        }
        std::thread::sleep(Duration::from_millis(100));
    }
    let _ = c.kill();
    let _ = c.wait();
}

/// The IP of a pod that kwok runs (Running, addressed, not being deleted), and not one a test
/// plays the kubelet for.
fn runnable(p: &Pod, config: &RunnerConfig) -> Option<String> {
    let md = p.labels().get("kubemaas.io/model-deployment")?;
    if config.only.as_ref().is_some_and(|only| !only.contains(md)) {
        return None;
    }
    if p.metadata.deletion_timestamp.is_some() || p.labels().get(crate::KUBELET_BY_TEST_LABEL).is_some() {
        return None;
    }
    let s = p.status.as_ref()?;
    (s.phase.as_deref() == Some("Running")).then_some(())?;
    s.pod_ip.clone()
}

async fn reconcile(
    pods: &[Pod],
    config: &RunnerConfig,
    servers: &Arc<Mutex<HashMap<String, Running>>>,
    secrets: &Api<Secret>,
) {
    let wanted: HashMap<String, (&Pod, String)> = pods
        .iter()
        .filter_map(|p| Some((p.uid()?, (p, runnable(p, config)?))))
        .collect();
    // Pods gone: stop their servers.
    let gone: Vec<Running> = match servers.lock() {
        Ok(mut s) => {
            let keys: Vec<String> = s.keys().filter(|k| !wanted.contains_key(*k)).cloned().collect();
            keys.iter().filter_map(|k| s.remove(k)).collect()
        }
        Err(_) => return,
    };
    for mut r in gone {
        tokio::task::spawn_blocking(move || stop_child(&mut r.child));
    }
    for (uid, (pod, ip)) in wanted {
        let known = servers.lock().map(|s| s.contains_key(&uid)).unwrap_or(true);
        // Like the kubelet, keep mounted Secrets current for running pods too.
        let mounts = sync_secrets(pod, &pod_dir(pod, config), secrets).await;
        if known {
            continue;
        }
        match start_pod(pod, &ip, config, &mounts).await {
            Ok(child) => {
                if let Ok(mut s) = servers.lock() {
                    s.insert(uid, Running { child, ip });
                }
            }
            Err(e) => {
                eprintln!("podrunner: pod {}: {e}", pod.name_any());
                // Remember the failure as a finished process so it is not retried every poll.
                if let Ok(child) = Command::new("true").spawn()
                    && let Ok(mut s) = servers.lock()
                {
                    s.insert(uid, Running { child, ip });
                }
            }
        }
    }
}

/// A pod's work directory.
fn pod_dir(pod: &Pod, config: &RunnerConfig) -> PathBuf {
    config.work.join(format!("pod-{}", pod.name_any()))
}

/// Writes the Secret volumes the server container mounts into `DIR/volumes/<volume>/` (the
/// Secret's items, or all its keys) when their content changed; returns (mount path, local dir)
/// for mapping arguments. A Secret that cannot be read is left as it was (logged).
async fn sync_secrets(pod: &Pod, dir: &Path, secrets: &Api<Secret>) -> Vec<(String, PathBuf)> {
    let Some(spec) = pod.spec.as_ref() else {
        return Vec::new();
    };
    let mounts = spec
        .containers
        .first()
        .and_then(|c| c.volume_mounts.clone())
        .unwrap_or_default();
    let mut mapped = Vec::new();
    for m in mounts {
        let Some(source) = spec
            .volumes
            .iter()
            .flatten()
            .find(|v| v.name == m.name)
            .and_then(|v| v.secret.clone())
        else {
            continue;
        };
        let local = dir.join("volumes").join(&m.name);
        mapped.push((m.mount_path.clone(), local.clone()));
        let name = source.secret_name.clone().unwrap_or_default();
        let secret = match secrets.get(&name).await {
            Ok(s) => s,
            Err(e) => {
                eprintln!("podrunner: pod {}: Secret {name}: {e}", pod.name_any());
                continue;
            }
        };
        let data = secret.data.unwrap_or_default();
        let files: Vec<(String, Vec<u8>)> = match &source.items {
            Some(items) => items
                .iter()
                .filter_map(|i| Some((i.path.clone(), data.get(&i.key)?.0.clone())))
                .collect(),
            None => data.iter().map(|(k, v)| (k.clone(), v.0.clone())).collect(),
        };
        for (path, bytes) in files {
            let target = local.join(&path);
            if std::fs::read(&target).ok().as_deref() == Some(bytes.as_slice()) {
                continue;
            }
            let staged = local.join(format!(".{path}.new"));
            let written = std::fs::create_dir_all(&local)
                .and_then(|_| std::fs::write(&staged, &bytes))
                .and_then(|_| std::fs::rename(&staged, &target));
            if let Err(e) = written {
                eprintln!(
                    "podrunner: pod {}: writing {}: {e}",
                    pod.name_any(),
                    target.display()
                );
            }
        }
    }
    mapped
}

/// Maps an in-pod path to the local one.
fn local_arg(a: &str, models: &Path, config: &RunnerConfig, mounts: &[(String, PathBuf)]) -> String {
    if let Some(rest) = a.strip_prefix(MODELS_DIR) {
        return format!("{}{rest}", models.display());
    }
    for (mount, local) in mounts {
        if let Some(rest) = a.strip_prefix(mount.as_str()) {
            return format!("{}{rest}", local.display());
        }
    }
    if a == PVC_MOUNT {
        return config.pvc_root.display().to_string();
    }
    a.to_string()
}

async fn start_pod(
    pod: &Pod,
    ip: &str,
    config: &RunnerConfig,
    mounts: &[(String, PathBuf)],
) -> Result<Child, String> {
    let spec = pod.spec.as_ref().ok_or("no spec")?;
    let dir = pod_dir(pod, config);
    let models = dir.join("models");
    std::fs::create_dir_all(&models).map_err(|e| format!("{}: {e}", models.display()))?;
    let log = |name: &str| std::fs::File::create(dir.join(name)).map_err(|e| format!("log {name}: {e}"));
    for init in spec.init_containers.iter().flatten() {
        let mut args: Vec<String> = Vec::new();
        let mut given = init.args.clone().unwrap_or_default().into_iter();
        while let Some(a) = given.next() {
            // Cache and credential volumes are not mounted here.
            if a == "--cache-dir" || a == "--credentials-dir" {
                given.next();
                continue;
            }
            args.push(local_arg(&a, &models, config, &[]));
        }
        let (server, out) = (config.server.clone(), log(&format!("{}.log", init.name))?);
        let status = tokio::task::spawn_blocking(move || {
            Command::new(server)
                .args(&args)
                .stdout(Stdio::null())
                .stderr(out)
                .status()
        })
        .await
        .map_err(|e| e.to_string())?
        .map_err(|e| e.to_string())?;
        if !status.success() {
            return Err(format!("init container {} failed: {status}", init.name));
        }
    }
    let main = spec.containers.first().ok_or("no container")?;
    let mut args: Vec<String> = main
        .args
        .clone()
        .unwrap_or_default()
        .iter()
        .map(|a| local_arg(a, &models, config, mounts))
        .collect();
    if config.cuda_as_auto
        && let Some(i) = args.iter().position(|a| a == "--execution-provider")
        && args.get(i + 1).map(String::as_str) == Some("cuda")
    {
        args[i + 1] = "auto".into();
    }
    args.extend(["--host".into(), ip.into()]);
    Command::new(&config.server)
        .args(&args)
        .stdout(Stdio::null())
        .stderr(log("server.log")?)
        .spawn()
        .map_err(|e| format!("{}: {e}", config.server.display()))
}

/// A loopback HTTP server for artifacts: `GET`/`HEAD` of a path answers what `object` returns for
/// it (`application/octet-stream`), 404 when it returns None. Returns the base URL; runs until the
/// process ends.
pub fn object_store(object: impl Fn(&str) -> Option<Vec<u8>> + Send + Sync + 'static) -> String {
    use std::io::{BufRead, BufReader, Write};
    let listener = std::net::TcpListener::bind("127.0.0.1:0").expect("bind a loopback port");
    let base = format!("http://{}", listener.local_addr().expect("local address"));
    let object = std::sync::Arc::new(object);
    std::thread::spawn(move || {
        for stream in listener.incoming().flatten() {
            let object = object.clone();
            std::thread::spawn(move || {
                let mut reader = BufReader::new(stream);
                let mut line = String::new();
                if reader.read_line(&mut line).is_err() {
                    return;
                }
                let mut parts = line.split_whitespace();
                let (method, target) = (parts.next().unwrap_or(""), parts.next().unwrap_or("/"));
                loop {
                    let mut h = String::new();
                    if reader.read_line(&mut h).is_err() || h == "\r\n" || h.is_empty() {
                        break;
                    }
                }
                let body = object(target);
                let mut stream = reader.into_inner();
                let (status, payload) = match &body {
                    Some(b) => ("200 OK", b.as_slice()),
                    None => ("404 Not Found", b"no such object\n".as_slice()),
                };
                let _ = write!(
                    stream,
                    "HTTP/1.1 {status}\r\ncontent-type: application/octet-stream\r\ncontent-length: {}\r\nconnection: close\r\n\r\n",
                    payload.len()
                );
                if method != "HEAD" {
                    let _ = stream.write_all(payload);
                }
            });
        }
    });
    base
}

/// A loopback HTTP file store for model artifacts: `GET /PATH` answers the file `ROOT/PATH`
/// (404 otherwise), so a ModelDeployment's pull fetches a real model the way it would from a
/// bucket's HTTPS endpoint.
pub fn file_store(root: PathBuf) -> String {
    object_store(move |target| {
        let rel = target.trim_start_matches('/');
        if rel.split('/').any(|c| c == "..") {
            return None;
        }
        std::fs::read(root.join(rel)).ok()
    })
}

/// What a load run measured on the client side.
#[derive(Debug, Clone)]
pub struct LoadReport {
    /// When each answer came and its latency in milliseconds (NaN for a failure), in order.
    pub completions: Vec<(std::time::Instant, f64)>,
    /// Requests answered 200.
    pub ok: usize,
    /// Requests answered otherwise, or failed.
    pub errors: usize,
    /// Answers per second over the run.
    pub rps: f64,
    /// Median latency in milliseconds.
    pub p50_ms: f64,
    /// 99th-percentile latency in milliseconds.
    pub p99_ms: f64,
}

impl LoadReport {
    /// Answers per second between two instants.
    pub fn rate_between(&self, from: std::time::Instant, to: std::time::Instant) -> f64 {
        let n = self
            .completions
            .iter()
            .filter(|(t, _)| *t > from && *t <= to)
            .count();
        n as f64 / to.duration_since(from).as_secs_f64().max(1e-3)
    }

    /// The 99th-percentile latency (ms) of the answers between two instants.
    pub fn p99_between(&self, from: std::time::Instant, to: std::time::Instant) -> Option<f64> {
        let mut l: Vec<f64> = self
            .completions
            .iter()
            .filter(|(t, ms)| *t > from && *t <= to && ms.is_finite())
            .map(|(_, ms)| *ms)
            .collect();
        l.sort_by(f64::total_cmp);
        l.get(((l.len() as f64 * 0.99) as usize).min(l.len().checked_sub(1)?))
            .copied()
    }
}

/// Sends `body` as `POST path` to `addr` (host:port) from `clients` threads, each on one kept-alive
/// connection sending its next request when the last is answered, for `duration`.
pub fn load(addr: &str, path: &str, body: &[u8], clients: usize, duration: Duration) -> LoadReport {
    load_with(
        addr,
        path,
        "content-type: application/json\r\n",
        body,
        clients,
        duration,
    )
}

/// [`load`] with the binary tensor extension: `body` is a JSON header of `header_len` bytes and
/// then the tensors' bytes. Decoding it costs the server almost nothing, so the time a request
/// spends in the server is the model's.
pub fn load_binary(
    addr: &str,
    path: &str,
    header_len: usize,
    body: &[u8],
    clients: usize,
    duration: Duration,
) -> LoadReport {
    let headers = format!(
        "content-type: application/octet-stream\r\ninference-header-content-length: {header_len}\r\n"
    );
    load_with(addr, path, &headers, body, clients, duration)
}

/// [`load`] with `headers` (complete lines, each ending in CRLF) instead of the JSON content type.
fn load_with(
    addr: &str,
    path: &str,
    headers: &str,
    body: &[u8],
    clients: usize,
    duration: Duration,
) -> LoadReport {
    use std::io::{BufRead, BufReader, Read, Write};
    let start = std::time::Instant::now();
    let threads: Vec<_> = (0..clients)
        .map(|_| {
            let (addr, path, headers, body) = (
                addr.to_string(),
                path.to_string(),
                headers.to_string(),
                body.to_vec(),
            );
            std::thread::spawn(move || {
                let (mut lat, mut errors, mut done) = (Vec::new(), 0usize, Vec::new());
                let mut conn: Option<BufReader<std::net::TcpStream>> = None;
                while start.elapsed() < duration {
                    let t = std::time::Instant::now();
                    let one = (|| -> std::io::Result<bool> {
                        if conn.is_none() {
                            let s = std::net::TcpStream::connect(&addr)?;
                            // Without it Nagle and delayed ACKs add 40 ms to every request.
                            s.set_nodelay(true)?;
                            conn = Some(BufReader::new(s));
                        }
                        let r = conn.as_mut().expect("connected above");
                        let mut request = format!(
                            "POST {path} HTTP/1.1\r\nhost: {addr}\r\n{headers}content-length: {}\r\n\r\n",
                            body.len()
                        )
                        .into_bytes();
                        request.extend_from_slice(&body);
                        r.get_mut().write_all(&request)?;
                        let mut status = String::new();
                        r.read_line(&mut status)?;
                        let mut length = 0usize;
                        loop {
                            let mut h = String::new();
                            if r.read_line(&mut h)? == 0 || h == "\r\n" {
                                break;
                            }
                            if let Some((k, v)) = h.split_once(':')
                                && k.eq_ignore_ascii_case("content-length")
                            {
                                length = v.trim().parse().unwrap_or(0);
                            }
                        }
                        let mut payload = vec![0; length];
                        r.read_exact(&mut payload)?;
                        Ok(status.split_whitespace().nth(1) == Some("200"))
                    })();
                    let ms = t.elapsed().as_secs_f64() * 1e3;
                    done.push((
                        std::time::Instant::now(),
                        if matches!(one, Ok(true)) { ms } else { f64::NAN },
                    ));
                    match one {
                        Ok(true) => lat.push(ms),
                        Ok(false) => errors += 1,
                        Err(_) => {
                            errors += 1;
                            conn = None;
                        }
                    }
                }
                (lat, errors, done)
            })
        })
        .collect();
    let (mut lat, mut errors, mut completions) = (Vec::new(), 0, Vec::new());
    for t in threads {
        let (l, e, d) = t.join().expect("load thread");
        lat.extend(l);
        errors += e;
        completions.extend(d);
    }
    completions.sort_by_key(|c: &(std::time::Instant, f64)| c.0);
    let secs = start.elapsed().as_secs_f64();
    lat.sort_by(f64::total_cmp);
    let pick = |q: f64| {
        lat.get(((lat.len() as f64 * q) as usize).min(lat.len().saturating_sub(1)))
            .copied()
            .unwrap_or(0.0)
    };
    LoadReport {
        completions,
        ok: lat.len(),
        errors,
        rps: (lat.len() + errors) as f64 / secs,
        p50_ms: pick(0.5),
        p99_ms: pick(0.99),
    }
}
