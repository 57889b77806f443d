//! `kubemaas-operator`: run the controller, print the CRDs, or render children without a cluster.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use anyhow::Context as _;
use clap::{Parser, Subcommand, ValueEnum};
use kubemaas_operator::controller::{self, Scope, build::BuildConfig};
use kubemaas_operator::{httpd, leader, metrics::Metrics, render};
use opentelemetry_sdk::trace::SdkTracerProvider;
use tracing_subscriber::EnvFilter;

/// KubeMaaS operator: reconciles ModelDeployments into serving pods with truthful status.
#[derive(Debug, Parser)]
#[command(name = "kubemaas-operator", version, about)]
struct Cli {
    /// Log format.
    #[arg(
        long,
        global = true,
        env = "KUBEMAAS_LOG_FORMAT",
        value_enum,
        default_value = "text"
    )]
    log_format: LogFormat,
    /// Log filter, e.g. `info` or `kubemaas_operator=debug,kube=info`. The default silences
    /// kube's per-request error line: every failure is logged once, with context, by the operator.
    #[arg(
        long,
        global = true,
        env = "KUBEMAAS_LOG",
        default_value = "info,kube_client::client::builder=off"
    )]
    log_level: String,
    #[command(subcommand)]
    command: Command,
}

#[derive(Debug, Clone, Copy, ValueEnum)]
enum LogFormat {
    /// Human-readable lines.
    Text,
    /// One JSON object per line.
    Json,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Run the controller against the cluster of the current kubeconfig (or in-cluster config).
    Run(RunArgs),
    /// Print the CustomResourceDefinitions as YAML.
    Crd,
    /// Print every object the operator would create for the ModelDeployments in a file.
    Render(RenderArgs),
}

#[derive(Debug, clap::Args)]
struct ImageArgs {
    /// Default server image for CPU pods (`[registry/]repository[:tag][@digest]`).
    #[arg(long, env = "KUBEMAAS_SERVER_IMAGE", default_value = "kubemaas/server:0.1.0", value_parser = image_reference)]
    server_image: String,
    /// Default server image for GPU pods.
    #[arg(
        long,
        env = "KUBEMAAS_SERVER_CUDA_IMAGE",
        default_value = "kubemaas/server-cuda:0.1.0",
        value_parser = image_reference
    )]
    server_cuda_image: String,
    /// Namespace whose pods (Prometheus) may reach the metrics port under a ModelDeployment's
    /// NetworkPolicy when its `networkPolicy.metricsFrom` is empty.
    #[arg(long, env = "KUBEMAAS_MONITORING_NAMESPACE", default_value = "monitoring")]
    monitoring_namespace: String,
    /// The operator's own namespace, let through to the serving pods' metrics port by
    /// NetworkPolicies (in a pod: $POD_NAMESPACE). Unset: the operator runs outside the cluster.
    #[arg(long, env = "POD_NAMESPACE")]
    operator_namespace: Option<String>,
}

impl ImageArgs {
    fn build_config(self) -> BuildConfig {
        let ImageArgs {
            server_image,
            server_cuda_image,
            monitoring_namespace,
            operator_namespace,
        } = self;
        BuildConfig {
            server_image,
            server_cuda_image,
            monitoring_namespace,
            operator_namespace,
            ..BuildConfig::default()
        }
    }
}

