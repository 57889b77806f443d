//! The serving Deployment: init container pulls the model, the server container serves it.

use std::collections::BTreeMap;

use k8s_openapi::api::apps::v1::{Deployment, DeploymentSpec, DeploymentStrategy, RollingUpdateDeployment};
use k8s_openapi::api::core::v1::{
    Capabilities, Container, ContainerPort, EmptyDirVolumeSource, EnvFromSource, EnvVar, EnvVarSource,
    HTTPGetAction, KeyToPath, PersistentVolumeClaimVolumeSource, PodSecurityContext, PodSpec,
    PodTemplateSpec, Probe, ResourceFieldSelector, ResourceRequirements, SeccompProfile, SecretEnvSource,
    SecretVolumeSource, SecurityContext, Toleration, Volume, VolumeMount,
};
use k8s_openapi::apimachinery::pkg::api::resource::Quantity;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::{LabelSelector, ObjectMeta};
use k8s_openapi::apimachinery::pkg::util::intstr::IntOrString;
use kubemaas_crds::artifact::is_directory_uri;
use kubemaas_crds::v1alpha1::{Accelerator, ModelDeployment};

use super::{
    BuildConfig, MODELS_DIR, child_labels, child_meta, labels, model_name, ports, selector_labels, spec_hash,
};

/// How many times `startupTimeoutSeconds` a new pod may take to become ready: downloading and
/// loading, plus copying into the cache and compressing when those are asked for.
fn startup_steps(model: &kubemaas_crds::v1alpha1::ModelSource) -> i32 {
    2 + i32::from(model.cache.is_some()) + i32::from(model.compression.is_some())
}

/// The name of the container that runs `kubemaas-server serve`.
pub const SERVER_CONTAINER: &str = "server";

/// A container that fails without writing its termination message (the server and `pull` write
/// one for the failures they know) leaves the tail of its log there instead, for status.
const LOGS_ON_ERROR: &str = "FallbackToLogsOnError";

const GPU_PRODUCT_LABEL: &str = "nvidia.com/gpu.product";
const GPU_TAINT: &str = "nvidia.com/gpu";
const PROBE_PERIOD: i32 = 5;
const PVC_MOUNT: &str = "/mnt/pvc";
/// Where the credentials Secret is mounted as files (`credentials`, `service-account.json`,
/// `token`), in the download init container only.
pub const CREDENTIALS_MOUNT: &str = "/var/run/secrets/kubemaas/credentials";
/// The download init container's resources. `pull` streams each file to disk while hashing it
/// and never holds the artifact in memory, so its footprint does not grow with the model: a small
/// request keeps it schedulable next to the server, and the limit only bounds buffers and TLS.
/// With `compression` it loads the model twice into ONNX Runtime, as the server will once: it
/// gets the server's CPU and memory (the pod's request is the larger of the two, so this costs no
/// extra room), never its GPU (the evaluation runs on CPU).
fn pull_resources(spec: &kubemaas_crds::v1alpha1::ModelDeploymentSpec) -> ResourceRequirements {
    let small = ResourceRequirements {
        requests: Some(BTreeMap::from([
            ("cpu".into(), Quantity("50m".into())),
            ("memory".into(), Quantity("64Mi".into())),
        ])),
        limits: Some(BTreeMap::from([("memory".into(), Quantity("256Mi".into()))])),
        ..ResourceRequirements::default()
    };
    if spec.model.compression.is_none() {
        return small;
    }
    let cpu_memory = |m: Option<&BTreeMap<String, Quantity>>| {
        m.map(|m| {
            m.iter()
                .filter(|(k, _)| *k == "cpu" || *k == "memory")
                .map(|(k, v)| (k.clone(), v.clone()))
                .collect::<BTreeMap<_, _>>()
        })
        .filter(|m| !m.is_empty())
    };
    let server = spec.resources.as_ref();
    ResourceRequirements {
        requests: cpu_memory(server.and_then(|r| r.requests.as_ref())).or(small.requests),
        limits: cpu_memory(server.and_then(|r| r.limits.as_ref())),
        ..ResourceRequirements::default()
    }
}

/// Where the shared artifact cache claim is mounted, in the download init container only.
pub const CACHE_MOUNT: &str = "/cache";
/// Where the server container finds the API keys of `spec.auth` (a directory, so Secret updates
/// reach it; a subPath mount would never change).
pub const API_KEYS_MOUNT: &str = "/var/run/secrets/kubemaas/api-keys";
/// The file inside [`API_KEYS_MOUNT`].
pub const API_KEYS_FILE: &str = "keys";
/// Where the server container finds the certificate and key of `spec.tls` (a directory, so
/// Secret updates reach it).
pub const TLS_MOUNT: &str = "/var/run/secrets/kubemaas/tls";
/// Where the server container finds the client CA bundle of `spec.tls.clientCA`.
pub const CLIENT_CA_MOUNT: &str = "/var/run/secrets/kubemaas/client-ca";
/// The file inside [`CLIENT_CA_MOUNT`].
pub const CLIENT_CA_FILE: &str = "ca.crt";
const NON_ROOT_UID: i64 = 65532;
/// Name of the download init container (its failures become the `ModelLoaded` reason).
pub const PULL_CONTAINER: &str = "model-pull";

/// GPUs the pod asks for: `(resource name, count)`; none for CPU.
fn gpu_request(md: &ModelDeployment) -> Option<(String, i32)> {
    match (md.spec.accelerator, &md.spec.gpu) {
        (Accelerator::Cpu, _) => None,
        (_, Some(g)) => Some((g.resource_name.clone(), g.count)),
        // cuda without a gpu block still needs one GPU; auto without one runs on CPU.
        (Accelerator::Cuda, None) => Some(("nvidia.com/gpu".into(), 1)),
        (Accelerator::Auto, None) => None,
    }
}

/// `0`, `"0%"`, and the same with leading zeros (`"00%"`): the Deployment reads them all as 0.
fn is_zero(v: &IntOrString) -> bool {
    match v {
        IntOrString::Int(n) => *n == 0,
        IntOrString::String(s) => {
            let digits = s.strip_suffix('%').unwrap_or(s);
            !digits.is_empty() && digits.bytes().all(|b| b == b'0')
        }
    }
}

/// A bound as the Deployment wants it: `"2"` (the schema lets a quoted count through) as the
/// number 2; percentages stay strings.
fn bound(v: IntOrString) -> IntOrString {
    match v {
        IntOrString::String(s) => s.parse().map(IntOrString::Int).unwrap_or(IntOrString::String(s)),
        int => int,
    }
}

/// Rolling-update bounds: `spec.rollout`, else surge first on CPU and replace in place on GPUs
/// (a surge pod needs a free GPU, which a full cluster does not have).
fn strategy(md: &ModelDeployment) -> DeploymentStrategy {
    let (surge, unavailable) = if gpu_request(md).is_some() { (0, 1) } else { (1, 0) };
    let asked = md.spec.rollout.clone().unwrap_or_default();
    let surge_asked = asked.max_surge.map(bound);
    let unavailable_asked = asked.max_unavailable.map(bound);
    let surge_set = surge_asked.is_some();
    let mut max_surge = surge_asked.unwrap_or(IntOrString::Int(surge));
    let mut max_unavailable = unavailable_asked.unwrap_or(IntOrString::Int(unavailable));
    // The schema refuses both set to 0; one set to 0 with the other defaulted to 0 would never
    // roll, so the defaulted one gives way: maxUnavailable 0 on a GPU model surges one pod,
    // maxSurge 0 on a CPU model replaces one pod at a time.
    if is_zero(&max_surge) && is_zero(&max_unavailable) {
        if surge_set {
            max_unavailable = IntOrString::Int(1);
        } else {
            max_surge = IntOrString::Int(1);
        }
    }
    DeploymentStrategy {
        type_: Some("RollingUpdate".into()),
        rolling_update: Some(RollingUpdateDeployment {
            max_surge: Some(max_surge),
            max_unavailable: Some(max_unavailable),
        }),
    }
}

