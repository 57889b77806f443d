//! Harness of the end-to-end suite: the control plane started by `e2e/cluster/up` (real etcd,
//! kube-apiserver, kube-controller-manager, kube-scheduler, kwok nodes), one namespace per test,
//! the operator as a real process, and waits on conditions (never fixed sleeps).
//!
//! The environment comes from `make e2e`: KUBECONFIG, KUBEMAAS_E2E_AUDIT_LOG, KUBEMAAS_E2E_LOGS,
//! KUBECTL.

#![allow(clippy::expect_used, clippy::unwrap_used)] // test harness: a panic is a failed test

pub mod podrunner;

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::sync::atomic::{AtomicU32, Ordering};
use std::time::{Duration, Instant};

use k8s_openapi::api::core::v1::Namespace;
use kube::api::{DeleteParams, PostParams};
use kube::config::{KubeConfigOptions, Kubeconfig};
use kube::{Api, Client, Config};
use kubemaas_crds::v1alpha1::ModelDeployment;

/// Label of pods whose status a test writes itself, the way the kubelet would (e.g. after running
/// the init container's real command); kwok leaves their status alone, see
/// `disregardStatusWithLabelSelector` in `e2e/cluster/up`. Its value there is `test`.
pub const KUBELET_BY_TEST_LABEL: &str = "kubemaas.io/e2e-kubelet";

/// Paths the suite needs.
pub struct Env {
    /// Cluster kubeconfig.
    pub kubeconfig: PathBuf,
    /// kubectl binary.
    pub kubectl: PathBuf,
    /// apiserver audit log.
    pub audit_log: PathBuf,
    /// Component logs.
    pub logs: PathBuf,
    /// Repository root.
    pub root: PathBuf,
    /// Operator binary.
    pub operator: PathBuf,
}

/// Reads the environment `make e2e` sets up; panics with the fix when it is missing.
pub fn env() -> Env {
    let var = |k: &str| {
        std::env::var_os(k).map(PathBuf::from).unwrap_or_else(|| {
            panic!("{k} is not set: run the suite with `make e2e`, which starts the control plane")
        })
    };
    let root = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("..");
    Env {
        kubeconfig: var("KUBECONFIG"),
        kubectl: var("KUBECTL"),
        audit_log: var("KUBEMAAS_E2E_AUDIT_LOG"),
        logs: var("KUBEMAAS_E2E_LOGS"),
        operator: root.join("target/debug/kubemaas-operator"),
        root,
    }
}

/// A client for the e2e cluster.
pub async fn client() -> Client {
    let env = env();
    let kc = Kubeconfig::read_from(&env.kubeconfig).expect("kubeconfig readable");
    let cfg = Config::from_custom_kubeconfig(kc, &KubeConfigOptions::default())
        .await
        .expect("kubeconfig valid");
    Client::try_from(cfg).expect("client")
}

/// Runs kubectl against the e2e cluster.
pub fn kubectl(args: &[&str]) -> Output {
    let env = env();
    Command::new(&env.kubectl)
        .args(args)
        .env("KUBECONFIG", &env.kubeconfig)
        .output()
        .expect("kubectl runs")
}

/// Runs helm (from scripts/setup.sh) against the e2e cluster.
pub fn helm(args: &[&str]) -> Output {
    let env = env();
    let helm = std::env::var_os("KUBEMAAS_HELM").expect("KUBEMAAS_HELM is set by `make e2e`");
    Command::new(helm)
        .args(args)
        .env("KUBECONFIG", &env.kubeconfig)
        .output()
        .expect("helm runs")
}

