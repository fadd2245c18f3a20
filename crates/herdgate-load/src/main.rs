//! herdgate-load: a load generator for Pusher Channels protocol 7 servers.
//!
//! It plays many pusher-js clients (WebSocket sockets that subscribe and receive) and a server
//! SDK (signed HTTP API publishes) against any Pusher-compatible server, and reports what the
//! server did: connections established or refused (by HTTP status / close code), handshake and
//! delivery latency percentiles, missing/duplicate deliveries, and — given `--server-pid` — the
//! server's memory per socket and CPU per delivery.
//!
//! Module map: `cli` (options, run plan), `controller` (phases, child processes, merging),
//! `worker` (the sockets of one process), `socket` (one client socket), `publisher` (HTTP API),
//! `shm` (cross-process counters and publish ledger), `net` (TCP/TLS, source addresses),
//! `hist` (mergeable histograms), `procstat` (/proc sampling), `floor` (the machine's write
//! floor, no server),
//! `report` (JSON and Markdown), `sys` (the libc calls).
#![deny(unsafe_code)]

mod chart;
mod cli;
mod controller;
mod ctx;
mod floor;
mod herd;
mod hist;
mod net;
mod procstat;
mod publisher;
mod report;
#[allow(unsafe_code)] // a shared mapping of atomics: see its docs
mod shm;
#[allow(unsafe_code)] // every libc call, one safe wrapper each
mod sys;

mod socket;
mod wire;
mod worker;

use anyhow::{Context, Result};
use clap::Parser;
use std::sync::Arc;

fn main() -> Result<()> {
    let nofile = sys::raise_nofile_limit();
    let cli = cli::Cli::parse();
    if let cli::ScenarioCmd::Floor(args) = &cli.scenario {
        let r = floor::run(args, nofile)?;
        let json = serde_json::to_string(&r)?;
        if let Some(path) = &args.json_out {
            std::fs::write(path, &json).with_context(|| format!("writing {}", path.display()))?;
        }
        println!(
            "| sockets | frame | writes | writer CPU | writes per CPU-second | µs per write |"
        );
        println!("|---|---|---|---|---|---|");
        println!(
            "| {} | {} B | {} | {:.3} s | {:.0} | {:.2} |",
            r.sockets, r.frame_bytes, r.writes, r.cpu_s, r.writes_per_cpu_s, r.us_per_write
        );
        println!("{json}");
        return Ok(());
    }
    if let cli::ScenarioCmd::Herd(args) = &cli.scenario {
        let _ = nofile;
        return herd::run(args);
    }
    let (scenario, common) = cli.scenario.split();
    let plan = Arc::new(cli::Plan::new(scenario, &common)?);
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()?;

    if let (Some(index), Some(count), Some(path)) =
        (common.child_index, common.child_count, common.shm.as_ref())
    {
        // Child process: run one worker, print its result as one JSON line.
        let parent = std::os::unix::process::parent_id();
        let result = runtime.block_on(async {
            let shm = Arc::new(shm::Shm::open(path, plan.channels)?);
            // Ctrl-C reaches the whole process group; the parent decides when children stop.
            tokio::spawn(async {
                loop {
                    let _ = tokio::signal::ctrl_c().await;
                }
            });
            anyhow::Ok(worker::run(plan.clone(), shm, index, count, Some(parent)).await)
        })?;
        println!("{}", serde_json::to_string(&result)?);
        return Ok(());
    }

    let per_process = plan.connections.div_ceil(plan.processes) as u64;
    if per_process + 100 > nofile {
        eprintln!(
            "herdgate-load: warning: {per_process} sockets per process but the open-files limit is {nofile}; \
             use more --processes"
        );
    }
    let args: Vec<_> = std::env::args_os().skip(1).collect();
    let report = runtime.block_on(controller::run(plan.clone(), args))?;
    let md = report.to_markdown();
    println!("{md}");
    if let Some(p) = &plan.json_out {
        std::fs::write(p, serde_json::to_string_pretty(&report)? + "\n")
            .with_context(|| format!("writing {}", p.display()))?;
    }
    if let Some(p) = &plan.md_out {
        std::fs::write(p, &md).with_context(|| format!("writing {}", p.display()))?;
    }
    if let Some(prefix) = &plan.svg_out {
        for (suffix, svg) in chart::charts(&report) {
            let path = format!("{}-{suffix}.svg", prefix.display());
            std::fs::write(&path, svg).with_context(|| format!("writing {path}"))?;
        }
    }
    // Do not wait for lingering socket tasks: the report is out.
    runtime.shutdown_timeout(std::time::Duration::from_secs(1));
    Ok(())
}