fn image(md: &ModelDeployment, cfg: &BuildConfig) -> String {
    match &md.spec.image {
        Some(i) if !i.is_empty() => i.clone(),
        _ if gpu_request(md).is_some() => cfg.server_cuda_image.clone(),
        _ => cfg.server_image.clone(),
    }
}

/// The most cores `serve --cpus` plans for.
const MAX_CPUS: i32 = 4096;

/// Cores in a CPU quantity, rounded up ("500m" → 1, "2" → 2) and capped at what the server plans
/// for (a larger `--cpus` would stop it from starting); None when unparseable.
fn cores(q: &Quantity) -> Option<i32> {
    let s = q.0.trim();
    let v = match s.strip_suffix('m') {
        Some(milli) => milli.parse::<f64>().ok()? / 1000.0,
        None => s.parse::<f64>().ok()?,
    };
    (v > 0.0).then(|| (v.ceil().min(f64::from(MAX_CPUS))) as i32)
}

/// Whole cores of the CPU limit (else request), 0 when neither is set.
fn pod_cores(md: &ModelDeployment) -> i32 {
    let res = md.spec.resources.as_ref();
    let cpu = |m: Option<&BTreeMap<String, Quantity>>| m.and_then(|m| m.get("cpu")).and_then(cores);
    cpu(res.and_then(|r| r.limits.as_ref()))
        .or_else(|| cpu(res.and_then(|r| r.requests.as_ref())))
        .unwrap_or(0)
}

/// Arguments of `kubemaas-server serve` for this spec.
pub fn server_args(md: &ModelDeployment, cfg: &BuildConfig) -> Vec<String> {
    let ep = match md.spec.accelerator {
        Accelerator::Cpu => "cpu",
        Accelerator::Cuda => "cuda",
        Accelerator::Auto => "auto",
    };
    let runtime = md.spec.runtime.as_ref();
    // 0s are the server's to resolve: it shares the cores among the instances so instances ×
    // threads never exceeds them, and it knows whether CUDA really registered.
    let instances = runtime.map(|r| r.instances).unwrap_or(0);
    let intra_op_threads = runtime.map(|r| r.intra_op_threads).unwrap_or(0);
    [
        "serve",
        "--model-repository",
        MODELS_DIR,
        "--execution-provider",
        ep,
        "--instances",
        &instances.to_string(),
        "--intra-op-threads",
        &intra_op_threads.to_string(),
        "--http-port",
        &ports::HTTP.to_string(),
        "--grpc-port",
        &ports::GRPC.to_string(),
        "--metrics-port",
        &ports::METRICS.to_string(),
        "--shutdown-delay",
        &cfg.shutdown_delay_seconds.to_string(),
        "--shutdown-timeout",
        &cfg.shutdown_timeout_seconds.to_string(),
        "--log-format",
        "json",
        // A model that cannot load ends the container with its error (status: LoadFailed).
        "--exit-on-load-failure",
    ]
    .into_iter()
    .map(String::from)
    .chain(cpu_args(md))
    .chain(gpu_args(md))
    .chain(batching_args(md))
    .chain(security_args(md))
    .collect()
}

/// `--gpu-device 0,1,…`: with more than one GPU per pod, the server spreads its instances over
/// all of them (the container sees its GPUs as devices 0..count); with one, device 0 is the default.
fn gpu_args(md: &ModelDeployment) -> Vec<String> {
    match gpu_request(md) {
        Some((_, count)) if count > 1 => vec![
            "--gpu-device".into(),
            (0..count).map(|d| d.to_string()).collect::<Vec<_>>().join(","),
        ],
        _ => Vec::new(),
    }
}

/// `--cpus`: the pod's whole cores for the server to plan instances and threads for, when the
/// spec gives a CPU limit or request (without a limit there is no cgroup quota to read).
fn cpu_args(md: &ModelDeployment) -> Vec<String> {
    match pod_cores(md) {
        0 => Vec::new(),
        cores => vec!["--cpus".into(), cores.to_string()],
    }
}

/// The server container's environment: the user's (`podTemplate.env`), and, when the spec sets no
/// CPU for `--cpus`, the CPU request the pod really got, through the downward API. A LimitRange
/// may give the pod a request and no limit, which leaves no quota for the server to read, so it
/// would plan threads for the whole node.
fn server_env(md: &ModelDeployment, user: Option<&[EnvVar]>) -> Option<Vec<EnvVar>> {
    let mut env: Vec<EnvVar> = user.map(<[EnvVar]>::to_vec).unwrap_or_default();
    if pod_cores(md) == 0 {
        env.push(EnvVar {
            name: "KUBEMAAS_CPU_REQUEST_MILLIS".into(),
            value_from: Some(EnvVarSource {
                resource_field_ref: Some(ResourceFieldSelector {
                    container_name: Some(SERVER_CONTAINER.into()),
                    resource: "requests.cpu".into(),
                    divisor: Some(Quantity("1m".into())),
                }),
                ..EnvVarSource::default()
            }),
            ..EnvVar::default()
        });
    }
    (!env.is_empty()).then_some(env)
}

/// The server flags of `spec.auth` and `spec.tls`: files in the Secret volumes mounted for them.
fn security_args(md: &ModelDeployment) -> Vec<String> {
    let mut args = Vec::new();
    if md.spec.auth.is_some() {
        args.extend([
            "--api-keys-file".into(),
            format!("{API_KEYS_MOUNT}/{API_KEYS_FILE}"),
        ]);
    }
    if let Some(tls) = &md.spec.tls {
        args.extend([
            "--tls-cert".into(),
            format!("{TLS_MOUNT}/tls.crt"),
            "--tls-key".into(),
            format!("{TLS_MOUNT}/tls.key"),
        ]);
        if tls.client_ca.is_some() {
            args.extend([
                "--tls-client-ca".into(),
                format!("{CLIENT_CA_MOUNT}/{CLIENT_CA_FILE}"),
            ]);
        }
    }
    args
}

/// A read-only volume of some entries of a Secret, which must exist (the pod waits for it).
fn secret_volume(name: &str, secret: &str, entries: &[(&str, &str)]) -> Volume {
    Volume {
        name: name.into(),
        secret: Some(SecretVolumeSource {
            secret_name: Some(secret.into()),
            items: Some(
                entries
                    .iter()
                    .map(|(key, path)| KeyToPath {
                        key: (*key).into(),
                        path: (*path).into(),
                        ..KeyToPath::default()
                    })
                    .collect(),
            ),
            default_mode: Some(0o440),
            optional: Some(false),
            ..SecretVolumeSource::default()
        }),
        ..Volume::default()
    }
}

/// `spec.runtime.batching` as the server's dynamic batching flags (none when it is unset).
fn batching_args(md: &ModelDeployment) -> Vec<String> {
    let Some(b) = md.spec.runtime.as_ref().and_then(|r| r.batching.as_ref()) else {
        return Vec::new();
    };
    let mut args = vec![
        "--max-batch-size".into(),
        b.max_batch_size.max(1).to_string(),
        "--max-queue-delay-us".into(),
        b.max_queue_delay_microseconds.max(0).to_string(),
        "--max-queue-size".into(),
        b.max_queue_size.max(1).to_string(),
    ];
    if !b.preferred_batch_sizes.is_empty() {
        let sizes: Vec<String> = b.preferred_batch_sizes.iter().map(|n| n.to_string()).collect();
        args.extend(["--preferred-batch-size".into(), sizes.join(",")]);
    }
    args
}

/// The restricted Pod Security profile's seccomp requirement.
fn runtime_default() -> Option<SeccompProfile> {
    Some(SeccompProfile {
        type_: "RuntimeDefault".into(),
        ..SeccompProfile::default()
    })
}

