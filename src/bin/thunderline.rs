//! The `thunderline` command: a thin entry point over the library.

use std::io::IsTerminal;
use std::process::ExitCode;

use clap::{Parser, Subcommand};
use serde::Serialize;
use thunderline::redact::redact_url;
use thunderline::{bench, daemon};

#[global_allocator]
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;

#[derive(Parser)]
#[command(
    name = "thunderline",
    version,
    about = "A staged event-processing engine and zone server"
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Run a benchmark (each compares against a baseline measured in the same run).
    Bench {
        #[command(subcommand)]
        which: Option<Bench>,
    },
    /// Run the zone server: WebSocket channels, admin API, pipeline, audit log.
    Serve(daemon::server::ServeArgs),
    /// Check a pipeline file without starting anything.
    Check {
        /// The file, e.g. pipelines/zones.toml.
        file: std::path::PathBuf,
    },
    /// Mint a join token for an agent and a zone (with the server's secret).
    Token(daemon::token::TokenArgs),
    /// Print a zone's audited events, in order, as JSON lines.
    Replay(daemon::replay::ReplayArgs),
}

#[derive(Subcommand)]
enum Bench {
    /// Small messages through producer → processors → batcher → no-op sink, against a bare
    /// crossbeam channel.
    Pipeline(bench::pipeline::PipelineArgs),
    /// Zone events through the pipeline into the audit log, against a raw bulk load.
    Audit(bench::audit::AuditArgs),
    /// WebSocket clients pushing and receiving zone events, against a bare broadcast server.
    Ws(bench::ws::WsArgs),
    /// Zone commands from NATS JetStream or RabbitMQ into the audit log, against the broker's
    /// raw consume-and-ack rate.
    Broker(bench::broker::BrokerArgs),
    /// Time from a rejoin with `since` to the last missed event, from memory and from the audit
    /// log, against a plain join.
    Recovery(bench::recovery::RecoveryArgs),
    /// Agents moving between two zones (`migrate`, then a join with the ticket), on one node or
    /// across two, against a plain leave and join.
    Migrate(bench::migrate::MigrateArgs),
}

const BENCHMARKS: &str = "available benchmarks (each takes --json):
  pipeline   small messages through the engine vs. a crossbeam channel
  audit      zone events into the audit log vs. a raw COPY (needs --database)
  ws         WebSocket clients through the zone server vs. a bare broadcast server
  broker     commands from NATS or RabbitMQ into the audit log vs. raw consume + ack (--kind)
  recovery   a rejoin's missed events (from memory, from the audit log) vs. a plain join
  migrate    agents moving between zones (migrate + ticket) vs. leave + join (--nodes 1|2)";

/// Prints a report as JSON or as a table; the exit code says whether it met its invariants.
fn report<R: Serialize>(
    json: bool,
    report: &R,
    table: String,
    ok: bool,
    problem: &str,
) -> ExitCode {
    if json {
        println!(
            "{}",
            serde_json::to_string(report).expect("a report serialises")
        );
    } else {
        print!("{table}");
    }
    if ok {
        ExitCode::SUCCESS
    } else {
        eprintln!("error: {problem}");
        ExitCode::FAILURE
    }
}

fn fail(e: impl std::fmt::Display) -> ExitCode {
    eprintln!("error: {e}");
    ExitCode::FAILURE
}

/// Runs the server until SIGINT or SIGTERM, then drains it.
async fn serve(args: daemon::server::ServeArgs) -> Result<(), daemon::error::DaemonError> {
    let file = args.pipeline()?;
    let server = daemon::server::Server::start(&args, &file).await?;
    banner(&args, &server);
    wait_for_signal().await;
    tracing::info!("shutting down: draining the pipeline into the audit log");
    server.shutdown().await
}