#[derive(Debug, clap::Args)]
struct RunArgs {
    #[command(flatten)]
    images: ImageArgs,
    /// Watch one namespace only (default: all namespaces).
    #[arg(long, env = "KUBEMAAS_WATCH_NAMESPACE")]
    watch_namespace: Option<String>,
    /// Address of /healthz, /readyz and /metrics (8090: the server's ports are 8080, 8081 and 9090,
    /// so both run side by side on one machine). `[::]` is every address, IPv4 and IPv6 (IPv4
    /// alone where the host has no IPv6); `0.0.0.0` is IPv4 only.
    #[arg(long, env = "KUBEMAAS_METRICS_ADDR", default_value = "[::]:8090")]
    metrics_addr: SocketAddr,
    /// Elect one active replica through a Lease (disable only when running a single replica).
    #[arg(long, env = "KUBEMAAS_LEADER_ELECT", default_value_t = true, action = clap::ArgAction::Set)]
    leader_elect: bool,
    /// Namespace of the leader Lease (default: $POD_NAMESPACE, else `default`).
    #[arg(long, env = "KUBEMAAS_LEADER_ELECTION_NAMESPACE")]
    leader_election_namespace: Option<String>,
    /// Name of the leader Lease.
    #[arg(
        long,
        env = "KUBEMAAS_LEADER_ELECTION_NAME",
        default_value = "kubemaas-operator"
    )]
    leader_election_name: String,
    /// Seconds a leader Lease stays valid without renewal. The leader stops acting when it has not
    /// renewed within 2/3 of it; a standby takes over once it has seen no renewal for all of it.
    #[arg(long, env = "KUBEMAAS_LEASE_DURATION", default_value_t = 15)]
    lease_duration_seconds: u64,
    /// Seconds between periodic resyncs of every ModelDeployment (changes are reacted to at once
    /// anyway; a resync of an unchanged object sends no write).
    #[arg(long, env = "KUBEMAAS_RESYNC_SECONDS", default_value_t = 300)]
    resync_seconds: u64,
    /// ModelDeployments reconciled at once. Each in-flight reconcile holds an apiserver connection:
    /// unbounded, 1,000 new objects opened ~900 connections and overloaded a small apiserver.
    #[arg(long, env = "KUBEMAAS_MAX_CONCURRENT_RECONCILES", default_value_t = 16, value_parser = clap::value_parser!(u16).range(1..))]
    max_concurrent_reconciles: u16,
    /// Seconds between scrapes of the ready serving pods' `/metrics` (port 9090), which feed
    /// `status.metrics` and the request-driven autoscaler.
    #[arg(long, env = "KUBEMAAS_METRICS_INTERVAL", default_value_t = 15.0, value_parser = positive_seconds)]
    metrics_interval: f64,
}

/// An image reference the kubelet can pull, by the rule the CRD applies to `spec.image`: every
/// pod would otherwise sit in InvalidImageName.
fn image_reference(s: &str) -> Result<String, String> {
    let rule = regex::Regex::new(kubemaas_crds::v1alpha1::IMAGE_REFERENCE).map_err(|e| e.to_string())?;
    if rule.is_match(s) {
        Ok(s.to_string())
    } else {
        Err(
            "not an image reference ([registry/]repository[:tag][@digest], the repository in lower case, \
             no spaces), e.g. registry.example.com/kubemaas/server:0.1.0"
                .into(),
        )
    }
}

/// A number of seconds greater than zero (fractions allowed).
fn positive_seconds(s: &str) -> Result<f64, String> {
    match s.parse::<f64>() {
        Ok(v) if v > 0.0 && v.is_finite() && v <= 86_400.0 => Ok(v),
        _ => Err(format!(
            "{s:?} is not a number of seconds between 0 and 86400 (e.g. 15 or 0.5)"
        )),
    }
}

#[derive(Debug, clap::Args)]
struct RenderArgs {
    /// File with one or more ModelDeployments (`-` for standard input).
    #[arg(short = 'f', long = "filename")]
    file: PathBuf,
    #[command(flatten)]
    images: ImageArgs,
}

