//! `tern-loadgen`: simulated mobile clients against a tern node, with exactly-once delivery
//! verification, HDR latency histograms, JSON and HTML reports, and a capacity search.
//!
//! Modules: `spec` (knobs, partitions), `schedule` (open-loop clock), `worker` (event-loop
//! threads driving `tern::client::ClientSession`s), `net` (sockets with chosen source
//! ports), `verify` (exactly-once check), `hist` (histograms and their wire form), `run`
//! (the coordinator and report), `html`, `capacity`, `node` (a spawned `tern serve`),
//! `meter` (the node's disk writes and CPU per thread over a run), `outage` (convergence
//! and reconnects after a network outage), `sys` (PRNG, /proc sampling), `uploader` (the
//! kill loop's upload in progress and its check).

use std::path::PathBuf;
use std::process::ExitCode;

use clap::{Parser, Subcommand};

mod capacity;
mod hist;
mod html;
mod meter;
mod net;
mod node;
mod outage;
mod run;
mod schedule;
mod spec;
mod sys;
mod uploader;
mod verify;
mod worker;

#[derive(Parser)]
#[command(
    name = "tern-loadgen",
    version,
    about = "Many heartbeating mobile clients against a tern node: load, verification, reports",
    args_conflicts_with_subcommands = true
)]
struct Cli {
    #[command(subcommand)]
    command: Option<Command>,
    #[command(flatten)]
    run: spec::RunArgs,
}

#[derive(Subcommand)]
enum Command {
    /// Step the load until the latency objective or the verification fails.
    Capacity(Box<capacity::CapacityArgs>),
    /// One partition of a multi-process run (started by the coordinator).
    #[command(hide = true)]
    Worker {
        #[arg(long)]
        spec: PathBuf,
    },
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    match cli.command {
        None => match run::run(&cli.run) {
            Ok(outcome) => {
                print!("{}", outcome.summary);
                if outcome.passed {
                    ExitCode::SUCCESS
                } else {
                    ExitCode::FAILURE
                }
            }
            Err(message) => {
                eprintln!("tern-loadgen: {message}");
                ExitCode::from(2)
            }
        },
        Some(Command::Capacity(args)) => match capacity::capacity(&args) {
            Ok((report, met)) => {
                println!(
                    "capacity: largest {} meeting {} p99 <= {} ms: {}",
                    report["dimension"].as_str().unwrap_or("?"),
                    report["slo_metric"].as_str().unwrap_or("?"),
                    args.slo_p99_ms,
                    report["best"]
                        .as_f64()
                        .map_or("none".to_owned(), |b| format!("{b:.0}"))
                );
                if met {
                    ExitCode::SUCCESS
                } else {
                    ExitCode::FAILURE
                }
            }
            Err(message) => {
                eprintln!("tern-loadgen: {message}");
                ExitCode::from(2)
            }
        },
        Some(Command::Worker { spec }) => match run::worker_main(&spec) {
            Ok(()) => ExitCode::SUCCESS,
            Err(message) => {
                eprintln!("tern-loadgen worker: {message}");
                ExitCode::from(2)
            }
        },
    }
}