/// Where a started server is reached, and where its admin token is kept: printed for people
/// (text logs), or one log line for machines (`--log-format json`).
fn banner(args: &daemon::server::ServeArgs, server: &daemon::server::Server) {
    let addr = server.addr;
    let url = format!("http://{addr}");
    let console = format!("{url}/");
    let websocket = format!("ws://{addr}/socket/websocket?vsn=2.0.0");
    let admin_api = format!("{url}/api/zones");
    let openapi = format!("{url}/api/openapi.json");
    let metrics = format!("http://{}/metrics", server.metrics_addr.unwrap_or(addr));
    let health = format!("{url}/healthz");
    let store = redact_url(&args.db.url());
    let admin_token = server.secrets.admin_token_origin.to_string();
    let on_terminal = std::io::stdout().is_terminal();
    match args.log_format {
        daemon::server::LogFormat::Json => {
            tracing::info!(
                %url, %console, %websocket, %admin_api, %openapi, %metrics, %health, %store,
                %admin_token, "thunderline listening"
            );
            // The token itself is never logged: only a person at a terminal sees it, once.
            if let daemon::server::SecretOrigin::Generated(_) = server.secrets.admin_token_origin
                && on_terminal
            {
                println!(
                    "admin token (generated now, shown only this once): {}",
                    server.secrets.admin_token
                );
            }
        }
        daemon::server::LogFormat::Text => {
            tracing::info!(%addr, %store, "thunderline listening");
            println!("thunderline listening on {url}");
            println!("  console: {console}");
            println!("  WebSocket (Phoenix Channels V2): {websocket}");
            println!("  admin API: {admin_api}  (Authorization: Bearer <admin token>)");
            println!("  API description (OpenAPI): {openapi}");
            println!("  metrics: {metrics}   health: {health}");
            println!("  store: {store}");
            match &server.secrets.admin_token_origin {
                // Shown once, to the person who started the server; never to a log file or a
                // pipe.
                daemon::server::SecretOrigin::Generated(path) if on_terminal => println!(
                    "  admin token (generated now, shown only this once; kept in {}): {}",
                    path.display(),
                    server.secrets.admin_token
                ),
                daemon::server::SecretOrigin::Generated(_) => println!(
                    "  admin token: {admin_token} (not printed, since this output is not a \
                     terminal)"
                ),
                _ => println!("  admin token: {admin_token}"),
            }
        }
    }
}

async fn wait_for_signal() {
    #[cfg(unix)]
    {
        use tokio::signal::unix::{SignalKind, signal};
        match signal(SignalKind::terminate()) {
            Ok(mut term) => {
                tokio::select! {
                    _ = tokio::signal::ctrl_c() => {}
                    _ = term.recv() => {}
                }
            }
            Err(_) => {
                let _ = tokio::signal::ctrl_c().await;
            }
        }
    }
    #[cfg(not(unix))]
    {
        let _ = tokio::signal::ctrl_c().await;
    }
}