fn restricted() -> SecurityContext {
    SecurityContext {
        allow_privilege_escalation: Some(false),
        capabilities: Some(Capabilities {
            drop: Some(vec!["ALL".into()]),
            ..Capabilities::default()
        }),
        read_only_root_filesystem: Some(true),
        run_as_non_root: Some(true),
        seccomp_profile: runtime_default(),
        ..SecurityContext::default()
    }
}

fn http_probe(port: &str, path: &str, period: i32, failure_threshold: i32) -> Probe {
    Probe {
        http_get: Some(HTTPGetAction {
            path: Some(path.into()),
            port: IntOrString::String(port.into()),
            ..HTTPGetAction::default()
        }),
        period_seconds: Some(period),
        failure_threshold: Some(failure_threshold),
        timeout_seconds: Some(2),
        ..Probe::default()
    }
}

fn mount(name: &str, path: &str, read_only: bool) -> VolumeMount {
    VolumeMount {
        name: name.into(),
        mount_path: path.into(),
        read_only: Some(read_only),
        ..VolumeMount::default()
    }
}

fn empty_dir(name: &str) -> Volume {
    Volume {
        name: name.into(),
        empty_dir: Some(EmptyDirVolumeSource::default()),
        ..Volume::default()
    }
}

/// The serving Deployment.
pub fn deployment(md: &ModelDeployment, cfg: &BuildConfig) -> Deployment {
    let spec = &md.spec;
    let name = model_name(md);
    let version = spec.model.version.clone();
    let image = image(md, cfg);
    let overrides = spec.pod_template.clone().unwrap_or_default();

    let mut resources = spec.resources.clone().unwrap_or_default();
    let mut node_selector: BTreeMap<String, String> = BTreeMap::new();
    let mut tolerations: Vec<Toleration> = Vec::new();
    if let Some((resource, count)) = gpu_request(md) {
        resources
            .limits
            .get_or_insert_with(BTreeMap::new)
            .insert(resource, Quantity(count.to_string()));
        tolerations.push(Toleration {
            key: Some(GPU_TAINT.into()),
            operator: Some("Exists".into()),
            effect: Some("NoSchedule".into()),
            ..Toleration::default()
        });
        if let Some(product) = spec.gpu.as_ref().and_then(|g| g.product.clone()) {
            node_selector.insert(GPU_PRODUCT_LABEL.into(), product);
        }
    }
    node_selector.extend(overrides.node_selector.clone().unwrap_or_default());
    tolerations.extend(overrides.tolerations.clone().unwrap_or_default());

    let mut volumes = vec![empty_dir("models"), empty_dir("tmp")];
    let mut pull_mounts = vec![mount("models", MODELS_DIR, false), mount("tmp", "/tmp", false)];
    if let Some(rest) = spec.model.uri.strip_prefix("pvc://")
        && let Some((claim, _)) = rest.split_once('/')
    {
        volumes.push(Volume {
            name: "source".into(),
            persistent_volume_claim: Some(PersistentVolumeClaimVolumeSource {
                claim_name: claim.into(),
                read_only: Some(true),
            }),
            ..Volume::default()
        });
        pull_mounts.push(mount("source", &format!("{PVC_MOUNT}/{claim}"), true));
    }

    // A directory URI (a prefix, a whole Hugging Face repository) fills the version directory
    // with model.onnx and its external-data files; a file URI becomes model.onnx in it.
    let target = if is_directory_uri(&spec.model.uri) {
        format!("{MODELS_DIR}/{name}/{version}")
    } else {
        format!("{MODELS_DIR}/{name}/{version}/model.onnx")
    };
    let mut pull_args = vec!["pull".to_string(), spec.model.uri.clone(), target];
    if let Some(sha) = &spec.model.sha256 {
        pull_args.extend(["--sha256".into(), sha.clone()]);
    }
    pull_args.extend([
        "--timeout".into(),
        spec.startup_timeout_seconds.to_string(),
        "--pvc-root".into(),
        PVC_MOUNT.into(),
    ]);
    if spec.model.allow_private_addresses {
        pull_args.push("--allow-private-addresses".into());
    }
    if let Some(max) = spec.model.max_bytes {
        pull_args.extend(["--max-bytes".into(), max.to_string()]);
    }
    if let Some(c) = &spec.model.compression {
        pull_args.extend([
            "--compress".into(),
            c.mode.as_str().into(),
            "--min-cosine".into(),
            c.min_cosine.to_string(),
        ]);
        // The evaluation runs one session at a time on the cores the init container gets (the
        // server's): more threads than that would be throttled and skew the measured speed-up.
        // At most the 1024 intra-op threads pull takes (ONNX Runtime's own bound in practice).
        let threads = pod_cores(md).min(1024);
        if threads > 0 {
            pull_args.extend(["--compress-threads".into(), threads.to_string()]);
        }
        for (input, dims) in &c.input_shapes {
            let dims: Vec<String> = dims.0.iter().map(i64::to_string).collect();
            pull_args.extend(["--input-shape".into(), format!("{input}={}", dims.join("x"))]);
        }
    }
    if let Some(cache) = &spec.model.cache {
        volumes.push(Volume {
            name: "cache".into(),
            persistent_volume_claim: Some(PersistentVolumeClaimVolumeSource {
                claim_name: cache.claim_name.clone(),
                read_only: Some(false),
            }),
            ..Volume::default()
        });
        pull_mounts.push(mount("cache", CACHE_MOUNT, false));
        pull_args.extend(["--cache-dir".into(), CACHE_MOUNT.into()]);
    }
    // Credentials reach only the download, never the serving container: env-style keys as its
    // environment, file-style keys (credentials, service-account.json, token) as read-only files.
    let credentials = spec.model.credentials_secret_ref.as_ref();
    if let Some(secret) = credentials {
        volumes.push(Volume {
            name: "credentials".into(),
            secret: Some(SecretVolumeSource {
                secret_name: Some(secret.name.clone()),
                // Owner and the pod's fsGroup (the non-root user's group) only.
                default_mode: Some(0o440),
                optional: Some(false),
                ..SecretVolumeSource::default()
            }),
            ..Volume::default()
        });
        pull_mounts.push(mount("credentials", CREDENTIALS_MOUNT, true));
        pull_args.extend(["--credentials-dir".into(), CREDENTIALS_MOUNT.into()]);
    }

    let pull = Container {
        name: PULL_CONTAINER.into(),
        image: Some(image.clone()),
        args: Some(pull_args),
        env_from: credentials.map(|s| {
            vec![EnvFromSource {
                secret_ref: Some(SecretEnvSource {
                    name: s.name.clone(),
                    optional: Some(false),
                }),
                ..EnvFromSource::default()
            }]
        }),
        // `pull` streams each file to disk while hashing it and never holds the artifact in
        // memory, so its footprint does not grow with the model: a small request keeps it
        // schedulable next to the server, and the limit only bounds buffers and TLS.
        resources: Some(pull_resources(spec)),
        security_context: Some(restricted()),
        volume_mounts: Some(pull_mounts),
        termination_message_policy: Some(LOGS_ON_ERROR.into()),
        ..Container::default()
    };

    let mut server_mounts = vec![mount("models", MODELS_DIR, true), mount("tmp", "/tmp", false)];
    if let Some(keys) = spec.auth.as_ref().map(|a| &a.api_keys_secret_ref) {
        volumes.push(secret_volume(
            "api-keys",
            &keys.name,
            &[(&keys.key, API_KEYS_FILE)],
        ));
        server_mounts.push(mount("api-keys", API_KEYS_MOUNT, true));
    }
    if let Some(tls) = &spec.tls {
        volumes.push(secret_volume(
            "tls",
            &tls.secret_name,
            &[("tls.crt", "tls.crt"), ("tls.key", "tls.key")],
        ));
        server_mounts.push(mount("tls", TLS_MOUNT, true));
        if let Some(ca) = &tls.client_ca {
            volumes.push(secret_volume(
                "client-ca",
                &ca.secret_name,
                &[(&ca.key, CLIENT_CA_FILE)],
            ));
            server_mounts.push(mount("client-ca", CLIENT_CA_MOUNT, true));
        }
    }
    // The kubelet probes the metrics port: plain HTTP even with (mutual) TLS on the inference
    // ports, and not under their connection cap, so a flood of clients cannot fail liveness and
    // restart every pod. It answers the same readiness and liveness paths.
    let probe_port = "metrics";

    let ready_path = format!("/v2/models/{name}/ready");
    // Saturating: the schema caps the budget at a day, but an object stored before that rule
    // (or written past it) must not overflow.
    let startup_failures = spec
        .startup_timeout_seconds
        .max(1)
        .saturating_add(PROBE_PERIOD - 1)
        / PROBE_PERIOD;
    let port = |name: &str, p: i32| ContainerPort {
        name: Some(name.into()),
        container_port: p,
        protocol: Some("TCP".into()),
        ..ContainerPort::default()
    };
    let server = Container {
        name: SERVER_CONTAINER.into(),
        termination_message_policy: Some(LOGS_ON_ERROR.into()),
        image: Some(image),
        args: Some(server_args(md, cfg)),
        ports: Some(vec![
            port("http", ports::HTTP),
            port("grpc", ports::GRPC),
            port("metrics", ports::METRICS),
        ]),
        env: server_env(md, overrides.env.as_deref()),
        resources: Some(resources),
        startup_probe: Some(http_probe(
            probe_port,
            &ready_path,
            PROBE_PERIOD,
            startup_failures.max(1),
        )),
        readiness_probe: Some(http_probe(probe_port, &ready_path, PROBE_PERIOD, 2)),
        liveness_probe: Some(http_probe(probe_port, "/v2/health/live", 10, 3)),
        security_context: Some(restricted()),
        volume_mounts: Some(server_mounts),
        ..Container::default()
    };

    let mut pod_labels = overrides.labels.clone().unwrap_or_default();
    pod_labels.extend(child_labels(md)); // ours win: the selector depends on them
    let mut annotations = overrides.annotations.clone().unwrap_or_default();
    annotations.extend([
        ("prometheus.io/scrape".to_string(), "true".to_string()),
        ("prometheus.io/port".to_string(), ports::METRICS.to_string()),
        ("prometheus.io/path".to_string(), "/metrics".to_string()),
    ]);

    let pod = PodSpec {
        automount_service_account_token: Some(false),
        service_account_name: overrides.service_account_name.clone(),
        security_context: Some(PodSecurityContext {
            run_as_non_root: Some(true),
            run_as_user: Some(NON_ROOT_UID),
            run_as_group: Some(NON_ROOT_UID),
            fs_group: Some(NON_ROOT_UID),
            seccomp_profile: runtime_default(),
            ..PodSecurityContext::default()
        }),
        init_containers: Some(vec![pull]),
        containers: vec![server],
        volumes: Some(volumes),
        node_selector: (!node_selector.is_empty()).then_some(node_selector),
        tolerations: (!tolerations.is_empty()).then_some(tolerations),
        affinity: overrides.affinity.clone(),
        runtime_class_name: overrides.runtime_class_name.clone(),
        priority_class_name: overrides.priority_class_name.clone(),
        image_pull_secrets: overrides.image_pull_secrets.clone(),
        termination_grace_period_seconds: Some(cfg.shutdown_delay_seconds + cfg.shutdown_timeout_seconds + 5),
        ..PodSpec::default()
    };

    let mut metadata = child_meta(md);
    metadata.annotations = Some(BTreeMap::from([(
        labels::REPLICAS_BY.to_string(),
        if spec.autoscaling.is_some() {
            labels::REPLICAS_BY_AUTOSCALER
        } else {
            labels::REPLICAS_BY_OPERATOR
        }
        .to_string(),
    )]));
    Deployment {
        metadata,
        spec: DeploymentSpec {
            // With autoscaling the HPA owns replicas: leaving the field out of the apply keeps it so.
            replicas: if spec.autoscaling.is_some() {
                None
            } else {
                Some(spec.replicas)
            },
            selector: LabelSelector {
                match_labels: Some(selector_labels(md)),
                ..LabelSelector::default()
            },
            strategy: Some(strategy(md)),
            // A new pod may spend startupTimeoutSeconds downloading and as long again loading,
            // and with a cache as long again copying into it (the copy has its own bound); the
            // default deadline (600 s) would call an on-time rollout stuck. Compression has no
            // bound of its own: it is allowed as long as a download.
            progress_deadline_seconds: Some(
                spec.startup_timeout_seconds
                    .max(1)
                    .saturating_mul(startup_steps(&spec.model))
                    .saturating_add(60)
                    .max(600),
            ),
            template: hashed(PodTemplateSpec {
                metadata: Some(ObjectMeta {
                    labels: Some(pod_labels),
                    annotations: Some(annotations),
                    ..ObjectMeta::default()
                }),
                spec: Some(pod),
            }),
            ..DeploymentSpec::default()
        },
        status: None,
    }
}

