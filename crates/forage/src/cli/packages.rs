//! `forage packages ...` arguments.

use std::path::PathBuf;

use clap::Subcommand;

#[derive(Subcommand, Debug)]
pub enum PackagesCommand {
    /// Keep copies of .deb files (checked, named by their SHA-256) for overlays that name
    /// their files (`forage overlay create --packages`)
    Add {
        #[arg(required = true, value_name = "FILE.deb")]
        files: Vec<PathBuf>,
        #[arg(long)]
        json: bool,
    },
    /// The .debs this host holds
    List {
        #[arg(long)]
        json: bool,
    },
    /// The Debian packages an overlay names, and which of them this host lacks
    Check {
        overlay: PathBuf,
        #[arg(long)]
        json: bool,
    },
}
