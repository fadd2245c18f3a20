//! The `herdgate` binary: parse the command line, load the config, bind
//! (or take systemd's sockets), run until told to stop, drain.
#![deny(unsafe_code)]

use anyhow::Context;
use clap::{Parser, Subcommand};
use herdgate::config::Config;
use herdgate::notify::Notifier;
use std::path::PathBuf;
use std::process::ExitCode;

#[derive(Parser)]
#[command(version, about = "Pusher-compatible realtime edge proxy")]
struct Cli {
    /// Config file (TOML). Without it herdgate runs on its embedded default.
    #[arg(long, short)]
    config: Option<PathBuf>,
    #[command(subcommand)]
    command: Option<Command>,
}

#[derive(Subcommand)]
enum Command {
    /// Validate a config file and list every error; exit 1 if there are any.
    CheckConfig { file: PathBuf },
}

/// File descriptors kept free beyond the connection limits: listeners,
/// the admin side, logs, the notify socket.
const FD_RESERVE: u64 = 256;

fn main() -> ExitCode {
    let cli = Cli::parse();
    if let Some(Command::CheckConfig { file }) = cli.command {
        return match herdgate::load_config(&file) {
            Ok(_) => {
                println!("{}: ok", file.display());
                ExitCode::SUCCESS
            }
            Err(e) => {
                eprintln!("{}: {e}", file.display());
                ExitCode::FAILURE
            }
        };
    }
    let config = match &cli.config {
        Some(path) => match herdgate::load_config(path) {
            Ok(c) => c,
            Err(e) => {
                eprintln!("{}: {e}", path.display());
                return ExitCode::FAILURE;
            }
        },
        None => Config::embedded_default(),
    };
    herdgate::telemetry::init_logging(&config.log);
    // Before any thread exists: taking systemd's sockets edits the environment.
    let inherited = herdgate::activation::listen_fds_named();
    match serve(config, cli.config, inherited) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            tracing::error!("{e:#}");
            eprintln!("herdgate: {e:#}");
            ExitCode::FAILURE
        }
    }
}

/// Raise the open-files limit and check the configured connections fit in it.
fn check_fd_budget(config: &mut Config, embedded: bool) -> anyhow::Result<()> {
    let (soft, hard) =
        herdgate::sys::raise_nofile_limit().context("cannot read or raise the open-files limit")?;
    let l = &mut config.limits;
    let needed = (l.max_connections + l.max_handshakes) as u64 + FD_RESERVE;
    tracing::info!(soft, hard, needed, "open-files limit");
    if needed <= soft {
        return Ok(());
    }
    if embedded {
        // Nobody chose these numbers: fit them to the machine instead of refusing.
        let fit = soft
            .saturating_sub(l.max_handshakes as u64 + FD_RESERVE)
            .max(1) as usize;
        tracing::warn!(
            soft,
            from = l.max_connections,
            to = fit,
            "lowering limits.max_connections to fit the open-files limit"
        );
        l.max_connections = fit;
        return Ok(());
    }
    anyhow::bail!(
        "limits.max_connections ({}) + limits.max_handshakes ({}) + a reserve of {FD_RESERVE} need {needed} file descriptors, \
         but the open-files limit is {soft} (hard limit {hard}); raise LimitNOFILE or lower the limits",
        l.max_connections,
        l.max_handshakes,
    )
}