/// The template with [`labels::TEMPLATE_HASH`] set to the hash of the rest of it, so every pod
/// says which template it was made from.
fn hashed(mut template: PodTemplateSpec) -> PodTemplateSpec {
    let hash = spec_hash(&template);
    template
        .metadata
        .get_or_insert_with(ObjectMeta::default)
        .annotations
        .get_or_insert_with(BTreeMap::new)
        .insert(labels::TEMPLATE_HASH.into(), hash);
    template
}

#[cfg(test)]
mod tests {
    use serde_json::json;

    use super::super::tests::md;
    use super::*;

    fn pod(d: &Deployment) -> &PodSpec {
        d.spec.template.spec.as_ref().unwrap()
    }

    #[test]
    fn cpu_deployment_pulls_then_serves_under_the_restricted_profile() {
        let m = md(
            json!({"model": {"uri": "s3://models/resnet.onnx", "sha256": "a".repeat(64), "credentialsSecretRef": {"name": "s3-creds"}},
                          "replicas": 2}),
        );
        let d = deployment(&m, &BuildConfig::default());
        assert_eq!(d.spec.replicas, Some(2));
        let p = pod(&d);
        assert_eq!(p.automount_service_account_token, Some(false));
        let init = &p.init_containers.as_ref().unwrap()[0];
        let args = init.args.as_ref().unwrap();
        assert_eq!(
            &args[..3],
            ["pull", "s3://models/resnet.onnx", "/models/resnet/1/model.onnx"]
        );
        assert!(
            args.windows(2)
                .any(|w| w[0] == "--sha256" && w[1] == "a".repeat(64))
        );
        assert_eq!(
            init.env_from.as_ref().unwrap()[0]
                .secret_ref
                .as_ref()
                .unwrap()
                .name,
            "s3-creds"
        );
        let server = &p.containers[0];
        assert!(
            server.env_from.is_none(),
            "credentials must stay in the init container"
        );
        assert!(
            !server
                .volume_mounts
                .as_ref()
                .unwrap()
                .iter()
                .any(|m| m.mount_path.starts_with("/var/run/secrets")),
            "nor their files"
        );
        assert_eq!(server.image.as_deref(), Some("kubemaas/server:0.1.0"));
        let a = server.args.as_ref().unwrap();
        assert!(a.windows(2).any(|w| w == ["--execution-provider", "cpu"]));
        assert!(
            a.iter().any(|x| x == "--exit-on-load-failure"),
            "load errors must reach the status"
        );
        for c in [init, server] {
            let sc = c.security_context.as_ref().unwrap();
            assert_eq!(sc.allow_privilege_escalation, Some(false));
            assert_eq!(sc.read_only_root_filesystem, Some(true));
            assert_eq!(sc.capabilities.as_ref().unwrap().drop.as_ref().unwrap(), &["ALL"]);
            assert_eq!(sc.seccomp_profile.as_ref().unwrap().type_, "RuntimeDefault");
        }
        assert_eq!(
            server
                .readiness_probe
                .as_ref()
                .unwrap()
                .http_get
                .as_ref()
                .unwrap()
                .path
                .as_deref(),
            Some("/v2/models/resnet/ready")
        );
        assert_eq!(
            server
                .liveness_probe
                .as_ref()
                .unwrap()
                .http_get
                .as_ref()
                .unwrap()
                .path
                .as_deref(),
            Some("/v2/health/live")
        );
        assert!(p.tolerations.is_none() && p.node_selector.is_none());
    }