/// Logs through `tracing` to standard error: readable by default, JSON lines for machines;
/// `level` for every module, with `RUST_LOG`'s directives on top. Colour only on a terminal, so
/// that a log file holds no escape codes.
fn init_logs(format: daemon::server::LogFormat, level: tracing::Level) {
    use tracing_subscriber::EnvFilter;
    let filter = EnvFilter::builder()
        .with_default_directive(tracing::level_filters::LevelFilter::from_level(level).into())
        .from_env_lossy();
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_ansi(std::io::stderr().is_terminal())
        .with_writer(std::io::stderr);
    let _ = match format {
        daemon::server::LogFormat::Json => builder.json().try_init(),
        daemon::server::LogFormat::Text => builder.try_init(),
    };
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    if let Command::Bench { .. } = cli.command {
        // What goes wrong during a run (a stalled round, a lost connection) is said; the
        // servers a benchmark starts in process keep their routine lines to themselves.
        init_logs(daemon::server::LogFormat::Text, tracing::Level::WARN);
    }
    match cli.command {
        Command::Bench { which: None } => {
            println!("{BENCHMARKS}");
            ExitCode::SUCCESS
        }
        Command::Bench {
            which: Some(Bench::Pipeline(args)),
        } => match bench::pipeline::run(&args) {
            Ok(r) => report(
                args.json,
                &r,
                r.table(),
                r.acked == r.events && r.max_in_flight <= r.in_flight_bound,
                "not every event was acknowledged, or the in-flight bound was exceeded",
            ),
            Err(e) => fail(e),
        },
        Command::Bench {
            which: Some(Bench::Audit(args)),
        } => match bench::audit::run(&args) {
            Ok(r) => report(
                args.json,
                &r,
                r.table(),
                r.rows_in_db == r.events && r.acked == r.events,
                "the audit log does not hold exactly the events sent",
            ),
            Err(e) => fail(e),
        },
        Command::Bench {
            which: Some(Bench::Recovery(args)),
        } => match bench::recovery::run(&args) {
            Ok(r) => report(
                args.json,
                &r,
                r.table(),
                r.complete(),
                "not every rejoin recovered every missed event, in order, once",
            ),
            Err(e) => fail(e),
        },
        Command::Bench {
            which: Some(Bench::Migrate(args)),
        } => match bench::migrate::run(&args) {
            Ok(r) => report(
                args.json,
                &r,
                r.table(),
                r.complete(),
                "not every move ended with the agent in the other zone",
            ),
            Err(e) => fail(e),
        },
        Command::Bench {
            which: Some(Bench::Broker(args)),
        } => match bench::broker::run(&args) {
            Ok(r) => report(
                args.json,
                &r,
                r.table(),
                r.complete(),
                "not every command reached the audit log and its acknowledgement exactly once",
            ),
            Err(e) => fail(e),
        },
        Command::Check { file } => match daemon::config::PipelineFile::load(&file) {
            Ok(_) => {
                println!("{}: ok", file.display());
                ExitCode::SUCCESS
            }
            Err(e) => fail(e),
        },
        Command::Serve(args) => {
            init_logs(args.log_format, args.log_level);
            let runtime = match tokio::runtime::Builder::new_multi_thread()
                .enable_all()
                .build()
            {
                Ok(rt) => rt,
                Err(e) => return fail(e),
            };
            match runtime.block_on(serve(args)) {
                Ok(()) => ExitCode::SUCCESS,
                Err(e) => fail(e),
            }
        }
        Command::Token(args) => match daemon::token::mint(&args) {
            Ok((token, expires_at)) => {
                println!("{token}");
                eprintln!("expires at {}", expires_at.to_rfc3339());
                ExitCode::SUCCESS
            }
            Err(e) => fail(e),
        },
        Command::Bench {
            which: Some(Bench::Ws(args)),
        } if args.agents_per_zone.is_some() => match bench::crowd::run(&args) {
            Ok(r) => {
                if args.json {
                    eprint!("{}", r.table());
                }
                report(
                    args.json,
                    &r,
                    r.table(),
                    r.asked
                        .run
                        .answered_every_push(r.asked.agents_per_zone * r.zones),
                    "some clients failed to connect, or the server refused or dropped events",
                )
            }
            Err(e) => fail(e),
        },
        Command::Bench {
            which: Some(Bench::Ws(args)),
        } if !args.sweep.is_empty() => match bench::ws::sweep(&args) {
            Ok(r) => {
                if args.json {
                    eprint!("{}", r.table());
                }
                report(
                    args.json,
                    &r,
                    r.table(),
                    r.steps.iter().all(|s| s.run.answered_every_push(r.clients)),
                    "some clients failed to connect, or the server refused or dropped events",
                )
            }
            Err(e) => fail(e),
        },
        Command::Bench {
            which: Some(Bench::Ws(args)),
        } => match bench::ws::run(&args) {
            Ok(r) => {
                if args.json {
                    eprint!("{}", r.table());
                }
                if let Some(path) = &args.report
                    && let Err(e) = std::fs::write(path, r.html())
                {
                    return fail(format!("cannot write {}: {e}", path.display()));
                }
                report(
                    args.json,
                    &r,
                    r.table(),
                    r.run.answered_every_push(r.clients),
                    "some clients failed to connect, or the server refused or dropped events",
                )
            }
            Err(e) => fail(e),
        },
        Command::Replay(args) => {
            let runtime = match tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
            {
                Ok(rt) => rt,
                Err(e) => return fail(e),
            };
            let stdout = std::io::stdout();
            match runtime.block_on(daemon::replay::replay(&args, &mut stdout.lock())) {
                Ok(_) => ExitCode::SUCCESS,
                Err(e) => fail(e),
            }
        }
    }
}
