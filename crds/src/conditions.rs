//! Condition types and reasons written to `ModelDeployment.status.conditions`, defined once.
//!
//! Types follow the Kubernetes convention (`status` True/False/Unknown, PascalCase reasons) so that
//! `kubectl wait --for=condition=Ready`, Flux's kstatus and Argo CD health checks work unchanged.

/// Pods are bound to nodes (False carries the scheduler's message).
pub const SCHEDULED: &str = "Scheduled";
/// The model was downloaded, verified and loaded in the serving pods.
pub const MODEL_LOADED: &str = "ModelLoaded";
/// Enough pods are ready and the latest generation is rolled out.
pub const READY: &str = "Ready";
/// Something is wrong with running pods (crash loop, OOM, image pull).
pub const DEGRADED: &str = "Degraded";

/// Every condition type, in the order they are reported.
pub const ALL: [&str; 4] = [SCHEDULED, MODEL_LOADED, READY, DEGRADED];

/// Reasons, PascalCase.
pub mod reason {
    /// All pods are bound.
    pub const ALL_PODS_SCHEDULED: &str = "AllPodsScheduled";
    /// The scheduler could not place a pod.
    pub const UNSCHEDULABLE: &str = "Unschedulable";
    /// No pods exist yet.
    pub const NO_PODS: &str = "NoPods";
    /// Pods are being created or started.
    pub const PENDING: &str = "Pending";
    /// The model is loaded in every ready pod.
    pub const LOADED: &str = "Loaded";
    /// The download init container is still running.
    pub const DOWNLOADING: &str = "Downloading";
    /// The download failed.
    pub const DOWNLOAD_FAILED: &str = "DownloadFailed";
    /// The artifact's sha256 did not match.
    pub const CHECKSUM_MISMATCH: &str = "ChecksumMismatch";
    /// The store refused the credentials (or has no such bucket/repository for them).
    pub const ACCESS_DENIED: &str = "AccessDenied";
    /// The object, prefix, repository or file does not exist.
    pub const ARTIFACT_NOT_FOUND: &str = "ArtifactNotFound";
    /// The artifact is larger than the download limit.
    pub const ARTIFACT_TOO_LARGE: &str = "ArtifactTooLarge";
    /// The artifact's host resolves or redirects to a refused address (e.g. cloud metadata).
    pub const ADDRESS_REFUSED: &str = "AddressRefused";
    /// The compressed model agreed with the original less than `compression.minCosine`.
    pub const COMPRESSION_REJECTED: &str = "CompressionRejected";
    /// The model could not be compressed (unsupported model or operator).
    pub const COMPRESSION_FAILED: &str = "CompressionFailed";
    /// The server could not load the model.
    pub const LOAD_FAILED: &str = "LoadFailed";
    /// The startup budget ran out.
    pub const STARTUP_TIMEOUT: &str = "StartupTimeout";
    /// The server exited with an error before it was ready (e.g. an unreadable TLS certificate);
    /// the message carries its exit code and last words.
    pub const SERVER_EXITED: &str = "ServerExited";
    /// The kubelet restarted a server after its models had loaded (most likely its liveness
    /// probe failed: the server stopped answering).
    pub const SERVER_RESTARTED: &str = "ServerRestarted";
    /// The model is loading in the server.
    pub const LOADING: &str = "Loading";
    /// Ready replicas meet the minimum.
    pub const MINIMUM_REPLICAS_AVAILABLE: &str = "MinimumReplicasAvailable";
    /// Fewer ready replicas than needed.
    pub const INSUFFICIENT_REPLICAS: &str = "InsufficientReplicas";
    /// A new generation is still rolling out.
    pub const ROLLOUT_IN_PROGRESS: &str = "RolloutInProgress";
    /// Zero replicas are asked for (`kubectl scale --replicas=0`): nothing serves, by choice.
    pub const SCALED_TO_ZERO: &str = "ScaledToZero";
    /// A rollout cannot progress (a new pod cannot be scheduled, or the Deployment's progress
    /// deadline passed); the message carries the scheduler's or the Deployment's words.
    pub const ROLLOUT_STUCK: &str = "RolloutStuck";
    /// Nothing wrong.
    pub const HEALTHY: &str = "Healthy";
    /// A container restarts repeatedly.
    pub const CRASH_LOOP_BACK_OFF: &str = "CrashLoopBackOff";
    /// The kubelet cannot create or start a container (a missing Secret or ConfigMap key, a bad
    /// command); the message carries the kubelet's reason and words.
    pub const CONTAINER_NOT_CREATED: &str = "ContainerNotCreated";
    /// The kubelet cannot mount a volume of the pod (a missing Secret or key), so no container
    /// starts; the message carries the kubelet's `FailedMount` Event.
    pub const VOLUME_MOUNT_FAILED: &str = "VolumeMountFailed";
    /// The Deployment cannot create pods (`ReplicaFailure`: a ServiceAccount or PriorityClass that
    /// does not exist, a ResourceQuota or LimitRange refusing them); the message carries the
    /// apiserver's words.
    pub const PODS_NOT_CREATED: &str = "PodsNotCreated";
    /// A container was killed for exceeding its memory limit.
    pub const OOM_KILLED: &str = "OOMKilled";
    /// A `cuda` ModelDeployment's pod serves on the CPU provider (the server could not use CUDA).
    pub const ACCELERATOR_FALLBACK: &str = "AcceleratorFallback";
    /// The image cannot be pulled.
    pub const IMAGE_PULL_BACK_OFF: &str = "ImagePullBackOff";
    /// The spec is invalid in a way the schema cannot express.
    pub const INVALID_SPEC: &str = "InvalidSpec";
    /// The operator could not apply the children.
    pub const RECONCILE_FAILED: &str = "ReconcileFailed";
    /// The apiserver refused a child (quota, admission, RBAC); the message carries its words.
    pub const APPLY_FAILED: &str = "ApplyFailed";
}