    #[test]
    fn startup_probe_budget_is_startup_timeout_seconds() {
        let m = md(json!({"model": {"uri": "s3://models/m.onnx"}, "startupTimeoutSeconds": 120}));
        let d = deployment(&m, &BuildConfig::default());
        let probe = pod(&d).containers[0].startup_probe.clone().unwrap();
        assert_eq!(
            probe.period_seconds.unwrap() * probe.failure_threshold.unwrap(),
            120
        );
    }

    #[test]
    fn a_rollout_is_given_its_pods_startup_budget_before_it_counts_as_stuck() {
        // A pod may take startupTimeoutSeconds to download and as long again to load; the
        // Deployment's default deadline (600 s) called such a rollout stuck while it was on time.
        for (startup, at_least) in [(600, 1200), (3600, 7200), (30, 600)] {
            let m = md(json!({"model": {"uri": "s3://models/m.onnx"}, "startupTimeoutSeconds": startup}));
            let d = deployment(&m, &BuildConfig::default());
            let deadline = d.spec.progress_deadline_seconds;
            assert!(deadline.is_some_and(|s| s >= at_least), "{startup}: {deadline:?}");
        }
        // With a cache, the init container may also spend up to startupTimeoutSeconds copying the
        // download into it; with compression, it compresses after downloading.
        let t = 600;
        for (extra, at_least) in [
            (
                json!({"sha256": "a".repeat(64), "cache": {"claimName": "c"}}),
                3 * t + 60,
            ),
            (json!({"compression": {"mode": "fp16"}}), 3 * t + 60),
            (
                json!({"sha256": "a".repeat(64), "cache": {"claimName": "c"}, "compression": {"mode": "fp16"}}),
                4 * t + 60,
            ),
        ] {
            let mut model = json!({"uri": "s3://models/m.onnx"});
            if let (Some(m), Some(e)) = (model.as_object_mut(), extra.as_object()) {
                m.extend(e.clone());
            }
            let m = md(json!({"model": model, "startupTimeoutSeconds": t}));
            let deadline = deployment(&m, &BuildConfig::default())
                .spec
                .progress_deadline_seconds;
            assert!(deadline.is_some_and(|s| s >= at_least), "{extra}: {deadline:?}");
        }
        // A container that fails before writing a termination message leaves its last log lines.
        let m = md(json!({"model": {"uri": "s3://models/m.onnx"}}));
        let d = deployment(&m, &BuildConfig::default());
        let p = pod(&d);
        for c in p.containers.iter().chain(p.init_containers.iter().flatten()) {
            assert_eq!(
                c.termination_message_policy.as_deref(),
                Some("FallbackToLogsOnError"),
                "{}",
                c.name
            );
        }
    }

    #[test]
    fn deployment_requests_gpus_when_accelerator_is_cuda() {
        let m = md(
            json!({"model": {"uri": "s3://models/m.onnx"}, "accelerator": "cuda",
                          "gpu": {"count": 2, "product": "NVIDIA-H100-80GB-HBM3"}}),
        );
        let d = deployment(&m, &BuildConfig::default());
        let p = pod(&d);
        let server = &p.containers[0];
        assert_eq!(server.image.as_deref(), Some("kubemaas/server-cuda:0.1.0"));
        assert_eq!(
            server.resources.as_ref().unwrap().limits.as_ref().unwrap()["nvidia.com/gpu"].0,
            "2"
        );
        assert_eq!(
            p.node_selector.as_ref().unwrap()["nvidia.com/gpu.product"],
            "NVIDIA-H100-80GB-HBM3"
        );
        let t = &p.tolerations.as_ref().unwrap()[0];
        assert_eq!(
            (t.key.as_deref(), t.effect.as_deref()),
            (Some("nvidia.com/gpu"), Some("NoSchedule"))
        );
        assert!(
            server
                .args
                .as_ref()
                .unwrap()
                .windows(2)
                .any(|w| w == ["--execution-provider", "cuda"])
        );
    }

    #[test]
    fn every_gpu_of_the_pod_gets_instances() {
        let args = |spec: serde_json::Value| server_args(&md(spec), &BuildConfig::default());
        let uri = json!({"uri": "s3://models/m.onnx"});
        let two = args(json!({"model": uri, "accelerator": "cuda", "gpu": {"count": 2}}));
        assert!(has_flag(&two, "--gpu-device", "0,1"), "{two:?}");
        let four = args(json!({"model": uri, "accelerator": "auto", "gpu": {"count": 4}}));
        assert!(has_flag(&four, "--gpu-device", "0,1,2,3"), "{four:?}");
        for one in [
            json!({"model": uri, "accelerator": "cuda"}),
            json!({"model": uri}),
        ] {
            assert!(!args(one).iter().any(|a| a == "--gpu-device"));
        }
    }

    #[test]
    fn mig_resource_name_is_requested_as_is() {
        let m = md(
            json!({"model": {"uri": "s3://models/m.onnx"}, "accelerator": "cuda",
                          "gpu": {"resourceName": "nvidia.com/mig-1g.10gb"}}),
        );
        let d = deployment(&m, &BuildConfig::default());
        let limits = pod(&d).containers[0].resources.clone().unwrap().limits.unwrap();
        assert_eq!(limits["nvidia.com/mig-1g.10gb"].0, "1");
        assert!(!limits.contains_key("nvidia.com/gpu"));
    }

    #[test]
    fn auto_without_gpu_block_runs_the_cpu_image_and_lets_the_server_choose() {
        let m = md(json!({"model": {"uri": "s3://models/m.onnx"}, "accelerator": "auto"}));
        let d = deployment(&m, &BuildConfig::default());
        let server = &pod(&d).containers[0];
        assert_eq!(server.image.as_deref(), Some("kubemaas/server:0.1.0"));
        assert!(
            server
                .args
                .as_ref()
                .unwrap()
                .windows(2)
                .any(|w| w == ["--execution-provider", "auto"])
        );
    }

    #[test]
    fn gpu_models_replace_in_place_cpu_models_surge_and_spec_rollout_wins() {
        let bounds = |spec: serde_json::Value| {
            let d = deployment(&md(spec), &BuildConfig::default());
            let r = d.spec.strategy.unwrap().rolling_update.unwrap();
            (r.max_surge.unwrap(), r.max_unavailable.unwrap())
        };
        let int = IntOrString::Int;
        let uri = json!({"uri": "s3://models/m.onnx"});
        assert_eq!(bounds(json!({"model": uri})), (int(1), int(0)));
        assert_eq!(
            bounds(json!({"model": uri, "accelerator": "cuda"})),
            (int(0), int(1))
        );
        assert_eq!(
            bounds(json!({"model": uri, "accelerator": "auto", "gpu": {"count": 2}})),
            (int(0), int(1))
        );
        assert_eq!(
            bounds(
                json!({"model": uri, "accelerator": "cuda", "rollout": {"maxSurge": "25%", "maxUnavailable": 0}})
            ),
            (IntOrString::String("25%".into()), int(0))
        );
        assert_eq!(
            bounds(json!({"model": uri, "rollout": {"maxSurge": "2", "maxUnavailable": "10%"}})),
            (int(2), IntOrString::String("10%".into()))
        );
        // maxUnavailable 0 on a GPU model with maxSurge left out: surge one rather than deadlock.
        assert_eq!(
            bounds(json!({"model": uri, "accelerator": "cuda", "rollout": {"maxUnavailable": 0}})),
            (int(1), int(0))
        );
        // "00%" is zero as well: the same, not a Deployment that can never roll.
        assert_eq!(
            bounds(json!({"model": uri, "accelerator": "cuda", "rollout": {"maxUnavailable": "00%"}})),
            (int(1), IntOrString::String("00%".into()))
        );
        // maxSurge 0 on a CPU model (no room for a surge pod): the defaulted bound gives way,
        // replacing in place, not the one the user set.
        assert_eq!(
            bounds(json!({"model": uri, "rollout": {"maxSurge": 0}})),
            (int(0), int(1))
        );
    }

