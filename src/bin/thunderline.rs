//! The `thunderline` command: a thin entry point over the library.

use std::process::ExitCode;

use clap::{Parser, Subcommand};
use thunderline::bench;

#[derive(Parser)]
#[command(
    name = "thunderline",
    version,
    about = "A staged event-processing engine"
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
}

#[derive(Subcommand)]
enum Bench {
    /// Small messages through producer → processors → batcher → no-op sink, against a bare
    /// crossbeam channel.
    Pipeline(bench::pipeline::PipelineArgs),
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    match cli.command {
        Command::Bench { which: None } => {
            println!("available benchmarks (each takes --json):");
            println!("  pipeline   small messages through the engine vs. a crossbeam channel");
            ExitCode::SUCCESS
        }
        Command::Bench {
            which: Some(Bench::Pipeline(args)),
        } => match bench::pipeline::run(&args) {
            Ok(report) => {
                if args.json {
                    println!(
                        "{}",
                        serde_json::to_string(&report).expect("a report serialises")
                    );
                } else {
                    print!("{}", report.table());
                }
                if report.acked == report.events && report.max_in_flight <= report.in_flight_bound {
                    ExitCode::SUCCESS
                } else {
                    eprintln!(
                        "error: not every event was acknowledged, or the in-flight bound was exceeded"
                    );
                    ExitCode::FAILURE
                }
            }
            Err(e) => {
                eprintln!("error: {e}");
                ExitCode::FAILURE
            }
        },
    }
}