/// A kubeconfig that authenticates as ServiceAccount `sa` of `ns` with a short-lived token.
pub fn service_account_kubeconfig(ns: &str, sa: &str, path: &Path) {
    let out = kubectl(&["create", "token", sa, "-n", ns, "--duration", "1h"]);
    assert!(
        out.status.success(),
        "create token: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let token = String::from_utf8(out.stdout).unwrap().trim().to_string();
    let admin: serde_json::Value =
        serde_saphyr::from_str(&std::fs::read_to_string(env().kubeconfig).unwrap()).unwrap();
    let cluster = admin["clusters"][0]["cluster"].clone();
    let kc = serde_json::json!({"apiVersion": "v1", "kind": "Config", "current-context": "sa",
        "clusters": [{"name": "c", "cluster": cluster}],
        "users": [{"name": sa, "user": {"token": token}}],
        "contexts": [{"name": "sa", "context": {"cluster": "c", "user": sa}}]});
    std::fs::write(path, serde_json::to_string(&kc).unwrap()).unwrap();
}

/// Installs the generated CRD (idempotent) and waits until it is Established.
pub fn install_crd() {
    let env = env();
    let crd = env.root.join("crds/generated/modeldeployments.kubemaas.io.yaml");
    let out = kubectl(&[
        "apply",
        "--server-side",
        "--force-conflicts",
        "-f",
        crd.to_str().unwrap(),
    ]);
    assert!(
        out.status.success(),
        "CRD apply failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    // Right after a changed CRD is applied its status may have no conditions yet, which
    // `kubectl wait` reports as an error rather than waiting: ask again.
    let mut out = kubectl(&["version", "--client"]);
    for _ in 0..10 {
        out = kubectl(&[
            "wait",
            "--for=condition=Established",
            "crd/modeldeployments.kubemaas.io",
            "--timeout=60s",
        ]);
        if out.status.success() || !String::from_utf8_lossy(&out.stderr).contains("accessor error") {
            break;
        }
        std::thread::sleep(Duration::from_millis(500));
    }
    assert!(
        out.status.success(),
        "CRD not established: {}",
        String::from_utf8_lossy(&out.stderr)
    );
}

static SEQ: AtomicU32 = AtomicU32::new(0);

/// A namespace owned by one test, deleted when dropped.
pub struct TestNs {
    /// Its name.
    pub name: String,
}

impl TestNs {
    /// Creates `e2e-<label>-<n>`.
    pub async fn new(client: &Client, label: &str) -> TestNs {
        let name = format!(
            "e2e-{label}-{}-{}",
            std::process::id() % 10000,
            SEQ.fetch_add(1, Ordering::SeqCst)
        );
        let ns: Namespace = serde_json::from_value(serde_json::json!({"metadata": {"name": name}})).unwrap();
        Api::<Namespace>::all(client.clone())
            .create(&PostParams::default(), &ns)
            .await
            .expect("namespace created");
        TestNs { name }
    }
}

impl Drop for TestNs {
    fn drop(&mut self) {
        let _ = kubectl(&["delete", "namespace", &self.name, "--wait=false"]);
    }
}

/// The operator binary running against the e2e cluster, killed when dropped.
pub struct Operator {
    child: Child,
    /// Its log file.
    pub log: PathBuf,
    /// Its identity (POD_NAME).
    pub identity: String,
}

impl Operator {
    /// Starts `kubemaas-operator run` watching `ns`, electing on a Lease in `ns`.
    pub fn start(ns: &str, identity: &str, extra: &[&str]) -> Operator {
        Operator::start_with_env(ns, identity, extra, &[])
    }

    /// Like [`Operator::start`], with extra environment variables.
    pub fn start_with_env(ns: &str, identity: &str, extra: &[&str], vars: &[(&str, &str)]) -> Operator {
        let env = env();
        let log = env.root.join(format!("target/e2e/operator-{ns}-{identity}.log"));
        std::fs::create_dir_all(log.parent().unwrap()).unwrap();
        let file = std::fs::File::create(&log).unwrap();
        let child = Command::new(&env.operator)
            .args(["run", "--watch-namespace", ns, "--metrics-addr", "127.0.0.1:0"])
            .args(if extra.contains(&"--lease-duration-seconds") {
                vec![]
            } else {
                vec!["--lease-duration-seconds", "10"]
            })
            .args(if extra.contains(&"--leader-election-namespace") {
                vec![]
            } else {
                vec!["--leader-election-namespace", ns]
            })
            .args(extra)
            .env("KUBECONFIG", &env.kubeconfig)
            .env("POD_NAME", identity)
            // Directives match by prefix: "kube=warn" would silence kubemaas_operator too.
            .env("KUBEMAAS_LOG", "info,kube_runtime=warn,kube_client=warn")
            .env("KUBEMAAS_LOG_FORMAT", "json")
            .envs(vars.iter().copied())
            .stdout(Stdio::null())
            .stderr(file)
            .spawn()
            .expect("operator starts");
        Operator {
            child,
            log,
            identity: identity.into(),
        }
    }

    /// Panics with its log if the process has exited (so a wait does not run into its timeout).
    pub fn assert_running(&mut self) {
        if let Ok(Some(status)) = self.child.try_wait() {
            panic!(
                "operator {} exited with {status}:\n{}",
                self.identity,
                self.log_tail()
            );
        }
    }

    /// Sends SIGTERM and waits for a clean exit; returns whether it exited with success.
    pub fn terminate(&mut self) -> bool {
        let _ = Command::new("kill")
            .args(["-TERM", &self.pid().to_string()])
            .status();
        self.child.wait().map(|s| s.success()).unwrap_or(false)
    }

    /// SIGKILLs it (no graceful shutdown, like a node failure).
    pub fn kill(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }

    /// Process id.
    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// Peak resident set size in KiB (VmHWM), while it runs.
    pub fn peak_rss_kib(&self) -> Option<u64> {
        let status = std::fs::read_to_string(format!("/proc/{}/status", self.pid())).ok()?;
        status
            .lines()
            .find(|l| l.starts_with("VmHWM:"))?
            .split_whitespace()
            .nth(1)?
            .parse()
            .ok()
    }

    /// The address of its /metrics (from its "operator listening" log line).
    pub fn metrics_addr(&self) -> Option<String> {
        std::fs::read_to_string(&self.log).ok()?.lines().find_map(|l| {
            let v: serde_json::Value = serde_json::from_str(l).ok()?;
            (v["message"] == "operator listening")
                .then(|| v["metrics"].as_str().map(String::from))
                .flatten()
        })
    }

    /// A counter or gauge from its /metrics.
    pub fn metric(&self, name: &str) -> Option<f64> {
        use std::io::{Read, Write};
        let addr = self.metrics_addr()?;
        let mut s = std::net::TcpStream::connect(&addr).ok()?;
        s.set_read_timeout(Some(Duration::from_secs(5))).ok()?;
        write!(
            s,
            "GET /metrics HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\n\r\n"
        )
        .ok()?;
        let mut body = String::new();
        s.read_to_string(&mut body).ok()?;
        body.lines()
            .find_map(|l| l.strip_prefix(name)?.strip_prefix(' ')?.trim().parse().ok())
    }

    /// The last lines of its log, for failure messages.
    pub fn log_tail(&self) -> String {
        tail(&self.log, 40)
    }
}

impl Drop for Operator {
    fn drop(&mut self) {
        self.kill();
    }
}

/// Whether a child process still runs (an exited, unreaped child is a zombie, not alive).
pub fn process_alive(pid: u32) -> bool {
    std::fs::read_to_string(format!("/proc/{pid}/status"))
        .map(|s| !s.lines().any(|l| l.starts_with("State:") && l.contains('Z')))
        .unwrap_or(false)
}

/// Last `n` lines of a file.
pub fn tail(path: &Path, n: usize) -> String {
    let text = std::fs::read_to_string(path).unwrap_or_default();
    let lines: Vec<&str> = text.lines().collect();
    lines[lines.len().saturating_sub(n)..].join("\n")
}

/// The status of a condition type, if present.
pub fn condition(md: &ModelDeployment, type_: &str) -> Option<(String, String, String)> {
    md.status
        .as_ref()?
        .conditions
        .iter()
        .find(|c| c.type_ == type_)
        .map(|c| (c.status.clone(), c.reason.clone(), c.message.clone()))
}

/// Polls `f` until it returns Some, or panics after `timeout` with `context()`.
pub async fn wait_for<T, F, Fut>(what: &str, timeout: Duration, context: impl Fn() -> String, mut f: F) -> T
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = Option<T>>,
{
    let start = Instant::now();
    loop {
        if let Some(v) = f().await {
            return v;
        }
        if start.elapsed() > timeout {
            panic!("timed out after {timeout:?} waiting for {what}\n{}", context());
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

/// Waits until the ModelDeployment satisfies `pred`; returns it.
pub async fn wait_md(
    api: &Api<ModelDeployment>,
    name: &str,
    what: &str,
    timeout: Duration,
    op: Option<&Operator>,
    pred: impl Fn(&ModelDeployment) -> bool,
) -> ModelDeployment {
    let last = std::sync::Mutex::new(String::new());
    wait_for(
        what,
        timeout,
        || {
            format!(
                "last status: {}\noperator log:\n{}",
                last.lock().unwrap(),
                op.map(Operator::log_tail).unwrap_or_default()
            )
        },
        || async {
            if let Some(pid) = op.map(Operator::pid)
                && !process_alive(pid)
            {
                panic!(
                    "the operator exited:\n{}",
                    op.map(Operator::log_tail).unwrap_or_default()
                );
            }
            let md = api.get_opt(name).await.ok().flatten()?;
            *last.lock().unwrap() = serde_json::to_string(&md.status).unwrap_or_default();
            pred(&md).then_some(md)
        },
    )
    .await
}

/// True when Ready=True for the current generation.
pub fn is_ready(md: &ModelDeployment) -> bool {
    let gen_ok = md.status.as_ref().and_then(|s| s.observed_generation) == md.metadata.generation;
    gen_ok && condition(md, "Ready").is_some_and(|c| c.0 == "True")
}

/// The pods of a ModelDeployment.
pub async fn pods_of(client: &Client, ns: &str, md: &str) -> Vec<k8s_openapi::api::core::v1::Pod> {
    let lp = kube::api::ListParams::default().labels(&format!("kubemaas.io/model-deployment={md}"));
    Api::namespaced(client.clone(), ns)
        .list(&lp)
        .await
        .map(|l| l.items)
        .unwrap_or_default()
}

/// A ModelDeployment manifest as JSON.
pub fn md_json(name: &str, spec: serde_json::Value) -> serde_json::Value {
    serde_json::json!({"apiVersion": "kubemaas.io/v1alpha1", "kind": "ModelDeployment", "metadata": {"name": name}, "spec": spec})
}

/// Applies a ModelDeployment from JSON into `ns`.
pub async fn create_md(api: &Api<ModelDeployment>, md: serde_json::Value) -> ModelDeployment {
    let md: ModelDeployment = serde_json::from_value(md).expect("valid ModelDeployment JSON");
    api.create(&PostParams::default(), &md)
        .await
        .expect("ModelDeployment created")
}

/// Deletes a ModelDeployment (foreground is not needed: children go by owner references).
pub async fn delete_md(api: &Api<ModelDeployment>, name: &str) {
    api.delete(name, &DeleteParams::default())
        .await
        .expect("ModelDeployment deleted");
}

/// Write requests in `ns` recorded by the audit log after line `from`, by user agent prefix.
pub fn audited_writes(ns: &str, agent: &str, from: usize) -> Vec<String> {
    let text = std::fs::read_to_string(env().audit_log).unwrap_or_default();
    text.lines()
        .skip(from)
        .filter_map(|l| serde_json::from_str::<serde_json::Value>(l).ok())
        .filter(|e| {
            e["objectRef"]["namespace"] == ns && e["userAgent"].as_str().is_some_and(|a| a.starts_with(agent))
        })
        .filter(|e| e["objectRef"]["resource"] != "leases" && e["stage"] == "ResponseComplete")
        .map(|e| {
            format!(
                "{} {}/{}",
                e["verb"], e["objectRef"]["resource"], e["objectRef"]["name"]
            )
        })
        .collect()
}

/// Number of lines in the audit log now.
pub fn audit_len() -> usize {
    std::fs::read_to_string(env().audit_log)
        .map(|t| t.lines().count())
        .unwrap_or(0)
}

/// A TCP pass-through on loopback in front of the apiserver that can be told to stall: bytes are
/// then read and held, never forwarded, on every connection old and new, the way an overloaded
/// or partitioned apiserver looks to one client. TLS passes through untouched.
pub struct StallingProxy {
    /// Where clients connect.
    pub addr: std::net::SocketAddr,
    stalled: std::sync::Arc<std::sync::atomic::AtomicBool>,
    task: tokio::task::JoinHandle<()>,
}

impl StallingProxy {
    /// Starts forwarding to the apiserver of the e2e kubeconfig.
    pub async fn start() -> StallingProxy {
        use tokio::io::{AsyncReadExt, AsyncWriteExt};
        let admin: serde_json::Value =
            serde_saphyr::from_str(&std::fs::read_to_string(env().kubeconfig).unwrap()).unwrap();
        let server = admin["clusters"][0]["cluster"]["server"]
            .as_str()
            .unwrap()
            .to_string();
        let upstream = server.trim_start_matches("https://").to_string();
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let stalled = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
        let flag = stalled.clone();
        let task = tokio::spawn(async move {
            while let Ok((client, _)) = listener.accept().await {
                let Ok(server) = tokio::net::TcpStream::connect(&upstream).await else {
                    continue;
                };
                let (cr, cw) = client.into_split();
                let (sr, sw) = server.into_split();
                for (mut from, mut to) in [
                    (
                        Box::new(cr) as Box<dyn tokio::io::AsyncRead + Send + Unpin>,
                        Box::new(sw) as Box<dyn tokio::io::AsyncWrite + Send + Unpin>,
                    ),
                    (Box::new(sr), Box::new(cw)),
                ] {
                    let flag = flag.clone();
                    tokio::spawn(async move {
                        let mut buf = vec![0u8; 16 * 1024];
                        loop {
                            let n = match from.read(&mut buf).await {
                                Ok(0) | Err(_) => break,
                                Ok(n) => n,
                            };
                            while flag.load(Ordering::SeqCst) {
                                tokio::time::sleep(Duration::from_millis(50)).await;
                            }
                            if to.write_all(&buf[..n]).await.is_err() {
                                break;
                            }
                        }
                    });
                }
            }
        });
        StallingProxy { addr, stalled, task }
    }

    /// From now on nothing passes, in either direction.
    pub fn stall(&self) {
        self.stalled.store(true, Ordering::SeqCst);
    }

    /// Writes a copy of the e2e kubeconfig that reaches the apiserver through this proxy.
    pub fn kubeconfig(&self, path: &Path) {
        let mut kc: serde_json::Value =
            serde_saphyr::from_str(&std::fs::read_to_string(env().kubeconfig).unwrap()).unwrap();
        kc["clusters"][0]["cluster"]["server"] = serde_json::json!(format!("https://{}", self.addr));
        std::fs::write(path, serde_json::to_string(&kc).unwrap()).unwrap();
    }
}

impl Drop for StallingProxy {
    fn drop(&mut self) {
        self.task.abort();
    }
}

/// Waits (up to `timeout`) for a pod of ModelDeployment `md` that the scheduler bound to a node.
pub async fn bound_pod(
    pods: &Api<k8s_openapi::api::core::v1::Pod>,
    md: &str,
    timeout: Duration,
    op: &Operator,
) -> k8s_openapi::api::core::v1::Pod {
    let lp = kube::api::ListParams::default().labels(&format!("kubemaas.io/model-deployment={md}"));
    wait_for(
        "the pod bound to a node",
        timeout,
        || op.log_tail(),
        || async {
            pods.list(&lp)
                .await
                .ok()?
                .items
                .into_iter()
                .find(|p| p.spec.as_ref().and_then(|s| s.node_name.as_ref()).is_some())
        },
    )
    .await
}
