//! refd-bench: load generator and benchmarks for refd.
//!
//! Every benchmark measures the lock-free design and the mutex baseline
//! side by side in one run and prints their ratio (these machines are
//! noisy: compare within a run, not across runs).

mod alloc;
mod ingest;
mod workload;

use clap::{Parser, Subcommand};

#[global_allocator]
static GLOBAL: alloc::Counting = alloc::Counting;

#[derive(Debug, Parser)]
#[command(name = "refd-bench", version, about = "refd benchmarks")]
struct Cli {
    #[command(subcommand)]
    cmd: Cmd,
}

#[derive(Debug, Subcommand)]
enum Cmd {
    /// Ingest throughput, latency, memory per pending ref and commit time.
    Ingest(ingest::IngestArgs),
}

fn main() {
    let cli = Cli::parse();
    let res = match &cli.cmd {
        Cmd::Ingest(a) => ingest::run(a),
    };
    if let Err(e) = res {
        eprintln!("refd-bench: {e}");
        std::process::exit(1);
    }
}