fn serve(
    mut config: Config,
    path: Option<PathBuf>,
    inherited: Vec<(String, std::net::TcpListener)>,
) -> anyhow::Result<()> {
    let embedded = path.is_none();
    check_fd_budget(&mut config, embedded)?;
    // One runtime thread per realtime worker: a host running several
    // herdgate processes (edges sharing a port) gives each `workers = 1`.
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(config.worker_count())
        .enable_all()
        .build()?;
    runtime.block_on(async move {
        // First, before anything says we are up (the listening log line,
        // READY=1): until a handler exists, SIGHUP and SIGTERM kill the process.
        use tokio::signal::unix::{signal, SignalKind};
        let mut hup = signal(SignalKind::hangup())?;
        let stop = shutdown_signal(signal(SignalKind::terminate())?, signal(SignalKind::interrupt())?);
        let notifier = Notifier::from_env();
        let (listener, admin) = listeners(&config, inherited).await?;
        tracing::info!(
            listen = %listener.local_addr()?,
            tls = config.tls.is_some(),
            role = %config.cluster.role,
            workers = config.worker_count(),
            "herdgate listening (websockets on /app/{{key}}, HTTP API on /apps/{{id}})"
        );
        if let Some(a) = &admin {
            tracing::info!(admin = %a.local_addr()?, "admin listening (/livez /readyz /status /metrics)");
        }
        if embedded {
            let app = &config.apps[0];
            tracing::info!(
                app_id = %app.id, key = %app.key, secret = %app.secret,
                "embedded default config: demo app (its secret is public; use --config for real deployments)"
            );
        }
        let running = herdgate::start(listener, admin, config)?;
        notifier.ready();
        let _watchdog = notifier.spawn_watchdog();
        let status = tokio::spawn(report_status(
            notifier.clone(),
            running.node.clone(),
            running.front.clone(),
        ));

        tokio::pin!(stop);
        loop {
            tokio::select! {
                _ = hup.recv() => {
                    notifier.reloading();
                    match &path {
                        Some(p) => { let _ = running.reload_from(p); }
                        None => {
                            // The embedded default cannot change; certificates still can.
                            let current = running.node.live().config.clone();
                            running.reload(current);
                        }
                    }
                    notifier.ready();
                }
                _ = &mut stop => break,
            }
        }
        notifier.stopping();
        status.abort();
        running.shutdown().await;
        tracing::info!("herdgate stopped");
        Ok(())
    })
}

/// The public and admin listeners: systemd's (socket activation, named
/// "public" / "admin", or in that order) if it passed any, else bound here.
async fn listeners(
    config: &Config,
    inherited: Vec<(String, std::net::TcpListener)>,
) -> anyhow::Result<(tokio::net::TcpListener, Option<tokio::net::TcpListener>)> {
    let mut public = None;
    let mut admin = None;
    for (i, (name, l)) in inherited.into_iter().enumerate() {
        match (name.as_str(), i) {
            ("admin", _) | ("", 1) | ("unknown", 1) => {
                admin = Some(tokio::net::TcpListener::from_std(l)?)
            }
            _ if public.is_none() => public = Some(tokio::net::TcpListener::from_std(l)?),
            _ => tracing::warn!(name, "ignoring an extra inherited socket"),
        }
    }
    let public = match public {
        Some(l) => {
            tracing::info!("using the listening socket passed by systemd");
            l
        }
        None if config.cluster.role == herdgate::config::Role::Worker => {
            let addr: std::net::SocketAddr = config.cluster.link_listen.parse().expect("validated");
            herdgate::listener::bind(addr, config.server.backlog, false)
                .with_context(|| format!("cannot listen on cluster.link_listen = {addr}"))?
        }
        None => {
            let addr = config.listen_addr();
            herdgate::listener::bind(addr, config.server.backlog, config.server.reuse_port)
                .with_context(|| format!("cannot listen on server.listen = {addr}"))?
        }
    };
    let admin = match (admin, config.admin_addr()) {
        (Some(l), _) => Some(l),
        (None, Some(addr)) => Some(
            herdgate::listener::bind(addr, 128, false)
                .with_context(|| format!("cannot listen on server.admin_listen = {addr}"))?,
        ),
        (None, None) => None,
    };
    Ok((public, admin))
}

/// `STATUS=` for `systemctl status`, every few seconds.
async fn report_status(
    notifier: Notifier,
    node: std::sync::Arc<herdgate::state::Node>,
    front: Option<std::sync::Arc<herdgate::state::Front>>,
) {
    if !notifier.is_enabled() {
        return;
    }
    let mut tick = tokio::time::interval(std::time::Duration::from_secs(5));
    loop {
        tick.tick().await;
        let state = node.overload.state().as_str();
        let open = front.as_ref().map_or(0, |f| f.gate.sessions.open());
        notifier.status(&format!("{open} connections open, load {state}"));
    }
}

/// The first SIGTERM or SIGINT starts a graceful drain; a second exits at once.
/// The handlers are installed by the caller, at start-up.
async fn shutdown_signal(
    mut term: tokio::signal::unix::Signal,
    mut int: tokio::signal::unix::Signal,
) {
    tokio::select! {
        _ = term.recv() => {}
        _ = int.recv() => {}
    }
    tracing::info!("shutting down (send the signal again to exit at once)");
    tokio::spawn(async move {
        tokio::select! {
            _ = term.recv() => {}
            _ = int.recv() => {}
        }
        eprintln!("herdgate: second signal, exiting now");
        #[allow(clippy::disallowed_methods)] // the one place that must not drain
        std::process::exit(130);
    });
}