    #[test]
    fn a_startup_budget_past_the_schema_cap_does_not_overflow() {
        let m = md(json!({"model": {"uri": "s3://models/m.onnx"}, "startupTimeoutSeconds": i32::MAX}));
        let d = deployment(&m, &BuildConfig::default());
        let probe = pod(&d).containers[0].startup_probe.clone().unwrap();
        assert_eq!(probe.failure_threshold, Some(i32::MAX / PROBE_PERIOD));
    }

    #[test]
    fn the_pod_template_carries_the_hash_of_the_rest_of_it() {
        let hash = |spec: serde_json::Value| {
            let d = deployment(&md(spec), &BuildConfig::default());
            let meta = d.spec.template.metadata.clone().unwrap();
            let h = meta.annotations.unwrap()[labels::TEMPLATE_HASH].clone();
            let mut without = d.spec.template.clone();
            without
                .metadata
                .as_mut()
                .unwrap()
                .annotations
                .as_mut()
                .unwrap()
                .remove(labels::TEMPLATE_HASH);
            assert_eq!(h, spec_hash(&without));
            h
        };
        let base = hash(json!({"model": {"uri": "s3://models/m.onnx"}, "replicas": 2}));
        assert_eq!(
            base,
            hash(json!({"model": {"uri": "s3://models/m.onnx"}, "replicas": 2}))
        );
        // Scaling keeps the template; a new model makes a new one.
        assert_eq!(
            base,
            hash(json!({"model": {"uri": "s3://models/m.onnx"}, "replicas": 5}))
        );
        assert_ne!(
            base,
            hash(json!({"model": {"uri": "s3://models/m2.onnx"}, "replicas": 2}))
        );
    }

    #[test]
    fn autoscaling_leaves_replicas_to_the_hpa() {
        let m = md(json!({"model": {"uri": "s3://models/m.onnx"}, "autoscaling": {"maxReplicas": 4}}));
        assert_eq!(deployment(&m, &BuildConfig::default()).spec.replicas, None);
    }

    #[test]
    fn the_server_plans_instances_and_threads_for_the_pods_cores() {
        let flag = |spec: serde_json::Value, name: &str| {
            let a = server_args(&md(spec), &BuildConfig::default());
            a.iter().position(|x| x == name).map(|i| a[i + 1].clone())
        };
        // Nothing said: the server chooses both, for the pod's cores (2500m rounds up to 3).
        let limited =
            json!({"model": {"uri": "s3://models/m.onnx"}, "resources": {"limits": {"cpu": "2500m"}}});
        assert_eq!(flag(limited.clone(), "--instances").as_deref(), Some("0"));
        assert_eq!(flag(limited.clone(), "--intra-op-threads").as_deref(), Some("0"));
        assert_eq!(flag(limited, "--cpus").as_deref(), Some("3"));
        // A request without a limit still bounds the plan; neither leaves it to the server.
        let requested =
            json!({"model": {"uri": "s3://models/m.onnx"}, "resources": {"requests": {"cpu": "2"}}});
        assert_eq!(flag(requested, "--cpus").as_deref(), Some("2"));
        assert_eq!(
            flag(json!({"model": {"uri": "s3://models/m.onnx"}}), "--cpus"),
            None
        );
        // Nothing in the spec: a LimitRange may still give the pod a request (and no limit, so no
        // quota to read). The server learns it from the downward API.
        let env = |spec: serde_json::Value| {
            let d = deployment(&md(spec), &BuildConfig::default());
            let pod = d.spec.template.spec.unwrap();
            let server = pod
                .containers
                .into_iter()
                .find(|c| c.name == SERVER_CONTAINER)
                .unwrap();
            server
                .env
                .unwrap_or_default()
                .into_iter()
                .filter_map(|e| {
                    let f = e.value_from?.resource_field_ref?;
                    Some((e.name, f.resource, f.divisor.map(|q| q.0)))
                })
                .collect::<Vec<_>>()
        };
        assert_eq!(
            env(json!({"model": {"uri": "s3://models/m.onnx"}})),
            vec![(
                "KUBEMAAS_CPU_REQUEST_MILLIS".into(),
                "requests.cpu".into(),
                Some("1m".into())
            ),]
        );
        assert!(
            env(json!({"model": {"uri": "s3://models/m.onnx"}, "resources": {"requests": {"cpu": "2"}}}))
                .is_empty()
        );
        // More cores than the server plans for: capped, not a flag that stops it from starting.
        let huge = json!({"model": {"uri": "s3://models/m.onnx"}, "resources": {"limits": {"cpu": "5000"}}});
        assert_eq!(flag(huge, "--cpus").as_deref(), Some("4096"));
        // What the spec says is passed as it is.
        let given = json!({"model": {"uri": "s3://models/m.onnx"}, "runtime": {"instances": 4, "intraOpThreads": 2},
                           "resources": {"limits": {"cpu": "8"}}});
        assert_eq!(flag(given.clone(), "--instances").as_deref(), Some("4"));
        assert_eq!(flag(given, "--intra-op-threads").as_deref(), Some("2"));
    }

    #[test]
    fn pod_template_overrides_merge_on_top() {
        let m = md(
            json!({"model": {"uri": "pvc://models/resnet/model.onnx"}, "accelerator": "cuda",
            "podTemplate": {"nodeSelector": {"zone": "a"}, "tolerations": [{"key": "dedicated", "operator": "Exists"}],
                            "runtimeClassName": "nvidia", "priorityClassName": "high", "labels": {"team": "ml", "kubemaas.io/model-deployment": "evil"},
                            "annotations": {"a": "b"}, "env": [{"name": "X", "value": "1"}], "serviceAccountName": "sa",
                            "imagePullSecrets": [{"name": "registry"}],
                            "affinity": {"podAntiAffinity": {"preferredDuringSchedulingIgnoredDuringExecution": [
                                {"weight": 100, "podAffinityTerm": {"topologyKey": "kubernetes.io/hostname",
                                    "labelSelector": {"matchLabels": {"team": "ml"}}}}]}}}}),
        );
        let d = deployment(&m, &BuildConfig::default());
        let p = pod(&d);
        assert_eq!(p.node_selector.as_ref().unwrap()["zone"], "a");
        assert_eq!(p.priority_class_name.as_deref(), Some("high"));
        assert_eq!(p.image_pull_secrets.as_ref().unwrap()[0].name, "registry");
        let anti = p.affinity.as_ref().unwrap().pod_anti_affinity.as_ref().unwrap();
        let term = &anti
            .preferred_during_scheduling_ignored_during_execution
            .as_ref()
            .unwrap()[0];
        assert_eq!(
            (term.weight, term.pod_affinity_term.topology_key.as_str()),
            (100, "kubernetes.io/hostname")
        );
        assert_eq!(p.tolerations.as_ref().unwrap().len(), 2);
        assert_eq!(p.runtime_class_name.as_deref(), Some("nvidia"));
        assert_eq!(p.service_account_name.as_deref(), Some("sa"));
        let meta = d.spec.template.metadata.as_ref().unwrap();
        assert_eq!(meta.labels.as_ref().unwrap()["team"], "ml");
        assert_eq!(
            meta.labels.as_ref().unwrap()["kubemaas.io/model-deployment"],
            "resnet"
        );
        assert_eq!(meta.annotations.as_ref().unwrap()["prometheus.io/port"], "9090");
        assert_eq!(p.containers[0].env.as_ref().unwrap()[0].name, "X");
        let pvc = p
            .volumes
            .as_ref()
            .unwrap()
            .iter()
            .find(|v| v.name == "source")
            .unwrap();
        assert_eq!(pvc.persistent_volume_claim.as_ref().unwrap().claim_name, "models");
    }