/// Logs to stderr, plus spans to an OTLP collector when `OTEL_EXPORTER_OTLP_ENDPOINT` (or
/// `OTEL_EXPORTER_OTLP_TRACES_ENDPOINT`) is set; the protocol follows `OTEL_EXPORTER_OTLP_PROTOCOL`
/// (`http/protobuf` by default, or `grpc`).
fn init_telemetry(format: LogFormat, level: &str) -> anyhow::Result<Option<SdkTracerProvider>> {
    use tracing_subscriber::Layer as _;
    use tracing_subscriber::layer::SubscriberExt as _;
    use tracing_subscriber::util::SubscriberInitExt as _;
    let filter = EnvFilter::try_new(level).with_context(|| format!("invalid --log-level {level:?}"))?;
    // Colour only on a terminal: pod logs are files, where escape codes are noise.
    let fmt = tracing_subscriber::fmt::layer()
        .with_writer(std::io::stderr)
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()));
    let fmt = match format {
        LogFormat::Json => fmt.json().flatten_event(true).boxed(),
        LogFormat::Text => fmt.boxed(),
    };
    let wants_otlp = [
        "OTEL_EXPORTER_OTLP_ENDPOINT",
        "OTEL_EXPORTER_OTLP_TRACES_ENDPOINT",
    ]
    .iter()
    .any(|k| std::env::var_os(k).is_some_and(|v| !v.is_empty()));
    let provider = if wants_otlp {
        let exporter = opentelemetry_otlp::SpanExporter::builder()
            .build()
            .context("failed to configure the OTLP exporter from OTEL_EXPORTER_OTLP_*")?;
        let resource = opentelemetry_sdk::Resource::builder()
            .with_service_name("kubemaas-operator")
            .build();
        Some(
            SdkTracerProvider::builder()
                .with_batch_exporter(exporter)
                .with_resource(resource)
                .build(),
        )
    } else {
        None
    };
    let otel = provider.as_ref().map(|p| {
        use opentelemetry::trace::TracerProvider as _;
        tracing_opentelemetry::layer().with_tracer(p.tracer("kubemaas-operator"))
    });
    tracing_subscriber::registry()
        .with(filter)
        .with(fmt)
        .with(otel)
        .try_init()
        .context("failed to install the log subscriber")?;
    Ok(provider)
}

fn main() -> std::process::ExitCode {
    match run_cli() {
        Ok(()) => std::process::ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("{}", kubemaas_crds::report::error_report(e.as_ref()));
            std::process::ExitCode::FAILURE
        }
    }
}

fn run_cli() -> anyhow::Result<()> {
    let Cli {
        log_format,
        log_level,
        command,
    } = Cli::parse();
    // rustls' process-wide provider, for clients that do not pick one (reqwest in the OTLP
    // exporter panics without it when the workspace builds reqwest with `rustls-no-provider`, as
    // the server's pull does). Ring, as the kube client uses. Fails only if one is already set.
    let _ = rustls::crypto::ring::default_provider().install_default();
    // The gRPC OTLP exporter (tonic) is bound to the Tokio runtime current when it is built, and
    // exports through it until the provider shuts down: the runtime comes first and outlives it.
    let runtime = tokio::runtime::Builder::new_multi_thread().enable_all().build()?;
    let provider = {
        let _inside = runtime.enter();
        init_telemetry(log_format, &log_level)?
    };
    let result = dispatch(command, &runtime);
    if let Some(p) = provider {
        // Flush buffered spans before exiting.
        let _ = p.shutdown();
    }
    result
}

fn dispatch(command: Command, runtime: &tokio::runtime::Runtime) -> anyhow::Result<()> {
    match command {
        Command::Crd => print!("{}", kubemaas_crds::crds_yaml()?),
        Command::Render(RenderArgs { file, images }) => {
            let input = if file.as_os_str() == "-" {
                std::io::read_to_string(std::io::stdin())?
            } else {
                std::fs::read_to_string(&file)
                    .with_context(|| format!("failed to read {}", file.display()))?
            };
            print!(
                "{}",
                render::render(&input, &file.display().to_string(), &images.build_config())?
            );
        }
        Command::Run(args) => runtime.block_on(run(args))?,
    }
    Ok(())
}

