//! `floor`: the machine's write floor, measured by the load tool itself so
//! that a server's fan-out can be reported as a fraction of it in the same
//! run (docs/BENCHMARKS.md). At low event rates a websocket server must at
//! least do one `write(2)` per delivery; nothing in user space can beat
//! that. One thread writes one pre-encoded websocket text frame per round to
//! each of N loopback sockets, one `write(2)` each; another thread drains
//! the other ends. The figure is writes per **writer-thread** CPU-second
//! (`RUSAGE_THREAD`): on loopback the receiving side's TCP work runs inside
//! the writer's `write(2)` and is charged to it, exactly as it is charged to
//! a server writing to loopback clients. The method is that of
//! `../shared/tools/write-floor.c`, so the two can be checked against each
//! other.

use crate::sys::thread_cpu_s;
use anyhow::{bail, Context, Result};
use clap::Args;
use serde::Serialize;
use std::io::Write;
use std::net::{TcpListener, TcpStream};
use std::path::PathBuf;
use std::time::{Duration, Instant};

#[derive(Args, Debug, Clone)]
pub struct FloorArgs {
    /// Sockets written to (each is two descriptors in this process).
    #[arg(long, short = 'n', default_value_t = 5000)]
    pub sockets: usize,
    /// Rounds: one frame to every socket per round.
    #[arg(long, default_value_t = 100)]
    pub rounds: u64,
    /// Rounds per second (0: as fast as possible).
    #[arg(long, default_value_t = 10.0)]
    pub rate: f64,
    /// Payload bytes of each text frame (at most 125: a 2-byte header).
    #[arg(long, default_value_t = 120)]
    pub payload: usize,
    /// Also write the result as JSON here.
    #[arg(long)]
    pub json_out: Option<PathBuf>,
}

#[derive(Serialize, Debug)]
pub struct FloorResult {
    pub sockets: usize,
    pub frame_bytes: usize,
    pub writes: u64,
    pub cpu_s: f64,
    pub wall_s: f64,
    pub writes_per_cpu_s: f64,
    pub us_per_write: f64,
}

pub fn run(a: &FloorArgs, nofile: u64) -> Result<FloorResult> {
    if a.payload > 125 {
        bail!(
            "--payload {} is over 125 bytes (one 2-byte frame header)",
            a.payload
        );
    }
    if a.sockets == 0 {
        bail!("--sockets must be at least 1");
    }
    let need = 2 * a.sockets as u64 + 64;
    if need > nofile {
        bail!(
            "{} sockets need {need} open files in this process, the limit is {nofile}",
            a.sockets
        );
    }
    let listener = TcpListener::bind("127.0.0.1:0").context("bind a loopback listener")?;
    let addr = listener.local_addr()?;
    // Connect and accept in lockstep: the kernel backlog stays small.
    let mut sinks = Vec::with_capacity(a.sockets);
    let mut conns = Vec::with_capacity(a.sockets);
    for _ in 0..a.sockets {
        sinks.push(TcpStream::connect(addr).context("connect to the loopback listener")?);
        let (s, _) = listener.accept()?;
        s.set_nodelay(true)?;
        conns.push(s);
    }
    // The sink: drain every receiving end until it closes.
    let sink = std::thread::spawn(move || -> Result<()> {
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_io()
            .build()?;
        rt.block_on(async move {
            let mut tasks = Vec::with_capacity(sinks.len());
            for s in sinks {
                s.set_nonblocking(true)?;
                let mut s = tokio::net::TcpStream::from_std(s)?;
                tasks.push(tokio::spawn(async move {
                    use tokio::io::AsyncReadExt;
                    let mut buf = [0u8; 16 * 1024];
                    while matches!(s.read(&mut buf).await, Ok(n) if n > 0) {}
                }));
            }
            for t in tasks {
                let _ = t.await;
            }
            anyhow::Ok(())
        })
    });
    let mut frame = vec![0x81u8, a.payload as u8];
    frame.resize(2 + a.payload, b'x');

    let c0 = thread_cpu_s();
    let t0 = Instant::now();
    let mut writes = 0u64;
    for r in 0..a.rounds {
        for s in &conns {
            // One write(2) per delivery; a short write would be a full
            // socket, which this rate never reaches.
            if (&*s).write(&frame)? == frame.len() {
                writes += 1;
            }
        }
        if a.rate > 0.0 {
            let next = t0 + Duration::from_secs_f64((r + 1) as f64 / a.rate);
            if let Some(wait) = next.checked_duration_since(Instant::now()) {
                std::thread::sleep(wait); // pacing the rounds, not synchronisation
            }
        }
    }
    let cpu = thread_cpu_s() - c0;
    let wall = t0.elapsed().as_secs_f64();
    drop(conns);
    sink.join()
        .map_err(|_| anyhow::anyhow!("the sink thread panicked"))??;
    drop(listener);
    Ok(FloorResult {
        sockets: a.sockets,
        frame_bytes: frame.len(),
        writes,
        cpu_s: cpu,
        wall_s: wall,
        writes_per_cpu_s: writes as f64 / cpu.max(1e-9),
        us_per_write: cpu * 1e6 / writes.max(1) as f64,
    })
}