    #[test]
    fn spec_image_replaces_the_server_image_in_both_containers_and_empty_means_the_default() {
        let images = |spec: serde_json::Value| {
            let d = deployment(&md(spec), &BuildConfig::default());
            let p = pod(&d);
            (
                p.containers[0].image.clone().unwrap(),
                p.init_containers.as_ref().unwrap()[0].image.clone().unwrap(),
            )
        };
        let uri = json!({"uri": "s3://models/m.onnx"});
        let mine = "registry.example.com/kubemaas/server:custom".to_string();
        assert_eq!(images(json!({"model": uri, "image": mine})), (mine.clone(), mine));
        let default = BuildConfig::default().server_image;
        assert_eq!(
            images(json!({"model": uri, "image": ""})),
            (default.clone(), default.clone())
        );
        assert_eq!(images(json!({"model": uri})), (default.clone(), default));
        let cuda = BuildConfig::default().server_cuda_image;
        assert_eq!(
            images(json!({"model": uri, "accelerator": "cuda"})),
            (cuda.clone(), cuda)
        );
    }

    fn init(d: &Deployment) -> &Container {
        &pod(d).init_containers.as_ref().unwrap()[0]
    }

    #[test]
    fn batching_reaches_the_server_flags_and_is_off_without_it() {
        let a = server_args(
            &md(serde_json::json!({"model": {"uri": "s3://models/m.onnx"}})),
            &BuildConfig::default(),
        );
        assert!(!a.iter().any(|x| x == "--max-batch-size"), "{a:?}");
        let a = server_args(
            &md(serde_json::json!({"model": {"uri": "s3://models/m.onnx"},
                "runtime": {"batching": {"maxBatchSize": 16, "maxQueueDelayMicroseconds": 500, "maxQueueSize": 64}}})),
            &BuildConfig::default(),
        );
        assert!(has_flag(&a, "--max-batch-size", "16"), "{a:?}");
        assert!(has_flag(&a, "--max-queue-delay-us", "500"), "{a:?}");
        assert!(has_flag(&a, "--max-queue-size", "64"), "{a:?}");
        assert!(!a.iter().any(|x| x == "--preferred-batch-size"), "{a:?}");
        let a = server_args(
            &md(serde_json::json!({"model": {"uri": "s3://models/m.onnx"},
                "runtime": {"batching": {"maxBatchSize": 16, "preferredBatchSizes": [4, 8]}}})),
            &BuildConfig::default(),
        );
        assert!(has_flag(&a, "--preferred-batch-size", "4,8"), "{a:?}");
    }

    fn has_flag(args: &[String], flag: &str, value: &str) -> bool {
        args.windows(2).any(|w| w[0] == flag && w[1] == value)
    }

    #[test]
    fn a_directory_uri_is_pulled_into_the_version_directory_and_a_file_uri_into_model_onnx() {
        for (uri, dest) in [
            ("s3://models/embedder/2/", "/models/resnet/1"),
            ("gs://models/embedder/", "/models/resnet/1"),
            ("hf://org/repo", "/models/resnet/1"),
            ("hf://org/repo/onnx/@v2", "/models/resnet/1"),
            ("pvc://store/embedder/", "/models/resnet/1"),
            ("s3://models/embedder/model.onnx", "/models/resnet/1/model.onnx"),
            (
                "hf://org/repo/onnx/model.onnx@main",
                "/models/resnet/1/model.onnx",
            ),
            ("https://h.example.com/m.onnx", "/models/resnet/1/model.onnx"),
        ] {
            let d = deployment(&md(json!({"model": {"uri": uri}})), &BuildConfig::default());
            let args = init(&d).args.clone().unwrap();
            assert_eq!(&args[..3], ["pull", uri, dest], "{uri}");
        }
    }

    #[test]
    fn api_keys_are_mounted_only_in_the_server_container_as_a_directory_and_passed_as_a_flag() {
        let m = md(json!({"model": {"uri": "s3://b/m.onnx"},
                          "auth": {"apiKeysSecretRef": {"name": "callers", "key": "api-keys"}}}));
        let d = deployment(&m, &BuildConfig::default());
        let p = pod(&d);
        let vol = p
            .volumes
            .as_ref()
            .unwrap()
            .iter()
            .find(|v| v.name == "api-keys")
            .expect("an api-keys volume");
        let secret = vol.secret.as_ref().unwrap();
        assert_eq!(secret.secret_name.as_deref(), Some("callers"));
        let item = &secret.items.as_ref().unwrap()[0];
        assert_eq!((item.key.as_str(), item.path.as_str()), ("api-keys", "keys"));
        assert_eq!((secret.optional, secret.default_mode), (Some(false), Some(0o440)));
        let server = &p.containers[0];
        let mount = server
            .volume_mounts
            .as_ref()
            .unwrap()
            .iter()
            .find(|m| m.name == "api-keys")
            .expect("mounted in the server");
        // A directory mount (no subPath): Secret updates reach the file, so keys rotate in place.
        assert_eq!(
            (
                mount.mount_path.as_str(),
                mount.read_only,
                mount.sub_path.as_ref()
            ),
            (API_KEYS_MOUNT, Some(true), None)
        );
        assert!(has_flag(
            server.args.as_ref().unwrap(),
            "--api-keys-file",
            "/var/run/secrets/kubemaas/api-keys/keys"
        ));
        assert!(
            !init(&d)
                .volume_mounts
                .as_ref()
                .unwrap()
                .iter()
                .any(|m| m.name == "api-keys")
        );
        // Without spec.auth: no volume, no flag; the default entry name is `keys`.
        let open = deployment(
            &md(json!({"model": {"uri": "s3://b/m.onnx"}})),
            &BuildConfig::default(),
        );
        assert!(
            !pod(&open)
                .volumes
                .clone()
                .unwrap()
                .iter()
                .any(|v| v.name == "api-keys")
        );
        assert!(
            !pod(&open).containers[0]
                .args
                .clone()
                .unwrap()
                .contains(&"--api-keys-file".to_string())
        );
        let default_key =
            md(json!({"model": {"uri": "s3://b/m.onnx"}, "auth": {"apiKeysSecretRef": {"name": "c"}}}));
        let d = deployment(&default_key, &BuildConfig::default());
        let v = pod(&d)
            .volumes
            .clone()
            .unwrap()
            .into_iter()
            .find(|v| v.name == "api-keys")
            .unwrap();
        assert_eq!(v.secret.unwrap().items.unwrap()[0].key, "keys");
    }

