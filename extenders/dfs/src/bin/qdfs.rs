//! `qdfs`: the QuantumDFS command line.

use std::path::PathBuf;

use anyhow::{Context, Result};
use clap::{Parser, Subcommand};

#[derive(Parser)]
#[command(
    name = "qdfs",
    version,
    about = "QuantumDFS: verified file sharing over QuantumGate"
)]
struct Cli {
    #[command(subcommand)]
    cmd: Cmd,
}

#[derive(Subcommand)]
enum Cmd {
    /// Hash a file or folder into the local store and print its ID.
    Add {
        /// File or folder to share.
        path: PathBuf,
        /// The store directory.
        #[arg(long)]
        data_dir: PathBuf,
    },
}

fn main() -> Result<()> {
    let cli = Cli::parse();
    match cli.cmd {
        Cmd::Add { path, data_dir } => {
            let store = qdfs::store::Store::open(&data_dir)?;
            let (id, _) = store
                .add(&path)
                .with_context(|| format!("adding {}", path.display()))?;
            println!("{id}");
        }
    }
    Ok(())
}
