//! What can go wrong with base VMs, launch VMs and overlays; running the tools they need.

use std::path::PathBuf;

#[derive(Debug, thiserror::Error)]
pub enum SynthError {
    #[error("signing {}", path.display())]
    Signature {
        path: PathBuf,
        #[source]
        source: forage_trust::TrustError,
    },
    #[error("refusing {}: {detail}", path.display())]
    Unsigned { path: PathBuf, detail: String },
    #[error("no base VM named {name}: create one with `forage base create {name} --image tiny`")]
    NoBase { name: String },
    #[error("{what} already exists at {path}")]
    Exists { what: String, path: PathBuf },
    #[error("{path}: {detail}")]
    BadFile { path: PathBuf, detail: String },
    #[error("overlay {path}: {source}")]
    Overlay {
        path: PathBuf,
        #[source]
        source: forage_format::FormatError,
    },
    #[error("overlay {path} is for base {wanted} ({wanted_name}), but base {have_name} is {have}")]
    WrongBase { path: PathBuf, wanted: String, wanted_name: String, have: String, have_name: String },
    #[error(
        "overlay {path} is a residue of overlay {parent}: merge it first (`forage overlay merge PARENT {path} -o OUT`)"
    )]
    Residue { path: PathBuf, parent: String },
    #[error("residue {residue} continues overlay {wanted}, but {parent} is overlay {have}: give the overlay the residue was made from")]
    NotParent { residue: PathBuf, parent: PathBuf, wanted: String, have: String },
    #[error("this host lacks {count} of the {of} Debian packages the overlay names ({some}): add them with `forage packages add FILE.deb...`")]
    MissingPackages { count: usize, of: usize, some: String },
    #[error("app {app} installed no Debian packages in its launch VM (\"debs\" in its app.json): an overlay cannot name their files")]
    NoPackages { app: String },
    #[error("the overlay's package volume does not match what its .debs make here ({blocks} blocks, it says {claimed}, or another SHA-256)")]
    VolumeMismatch { blocks: u64, claimed: u64 },
    #[error("{tool} failed: {detail}")]
    Tool { tool: String, detail: String },
    #[error("the application {app} did not answer on guest port {port} of the launch VM within {waited:?}")]
    AppNotReady { app: String, port: u16, waited: std::time::Duration },
    #[error("the application {app} answers its probe wrongly: {answer:?} does not contain {expected:?}")]
    AppWrongAnswer { app: String, answer: String, expected: String },
    // Boxed: both are large, and SynthError travels in every Result of the crates above.
    #[error(transparent)]
    AppInstall(Box<forage_image::app_debs::AppInstallError>),
    #[error("the launch VM's QEMU guest agent")]
    GuestAgent(#[source] Box<forage_vm::qga::QgaError>),
    #[error(transparent)]
    Agent(#[from] forage_agent::AgentError),
    #[error(transparent)]
    App(#[from] forage_agent::app::AppError),
    #[error(transparent)]
    Boot(#[from] forage_image::BootError),
    #[error(transparent)]
    Vm(#[from] forage_vm::VmError),
    #[error(transparent)]
    Save(#[from] forage_vm::SaveError),
    #[error(transparent)]
    Restore(#[from] forage_vm::RestoreError),
    #[error(transparent)]
    Snapshot(#[from] forage_vm::SnapshotError),
    #[error(transparent)]
    DataDir(#[from] forage_datadir::DataDirError),
    #[error("{path}")]
    Io {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
}

impl From<forage_image::app_debs::AppInstallError> for SynthError {
    fn from(e: forage_image::app_debs::AppInstallError) -> Self {
        Self::AppInstall(Box::new(e))
    }
}

impl From<forage_vm::qga::QgaError> for SynthError {
    fn from(e: forage_vm::qga::QgaError) -> Self {
        Self::GuestAgent(Box::new(e))
    }
}

/// Run a command, turning failure into an error carrying its stderr.
pub(crate) fn run_tool(cmd: &mut std::process::Command) -> Result<std::process::Output, SynthError> {
    let tool = format!("{:?}", cmd.get_program());
    let out =
        cmd.output().map_err(|e| SynthError::Tool { tool: tool.clone(), detail: format!("cannot run it: {e}") })?;
    if !out.status.success() {
        return Err(SynthError::Tool { tool, detail: String::from_utf8_lossy(&out.stderr).trim().to_string() });
    }
    Ok(out)
}