    #[test]
    fn credentials_are_mounted_as_files_only_in_the_init_container_and_passed_as_credentials_dir() {
        let m =
            md(json!({"model": {"uri": "gs://models/m.onnx", "credentialsSecretRef": {"name": "gcs-key"}}}));
        let d = deployment(&m, &BuildConfig::default());
        let p = pod(&d);
        let vol = p
            .volumes
            .as_ref()
            .unwrap()
            .iter()
            .find(|v| {
                v.secret
                    .as_ref()
                    .is_some_and(|s| s.secret_name.as_deref() == Some("gcs-key"))
            })
            .expect("a Secret volume");
        let secret = vol.secret.as_ref().unwrap();
        assert_eq!((secret.optional, secret.default_mode), (Some(false), Some(0o440)));
        let pull = init(&d);
        let m = pull
            .volume_mounts
            .as_ref()
            .unwrap()
            .iter()
            .find(|m| m.name == vol.name)
            .expect("mounted in the init container");
        assert_eq!(
            (m.mount_path.as_str(), m.read_only),
            ("/var/run/secrets/kubemaas/credentials", Some(true))
        );
        assert!(has_flag(
            pull.args.as_ref().unwrap(),
            "--credentials-dir",
            "/var/run/secrets/kubemaas/credentials"
        ));
        assert_eq!(
            pull.env_from.as_ref().unwrap()[0]
                .secret_ref
                .as_ref()
                .unwrap()
                .name,
            "gcs-key",
            "env-style keys still reach the download"
        );
        let server = &p.containers[0];
        // The server's only environment is what the downward API says of its own CPU.
        assert!(server.env_from.is_none());
        assert!(server.env.iter().flatten().all(|e| {
            e.value.is_none()
                && e.value_from
                    .as_ref()
                    .is_some_and(|v| v.resource_field_ref.is_some() && v.secret_key_ref.is_none())
        }));
        assert!(
            !server
                .volume_mounts
                .as_ref()
                .unwrap()
                .iter()
                .any(|m| m.name == vol.name || m.mount_path.starts_with("/var/run/secrets")),
            "the serving container must never see the credentials"
        );
        let plain = deployment(
            &md(json!({"model": {"uri": "gs://models/m.onnx"}})),
            &BuildConfig::default(),
        );
        assert!(
            !init(&plain)
                .args
                .as_ref()
                .unwrap()
                .iter()
                .any(|a| a == "--credentials-dir")
        );
        assert!(
            !pod(&plain)
                .volumes
                .as_ref()
                .unwrap()
                .iter()
                .any(|v| v.secret.is_some())
        );
    }

    #[test]
    fn cache_claim_is_mounted_read_write_only_in_the_init_container_and_passed_as_cache_dir() {
        let m = md(
            json!({"model": {"uri": "s3://models/m.onnx", "sha256": "a".repeat(64),
            "cache": {"claimName": "model-cache"}}}),
        );
        let d = deployment(&m, &BuildConfig::default());
        let p = pod(&d);
        let vol = p
            .volumes
            .as_ref()
            .unwrap()
            .iter()
            .find(|v| {
                v.persistent_volume_claim
                    .as_ref()
                    .is_some_and(|c| c.claim_name == "model-cache")
            })
            .expect("the cache claim as a volume");
        assert_eq!(
            vol.persistent_volume_claim.as_ref().unwrap().read_only,
            Some(false)
        );
        let pull = init(&d);
        let mount = pull
            .volume_mounts
            .as_ref()
            .unwrap()
            .iter()
            .find(|m| m.name == vol.name)
            .unwrap();
        assert_eq!(
            (mount.mount_path.as_str(), mount.read_only),
            ("/cache", Some(false))
        );
        let args = pull.args.as_ref().unwrap();
        assert!(has_flag(args, "--cache-dir", "/cache"));
        assert!(has_flag(args, "--sha256", &"a".repeat(64)), "the cache key");
        assert!(
            !p.containers[0]
                .volume_mounts
                .as_ref()
                .unwrap()
                .iter()
                .any(|m| m.name == vol.name),
            "the server never writes the cache"
        );
    }

    #[test]
    fn compression_becomes_pull_flags_and_gives_the_download_the_servers_cpu_and_memory_not_its_gpu() {
        let m = md(json!({"model": {"uri": "s3://models/m.onnx",
            "compression": {"mode": "int8-dynamic", "minCosine": 0.995}},
            "accelerator": "cuda",
            "resources": {"requests": {"cpu": "2", "memory": "3Gi"},
                          "limits": {"cpu": "4", "memory": "6Gi", "nvidia.com/gpu": "1"}}}));
        let d = deployment(&m, &BuildConfig::default());
        let pull = init(&d);
        let args = pull.args.clone().unwrap();
        assert!(has_flag(&args, "--compress", "int8-dynamic"), "{args:?}");
        assert!(has_flag(&args, "--min-cosine", "0.995"), "{args:?}");
        let r = pull.resources.clone().unwrap();
        let limits = r.limits.unwrap();
        assert_eq!(limits["memory"].0, "6Gi", "the model is loaded twice");
        assert_eq!(limits["cpu"].0, "4");
        assert!(
            has_flag(&args, "--compress-threads", "4"),
            "the evaluation uses the limit's cores: {args:?}"
        );
        assert!(
            !limits.contains_key("nvidia.com/gpu"),
            "the evaluation runs on CPU"
        );
        assert_eq!(r.requests.unwrap()["memory"].0, "3Gi");
        // Past the 1024 threads pull takes, the evaluation gets 1024, not a refused flag.
        let big = md(json!({"model": {"uri": "s3://models/m.onnx",
            "compression": {"mode": "int8-dynamic"}}, "resources": {"limits": {"cpu": "2000"}}}));
        let args = init(&deployment(&big, &BuildConfig::default()))
            .args
            .clone()
            .unwrap();
        assert!(has_flag(&args, "--compress-threads", "1024"), "{args:?}");
        // Default minCosine, and no flags without the field.
        let m = md(
            json!({"model": {"uri": "s3://models/m.onnx", "compression": {"mode": "fp16",
            "inputShapes": {"x": [1, 3, 48, 320], "y": [2, 7]}}}}),
        );
        let args = init(&deployment(&m, &BuildConfig::default()))
            .args
            .clone()
            .unwrap();
        assert!(
            has_flag(&args, "--compress", "fp16") && has_flag(&args, "--min-cosine", "0.99"),
            "{args:?}"
        );
        assert!(has_flag(&args, "--input-shape", "x=1x3x48x320"), "{args:?}");
        assert!(has_flag(&args, "--input-shape", "y=2x7"), "{args:?}");
        let m = md(json!({"model": {"uri": "s3://models/m.onnx"}}));
        let d = deployment(&m, &BuildConfig::default());
        assert!(!init(&d).args.clone().unwrap().iter().any(|a| a == "--compress"));
        assert_eq!(
            init(&d).resources.clone().unwrap().limits.unwrap()["memory"].0,
            "256Mi"
        );
    }

    #[test]
    fn max_bytes_and_allow_private_addresses_become_pull_flags_only_when_set() {
        let m = md(
            json!({"model": {"uri": "http://127.0.0.5/m.onnx", "allowPrivateAddresses": true,
            "maxBytes": 5_000_000_000_i64}}),
        );
        let d = deployment(&m, &BuildConfig::default());
        let args = init(&d).args.clone().unwrap();
        assert!(args.iter().any(|a| a == "--allow-private-addresses"), "{args:?}");
        assert!(has_flag(&args, "--max-bytes", "5000000000"), "{args:?}");
        let d = deployment(
            &md(json!({"model": {"uri": "http://127.0.0.5/m.onnx"}})),
            &BuildConfig::default(),
        );
        let args = init(&d).args.clone().unwrap();
        for flag in [
            "--allow-private-addresses",
            "--max-bytes",
            "--cache-dir",
            "--credentials-dir",
        ] {
            assert!(
                !args.iter().any(|a| a == flag),
                "{flag} without its field: {args:?}"
            );
        }
    }

    #[test]
    fn init_container_is_sized_for_streaming_whatever_the_model_size() {
        let m =
            md(json!({"model": {"uri": "s3://models/big/"}, "resources": {"limits": {"memory": "64Gi"}}}));
        let d = deployment(&m, &BuildConfig::default());
        let r = init(&d).resources.clone().unwrap();
        let requests = r.requests.unwrap();
        assert_eq!(
            (requests["cpu"].0.as_str(), requests["memory"].0.as_str()),
            ("50m", "64Mi")
        );
        assert_eq!(r.limits.unwrap()["memory"].0, "256Mi");
        assert_eq!(init(&d).name, PULL_CONTAINER);
    }
}
