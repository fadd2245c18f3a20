//! The `herdgate` binary: parse the command line, load the config, run.

use anyhow::Context;
use clap::{Parser, Subcommand};
use herdgate::config::{Config, LoadError};
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

fn main() -> ExitCode {
    let cli = Cli::parse();
    if let Some(Command::CheckConfig { file }) = cli.command {
        return match Config::from_file(&file) {
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
    let (config, embedded) = match &cli.config {
        Some(path) => match Config::from_file(path) {
            Ok(c) => (c, false),
            Err(e @ (LoadError::Invalid(_) | LoadError::Read { .. })) => {
                eprintln!("{}: {e}", path.display());
                return ExitCode::FAILURE;
            }
        },
        None => (Config::embedded_default(), true),
    };
    herdgate::telemetry::init_logging(&config.log);
    match serve(config, embedded) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            tracing::error!("{e:#}");
            eprintln!("herdgate: {e:#}");
            ExitCode::FAILURE
        }
    }
}

fn serve(config: Config, embedded: bool) -> anyhow::Result<()> {
    match herdgate::sys::raise_nofile_limit() {
        Ok((soft, hard)) => tracing::info!(soft, hard, "open-files limit"),
        Err(e) => tracing::warn!(error = %e, "could not raise the open-files limit"),
    }
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()?;
    runtime.block_on(async move {
        let listen = config.listen_addr();
        let listener = tokio::net::TcpListener::bind(listen)
            .await
            .with_context(|| format!("cannot listen on server.listen = {listen}"))?;
        let admin = match config.admin_addr() {
            Some(a) => Some(
                tokio::net::TcpListener::bind(a)
                    .await
                    .with_context(|| format!("cannot listen on server.admin_listen = {a}"))?,
            ),
            None => None,
        };
        let local = listener.local_addr()?;
        tracing::info!(listen = %local, workers = config.worker_count(), "herdgate listening (websockets on /app/{{key}}, HTTP API on /apps/{{id}})");
        if let Some(a) = &admin {
            tracing::info!(admin = %a.local_addr()?, "admin listening (/livez /readyz /metrics)");
        }
        if embedded {
            let app = &config.apps[0];
            tracing::info!(
                app_id = %app.id, key = %app.key, secret = %app.secret,
                "embedded default config: demo app (its secret is public; use --config for real deployments)"
            );
        }
        let running = herdgate::start(listener, admin, config)?;
        let mut hup = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::hangup())?;
        let stop = shutdown_signal();
        tokio::pin!(stop);
        loop {
            tokio::select! {
                _ = hup.recv() => running.reload(),
                _ = &mut stop => break,
            }
        }
        running.shutdown(std::time::Duration::from_secs(10)).await;
        tracing::info!("herdgate stopped");
        Ok(())
    })
}

/// The first SIGTERM or SIGINT starts a graceful shutdown; a second exits at once.
async fn shutdown_signal() {
    use tokio::signal::unix::{signal, SignalKind};
    let mut term = signal(SignalKind::terminate()).expect("install SIGTERM handler");
    let mut int = signal(SignalKind::interrupt()).expect("install SIGINT handler");
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
        std::process::exit(130);
    });
}
