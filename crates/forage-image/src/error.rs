//! What can go wrong building or opening an image.

use std::path::PathBuf;

use crate::manifest::ManifestError;

#[derive(Debug, thiserror::Error)]
pub enum ImageError {
    #[error("guest image {name} is not built in {dir}: run `forage image build {name}`")]
    NotBuilt { name: String, dir: PathBuf },
    #[error("unknown image recipe {name:?}: the recipes are {known}")]
    UnknownRecipe { name: String, known: String },
    #[error(transparent)]
    Manifest(#[from] ManifestError),
    #[error("apt knows no package {package}: {hint}")]
    PackageUnknown { package: String, hint: String },
    #[error("apt-get download {package} failed: {apt_said}")]
    Download { package: String, apt_said: String },
    #[error("cannot unpack {file}: {detail}")]
    Unpack { file: PathBuf, detail: String },
    #[error("{tool} is needed to build guest images: {detail} (install it with apt-get, or run scripts/deps.sh)")]
    Tool { tool: &'static str, detail: String },
    #[error("mmdebstrap failed (its whole output is in {log}); it ended with:\n{tail}")]
    Mmdebstrap { log: PathBuf, tail: String },
    #[error("{what} not found in the unpacked {package} package")]
    NotInPackage { what: String, package: String },
    #[error("kernel module {module} is needed but not in the kernel package")]
    ModuleMissing { module: String },
    #[error("{path}: not a readable kernel module: {detail}")]
    BadModule { path: PathBuf, detail: String },
    #[error("the guest binary {name} was not found (looked in {looked}); build it with `make guest`")]
    GuestBinaryMissing { name: String, looked: String },
    #[error("{path} cannot run in the guest: {detail}")]
    NotStatic { path: PathBuf, detail: String },
    #[error("{path} is older than the {recipe} recipe: {detail}; rebuild it with `make guest`")]
    StaleGuestBinary { path: PathBuf, recipe: &'static str, detail: &'static str },
    #[error("{what} is too large for the initramfs")]
    TooLarge { what: String },
    #[error("mkfs.ext4 failed on {path}: {detail}")]
    Mkfs { path: PathBuf, detail: String },
    #[error(transparent)]
    DataDir(#[from] forage_datadir::DataDirError),
    #[error("{path}")]
    Io {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
}
