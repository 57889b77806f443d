//! `kubemaas-server`: the KubeMaaS inference server binary.

use clap::{Parser, Subcommand, ValueEnum};
use tracing_subscriber::EnvFilter;

// Request bodies, tensors and answers of a MiB or more are allocated and freed on every request.
// glibc's malloc maps such blocks fresh from the kernel and unmaps them on free, so each request
// page-faulted its buffers in again (the largest kernel cost when serving 1 MiB tensors); mimalloc
// reuses freed memory.
#[global_allocator]
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;

/// KubeMaaS inference server: ONNX models behind KServe V2 / Triton (REST and gRPC) and TF-Serving REST.
#[derive(Debug, Parser)]
#[command(name = "kubemaas-server", version, about, long_about = None)]
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

    /// Log filter, e.g. `info` or `kubemaas_server=debug,ort=warn`.
    #[arg(long, global = true, env = "KUBEMAAS_LOG", default_value = "info,ort=warn")]
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
    /// Serve models over HTTP and gRPC until SIGTERM.
    Serve(kubemaas_server::serve::ServeArgs),
    /// Download a model artifact (s3, gs, http(s), hf, pvc), verify it and place it atomically (the
    /// init container of a serving pod). Exit codes: 2 download failed, 3 checksum mismatch,
    /// 5 not found, 6 access denied, 7 too large, 8 address refused, 9 compression rejected,
    /// 10 compression failed (9 and 10 with --compress).
    Pull(kubemaas_server::pull::PullArgs),
    /// Compress an ONNX model (int8-dynamic, fp16 or prune) and measure the result against the
    /// original: size, per-output agreement on evaluation inputs, latency. The report (JSON) goes
    /// to stdout. Exit codes: 9 --check rejected the result (nothing written), 1 other errors.
    Compress(kubemaas_server::compress::CompressArgs),
}

fn main() -> std::process::ExitCode {
    match run() {
        Ok(code) => code,
        Err(e) => {
            eprintln!("{}", kubemaas_crds::report::error_report(e.as_ref()));
            std::process::ExitCode::FAILURE
        }
    }
}

fn run() -> anyhow::Result<std::process::ExitCode> {
    let Cli {
        log_format,
        log_level,
        command,
    } = Cli::parse();
    if let Command::Serve(args) = &command
        && let Err(message) = args.check()
    {
        // As clap reports a value it refuses: a usage error, exit 2.
        <Cli as clap::CommandFactory>::command()
            .error(clap::error::ErrorKind::ValueValidation, message)
            .exit();
    }
    let filter = EnvFilter::try_new(&log_level)
        .map_err(|e| anyhow::anyhow!("invalid --log-level {log_level:?}: {e}"))?;
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        // Colour only on a terminal: pod logs are files, where escape codes are noise.
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()));
    match log_format {
        LogFormat::Json => builder.json().flatten_event(true).init(),
        LogFormat::Text => builder.init(),
    }
    if let Command::Compress(args) = &command {
        // No async work: ONNX Runtime and the passes run on this thread.
        return match kubemaas_server::compress::run(args) {
            Ok(_) => Ok(std::process::ExitCode::SUCCESS),
            Err(e) => {
                eprintln!("error: {e}");
                let code = match e {
                    kubemaas_server::compress::CompressError::Rejected(_) => {
                        kubemaas_crds::artifact::exit::COMPRESSION_REJECTED
                    }
                    _ => 1,
                };
                Ok(std::process::ExitCode::from(code))
            }
        };
    }
    let mut runtime = tokio::runtime::Builder::new_multi_thread();
    if let Command::Serve(args) = &command {
        runtime.worker_threads(kubemaas_server::serve::io_threads(args.io_threads, args.cpus));
    }
    let runtime = runtime.enable_all().build()?;
    match command {
        Command::Serve(args) => match runtime.block_on(kubemaas_server::serve::run(args))? {
            kubemaas_server::serve::Stopped::Clean => {}
            // A model still loading runs on a blocking thread ONNX Runtime cannot interrupt:
            // dropping the runtime would wait for it (tens of seconds for a large model), and a
            // normal exit runs ONNX Runtime's static destructors under that thread (it crashed
            // with SIGSEGV). Nothing is served yet and requests are drained: end the process
            // without atexit handlers (`_exit`, wrapped by signal-hook).
            kubemaas_server::serve::Stopped::WhileLoading => signal_hook::low_level::exit(0),
        },
        Command::Compress(_) => {}
        Command::Pull(args) => match runtime.block_on(kubemaas_server::pull::pull(&args)) {
            Ok(record) => println!("{}", serde_json::to_string(&record)?),
            Err(e) => {
                eprintln!("error: {e}");
                return Ok(std::process::ExitCode::from(e.exit_code()));
            }
        },
    }
    Ok(std::process::ExitCode::SUCCESS)
}
