//! `kubemaas-podrunner`: real `kubemaas-server` processes behind the fake pods of the local
//! control plane (`make demo`). For every running pod of a ModelDeployment in `--namespace` it
//! runs the pod's init container and server container on this machine, bound to the pod's
//! loopback IP, until the pod goes away. With `--file-store DIR` it also serves DIR over HTTP on
//! 127.0.0.1 for model URIs, and prints `FILE_STORE=<url>` first.

#![allow(clippy::expect_used, clippy::unwrap_used)] // a development tool: a panic ends it with its reason

use std::path::PathBuf;
use std::time::Duration;

use kube::Client;
use kubemaas_e2e::podrunner::{PodRunner, RunnerConfig, file_store};

fn usage() -> ! {
    eprintln!(
        "usage: kubemaas-podrunner --namespace NS --server PATH --work DIR [--file-store DIR] [--pvc-root DIR]\n\
         Runs real servers for the ModelDeployment pods of NS (kwok's pods run on paper only).\n\
         --namespace NS      namespace whose pods to run\n\
         --server PATH       the kubemaas-server binary\n\
         --work DIR          one directory per pod (pulled model, logs)\n\
         --file-store DIR    also serve DIR over HTTP on 127.0.0.1 and print FILE_STORE=<url>\n\
         --pvc-root DIR      where pvc://CLAIM/PATH resolves: DIR/CLAIM/PATH (default WORK/pvc)"
    );
    std::process::exit(2)
}

#[tokio::main]
async fn main() {
    let mut args = std::env::args().skip(1);
    let (mut ns, mut server, mut work, mut store, mut pvc_root) = (None, None, None, None, None);
    while let Some(a) = args.next() {
        let mut value = || args.next().unwrap_or_else(|| usage());
        match a.as_str() {
            "--namespace" => ns = Some(value()),
            "--server" => server = Some(PathBuf::from(value())),
            "--work" => work = Some(PathBuf::from(value())),
            "--file-store" => store = Some(PathBuf::from(value())),
            "--pvc-root" => pvc_root = Some(PathBuf::from(value())),
            _ => usage(),
        }
    }
    let (Some(ns), Some(server), Some(work)) = (ns, server, work) else {
        usage()
    };
    if let Some(dir) = store {
        println!("FILE_STORE={}", file_store(dir));
    }
    let client = match Client::try_default().await {
        Ok(c) => c,
        Err(e) => {
            eprintln!("kubemaas-podrunner: no cluster: {e}");
            std::process::exit(1)
        }
    };
    let config = RunnerConfig {
        server,
        pvc_root: pvc_root.unwrap_or_else(|| work.join("pvc")),
        work,
        cuda_as_auto: false,
        only: None,
    };
    let runner = PodRunner::start(client, &ns, config);
    let mut term =
        tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()).expect("SIGTERM handler");
    tokio::select! {
        _ = tokio::signal::ctrl_c() => {}
        _ = term.recv() => {}
    }
    runner.stop();
    tokio::time::sleep(Duration::from_millis(100)).await;
}
