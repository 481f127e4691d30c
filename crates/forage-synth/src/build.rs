//! The builder's workflow, as `forage overlay create` runs it (and the benches and the
//! demo): the launch VM of an app on a base, an access profile of its first response
//! (optional), the overlay written, and signed with this host's key (`OVL.sig`).

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use forage_agent::app::AppPackage;
use forage_datadir::DataDir;
use forage_format::manifest::Service;

use crate::create::{CreateOptions, CreateReport, LaunchInput};
use crate::launch::{self, LaunchOptions, LaunchVm};
use crate::{BaseVm, SynthError};

/// In which order the overlay's blobs go.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum BlobOrder {
    /// By position (memory, then disk).
    Offset,
    /// What a profiling resume read before its first response first (early start).
    Access,
}

/// What to build.
#[derive(Debug, Clone)]
pub struct OverlayRequest {
    pub base: String,
    pub app: PathBuf,
    pub options: CreateOptions,
    pub order: BlobOrder,
    pub output: PathBuf,
    /// Name the chunks that hold files of the app's Debian packages instead of carrying
    /// them (overlay format 3; a cloudlet needs the packages: `forage packages add`).
    pub packages: bool,
}

/// What building took.
#[derive(Debug)]
pub struct OverlayBuild {
    pub report: CreateReport,
    /// The launch VM and the profiling resume.
    pub launch: Duration,
    /// The public key that signed it.
    pub signer: String,
}

/// Build the launch VM of `app` on `base` in the scratch folder `work`.
pub async fn build_launch(
    data: &DataDir,
    base: &BaseVm,
    app: &AppPackage,
    opts: &LaunchOptions,
    work: &Path,
) -> Result<LaunchVm, SynthError> {
    launch::build(data, base, app, forage_vm::accel::detect().accel, opts, work).await
}

/// Launch VM, profile (access order), overlay, signature; `progress` hears each step.
pub async fn build_overlay(
    data: &DataDir,
    req: &OverlayRequest,
    progress: &(dyn Fn(&str) + Sync),
) -> Result<OverlayBuild, SynthError> {
    let base = BaseVm::open(data, &req.base)?;
    let app = AppPackage::open(&req.app)?;
    let work = data.work().join(format!("overlay-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&work);
    let result = async {
        let t = Instant::now();
        let lopts = LaunchOptions {
            semantic_disk: req.options.semantic_disk,
            semantic_memory: req.options.semantic_memory,
            ..LaunchOptions::default()
        };
        progress(&format!("launch VM: resuming base {}, installing {} ...", req.base, app.manifest().name));
        let launch = build_launch(data, &base, &app, &lopts, &work).await?;
        if let Some(debs) = &launch.debs {
            progress(&format!("  {debs}"));
        }
        let mut options = req.options.clone();
        if req.packages {
            let index = crate::deb_volume::index_installed(data, &app.manifest().name, launch.debs.as_ref())?;
            progress(&format!(
                "  {} Debian packages indexed ({} blocks of files), kept in {}",
                index.set.debs.len(),
                index.set.blocks,
                data.packages().display()
            ));
            options.packages = Some(std::sync::Arc::new(index));
        }
        let (report, signer) =
            overlay_of_launch(data, &base, &launch, &options, req.order, &req.output, &work, progress).await?;
        // The launch VM and the profiling resume: all but the overlay's writing.
        let launch_time = t.elapsed().saturating_sub(report.took);
        Ok(OverlayBuild { report, launch: launch_time, signer })
    }
    .await;
    let _ = std::fs::remove_dir_all(&work);
    result
}

/// The overlay of a launch VM already built: profile its first response (in `order`
/// `Access`; scratch in `work`), write the overlay at `output` and sign it.
#[allow(clippy::too_many_arguments)]
pub async fn overlay_of_launch(
    data: &DataDir,
    base: &BaseVm,
    launch: &LaunchVm,
    options: &CreateOptions,
    order: BlobOrder,
    output: &Path,
    work: &Path,
    progress: &(dyn Fn(&str) + Sync),
) -> Result<(CreateReport, String), SynthError> {
    let profile = match order {
        BlobOrder::Access => {
            progress("profiling a resume of the launch VM up to its first response ...");
            let accel = forage_vm::accel::detect().accel;
            Some(crate::profile::profile_access(data, &launch.snapshot, &launch.app, accel, work).await?)
        }
        BlobOrder::Offset => None,
    };
    let input = LaunchInput {
        snapshot: &launch.snapshot,
        written_disk_chunks: &launch.written_disk_chunks,
        discarded_disk_chunks: &launch.discarded_disk_chunks,
        checkpoint: launch.checkpoint,
        service: Some(Service {
            name: launch.app.name.clone(),
            port: launch.app.port,
            probe: launch.app.probe.clone(),
        }),
        accessed: profile.as_ref().map(|p| (&p.memory[..], &p.disk[..])),
    };
    progress("writing the overlay ...");
    let report = crate::create::create(base, &input, options, output)?;
    progress(&format!("  {}", report.fs));
    let signer = sign_overlay(data, output)?;
    Ok((report, signer))
}

/// This host's signing key (made the first time it is needed).
pub fn signing_key(data: &DataDir) -> PathBuf {
    data.root().join("trust").join("signing.pk8")
}

/// Sign a base or service package just written (`FILE.sig`) with this host's key.
pub fn sign_package(data: &DataDir, artifact: &str, file: &Path) -> Result<(), SynthError> {
    let signature = |source| SynthError::Signature { path: file.to_path_buf(), source };
    let signer = forage_trust::signing::Signer::open_or_init(&signing_key(data)).map_err(signature)?;
    let digest = crate::package::package_digest(file)?;
    forage_trust::signing::write_detached(&signer, artifact, &digest, file).map_err(signature)
}

/// With a signers list (`DATA/trust/signers`), a package must carry a good signature of
/// a listed signer; without one, any package is accepted.
pub fn check_package(data: &DataDir, artifact: &str, file: &Path) -> Result<(), SynthError> {
    let signers = data.root().join("trust").join("signers");
    if !signers.exists() {
        return Ok(());
    }
    let digest = crate::package::package_digest(file)?;
    forage_trust::signing::check_detached(&signers, artifact, &digest, file)
        .map_err(|detail| SynthError::Unsigned { path: file.to_path_buf(), detail })
}

/// Sign the overlay `ovl` with this host's key: `OVL.sig` beside it. Returns the signer's
/// public key.
pub fn sign_overlay(data: &DataDir, ovl: &Path) -> Result<String, SynthError> {
    let bad = |detail: String| SynthError::BadFile { path: ovl.to_path_buf(), detail };
    let signer = forage_trust::signing::Signer::open_or_init(&signing_key(data))
        .map_err(|e| bad(format!("signing key: {e}")))?;
    let mut head = [0u8; forage_format::container::HEADER_LEN];
    let mut f = std::fs::File::open(ovl).map_err(|source| SynthError::Io { path: ovl.to_path_buf(), source })?;
    std::io::Read::read_exact(&mut f, &mut head)
        .map_err(|source| SynthError::Io { path: ovl.to_path_buf(), source })?;
    let header =
        forage_format::read_header(&head).map_err(|source| SynthError::Overlay { path: ovl.to_path_buf(), source })?;
    forage_trust::signing::write_detached(
        &signer,
        forage_trust::signing::OVERLAY,
        &hex::encode(header.manifest_sha256),
        ovl,
    )
    .map_err(|e| bad(format!("signature: {e}")))?;
    Ok(signer.public_hex())
}