async fn run(args: RunArgs) -> anyhow::Result<()> {
    let RunArgs {
        images,
        watch_namespace,
        metrics_addr,
        leader_elect,
        leader_election_namespace,
        leader_election_name,
        lease_duration_seconds,
        resync_seconds,
        max_concurrent_reconciles,
        metrics_interval,
    } = args;
    let client = client().await?;
    let metrics = Arc::new(Metrics::default());
    let health = Arc::new(httpd::Health {
        metrics: metrics.clone(),
        ready: false.into(),
    });
    let bound = httpd::serve(metrics_addr, health.clone())
        .await
        .with_context(|| format!("failed to listen on {metrics_addr}"))?;
    tracing::info!(metrics = %bound, "operator listening");
    let identity = std::env::var("POD_NAME").unwrap_or_else(|_| {
        format!(
            "{}-{}",
            std::env::var("HOSTNAME").unwrap_or_else(|_| "kubemaas-operator".into()),
            std::process::id()
        )
    });
    let lease = leader::LeaseConfig::new(
        leader_election_namespace
            .or_else(|| std::env::var("POD_NAMESPACE").ok())
            .unwrap_or_else(|| "default".into()),
        leader_election_name,
        identity.clone(),
        Duration::from_secs(lease_duration_seconds),
    );
    // The lease gets a client (a connection) of its own, as client-go's leader election does: a
    // renewal must not queue behind a thousand reconciles' requests.
    let (lease_client, url) = client_for_lease().await?;
    // Ready means the apiserver answers (leader or standby alike: a standby is ready to take over).
    tokio::spawn(httpd::probe_apiserver(lease_client.clone(), url, health.clone()));
    let mut elector = leader::Elector::new(lease_client, lease);
    let mut renewed = tokio::time::Instant::now();
    if leader_elect {
        let l = elector.config();
        tracing::info!(identity = %identity, lease = %l.name, namespace = %l.namespace, "waiting for leadership");
        tokio::select! {
            t = elector.acquire() => renewed = t,
            _ = shutdown_signal() => return Ok(()),
        }
        tracing::info!(identity = %identity, "became leader");
    }
    metrics.set_leader(true);
    tokio::select! {
        _ = kubemaas_operator::controller::wait_for_crd(&client, watch_namespace.as_deref()) => {}
        _ = shutdown_signal() => return Ok(()),
    }
    let scope = Scope {
        namespace: watch_namespace,
    };
    let (stop_tx, stop_rx) = tokio::sync::oneshot::channel::<()>();
    let resync = Duration::from_secs(resync_seconds.max(1));
    let mut controller = tokio::spawn(controller::run(
        client.clone(),
        scope,
        images.build_config(),
        metrics.clone(),
        controller::Tuning {
            resync,
            concurrency: max_concurrent_reconciles,
            metrics_interval: Duration::from_secs_f64(metrics_interval),
        },
        async move {
            let _ = stop_rx.await;
        },
    ));
    let outcome = {
        let lost = async {
            if leader_elect {
                elector.hold(renewed).await;
            } else {
                std::future::pending::<()>().await;
            }
        };
        tokio::select! {
            _ = lost => Outcome::LostLease,
            _ = shutdown_signal() => Outcome::Shutdown,
            ended = &mut controller => Outcome::ControllerEnded(ended),
        }
    };
    metrics.set_leader(false);
    match outcome {
        Outcome::LostLease => {
            // Another replica may act any moment now: stop at once, and be sure nothing of ours
            // still runs before the process goes.
            controller.abort();
            let _ = controller.await;
            anyhow::bail!("lost the leader lease; exiting so a fresh process can rejoin the election");
        }
        Outcome::ControllerEnded(ended) => {
            // Nothing reconciles any more: hand the lease over and exit non-zero, so a standby (or
            // the restarted container) takes over instead of a leader that does nothing.
            if leader_elect {
                let _ = elector.release(elector.config().retry).await;
            }
            match ended {
                Err(e) if e.is_panic() => anyhow::bail!("the controller panicked; exiting"),
                Err(e) => anyhow::bail!("the controller task failed: {e}"),
                Ok(()) => anyhow::bail!("the controller stopped unexpectedly; exiting"),
            }
        }
        Outcome::Shutdown => {
            let _ = stop_tx.send(());
            // In-flight reconciles get a bounded time to finish; shutdown must not hang on them.
            if tokio::time::timeout(Duration::from_secs(10), &mut controller)
                .await
                .is_err()
            {
                tracing::warn!("controller did not stop within 10s; aborting it");
                controller.abort();
                let _ = controller.await;
            }
            if leader_elect {
                // Hand over at once instead of making the standby wait for the lease to expire;
                // the controller is gone, so two leaders cannot overlap.
                if let Err(e) = elector.release(elector.config().renew_deadline).await {
                    tracing::warn!(error = %e, "failed to release the leader lease");
                }
            }
        }
    }
    tracing::info!("stopped");
    Ok(())
}

