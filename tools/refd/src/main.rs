//! `refd serve`: the daemon. See `tools/refd/README.md`.

use std::process::ExitCode;

use clap::{Parser, Subcommand};

#[global_allocator]
static GLOBAL: refd_alloc::MiMalloc = refd_alloc::MiMalloc;

#[derive(Debug, Parser)]
#[command(
    name = "refd",
    version,
    about = "refd: a reference-log service for extents"
)]
struct Cli {
    #[command(subcommand)]
    cmd: Cmd,
}

#[derive(Debug, Subcommand)]
enum Cmd {
    /// Serve a device over the refd protocol (docs/protocol.md).
    Serve(refd::cli::Serve),
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    let r = match cli.cmd {
        Cmd::Serve(a) => refd::cli::serve(a),
    };
    match r {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("refd: {e}");
            ExitCode::from(1)
        }
    }
}
