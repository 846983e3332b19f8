//! The `thunderline` command: a thin entry point over the library.

use std::process::ExitCode;

use clap::{Parser, Subcommand};
use serde::Serialize;
use thunderline::{bench, daemon};

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
}

const BENCHMARKS: &str = "available benchmarks (each takes --json):
  pipeline   small messages through the engine vs. a crossbeam channel
  audit      zone events into the audit log vs. a raw COPY (needs --database)";

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

fn main() -> ExitCode {
    let cli = Cli::parse();
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