/// A second client, with its own connection pool, for the leader lease (never fault-injected),
/// and the apiserver's URL.
async fn client_for_lease() -> anyhow::Result<(kube::Client, String)> {
    client_with(false).await
}

/// The controller's client.
async fn client() -> anyhow::Result<kube::Client> {
    Ok(client_with(true).await?.0)
}

/// kube's client stack for the kubeconfig or the in-cluster config. Debug builds inject faults
/// when `inject` and `KUBEMAAS_E2E_FAULTS` is set (the e2e suite's fault test); release builds
/// never read it.
async fn client_with(inject: bool) -> anyhow::Result<(kube::Client, String)> {
    let config = kube::Config::infer()
        .await
        .context("failed to load a kubeconfig or the in-cluster config")?;
    let url = config.cluster_url.to_string();
    let base =
        kube::client::ClientBuilder::try_from(config).context("failed to build the Kubernetes client")?;
    #[cfg(debug_assertions)]
    if let (true, Ok(plan)) = (inject, std::env::var("KUBEMAAS_E2E_FAULTS")) {
        let plan: kubemaas_operator::faults::FaultPlan = plan.parse()?;
        tracing::warn!(
            ?plan,
            "injecting faults into apiserver requests (KUBEMAAS_E2E_FAULTS)"
        );
        return Ok((
            base.with_layer(&kubemaas_operator::faults::FaultLayer::new(plan))
                .with_layer(&user_agent())
                .build(),
            url,
        ));
    }
    #[cfg(not(debug_assertions))]
    let _ = inject;
    Ok((base.with_layer(&user_agent()).build(), url))
}

/// Identifies the operator (audit logs, apiserver metrics) as kubemaas-operator.
fn user_agent() -> tower::util::MapRequestLayer<
    impl Fn(http::Request<kube::client::Body>) -> http::Request<kube::client::Body> + Clone,
> {
    let agent = http::HeaderValue::from_static(concat!("kubemaas-operator/", env!("CARGO_PKG_VERSION")));
    tower::util::MapRequestLayer::new(move |mut req: http::Request<kube::client::Body>| {
        req.headers_mut().insert(http::header::USER_AGENT, agent.clone());
        req
    })
}

/// Why the leader stopped.
enum Outcome {
    /// The lease was lost or could not be renewed in time.
    LostLease,
    /// SIGTERM or Ctrl-C.
    Shutdown,
    /// The controller task ended on its own (a panic in a reconcile).
    ControllerEnded(Result<(), tokio::task::JoinError>),
}

async fn shutdown_signal() {
    use tokio::signal::unix::{SignalKind, signal};
    match (signal(SignalKind::terminate()), signal(SignalKind::interrupt())) {
        (Ok(mut t), Ok(mut i)) => {
            tokio::select! { _ = t.recv() => {}, _ = i.recv() => {} }
        }
        _ => {
            let _ = tokio::signal::ctrl_c().await;
        }
    }
}
