//! Service VMs made on this cloudlet: from a base VM and an app (the launch VM, saved), a
//! base alone (a baseline VM), or a disk image the operator brings (cold-booted with a
//! forage image's kernel until its service answers, then saved).

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use forage_agent::app::AppPackage;
use forage_datadir::DataDir;
use forage_image::{GuestImage, RunPaths};
use forage_synth::launch::LaunchOptions;
use forage_synth::BaseVm;

use crate::{now_unix, Repository, ServiceError, ServiceManifest, ServiceVm, SERVICE_FORMAT, SERVICE_KIND};

/// Why a service VM could not be made. Nothing is left in the repository.
#[derive(Debug, thiserror::Error)]
pub enum CreateError {
    #[error("service {0} already exists (forage service rm {0} first)")]
    Exists(String),
    #[error("the app")]
    App(#[source] forage_agent::app::AppError),
    #[error("the launch VM")]
    Launch(#[source] forage_synth::SynthError),
    #[error("{} is not a disk image qemu-img reads: {detail}", path.display())]
    NotADisk { path: PathBuf, detail: String },
    #[error("the image")]
    Image(#[source] forage_image::ImageError),
    #[error("booting the imported disk")]
    Boot(#[source] forage_image::BootError),
    #[error("the guest agent of the imported disk")]
    Agent(#[source] forage_agent::AgentError),
    #[error("nothing answered on guest port {port} of the imported disk within {}s (is its app under /data/apps with a start script?)", wait.as_secs())]
    NotAnswering { port: u16, wait: Duration },
    #[error("saving the service VM")]
    Save(#[source] forage_vm::SaveError),
    #[error(transparent)]
    Service(#[from] ServiceError),
    #[error("{}", path.display())]
    Io {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
}

/// A service VM to make from a base.
pub struct NewService<'a> {
    pub id: &'a str,
    pub base: &'a str,
    /// The app to install; none: a baseline VM (the base as it is).
    pub app: Option<&'a Path>,
    pub description: &'a str,
    /// Client apps for the app store: (id, platform, file).
    pub client_apps: &'a [(String, String, PathBuf)],
}

/// A service VM to make from a disk image of the operator's.
pub struct DiskImport<'a> {
    pub id: &'a str,
    pub disk: &'a Path,
    /// Guest port of its service, and the request line that shows it answers.
    pub port: u16,
    pub probe: Option<String>,
    /// The forage image whose kernel boots it.
    pub image: &'a str,
}

fn io(path: &Path) -> impl FnOnce(std::io::Error) -> CreateError + '_ {
    move |source| CreateError::Io { path: path.to_path_buf(), source }
}

/// Make service `new.id`; `progress` hears each step.
pub async fn create(
    data: &DataDir,
    repo: &Repository,
    new: &NewService<'_>,
    progress: &(dyn Fn(&str) + Sync),
) -> Result<ServiceVm, CreateError> {
    if repo.open(new.id).is_ok() {
        return Err(CreateError::Exists(new.id.into()));
    }
    let base = BaseVm::open(data, new.base).map_err(CreateError::Launch)?;
    let staging = repo.staging(new.id)?;
    let result = async {
        let to = staging.join("snapshot");
        let (port, probe, source) = match new.app {
            Some(dir) => {
                let app = AppPackage::open(dir).map_err(CreateError::App)?;
                progress(&format!(
                    "service {}: resuming base {}, installing {} ...",
                    new.id,
                    base.manifest().name,
                    app.manifest().name
                ));
                let work = staging.join("work");
                let launch = forage_synth::build::build_launch(data, &base, &app, &LaunchOptions::default(), &work)
                    .await
                    .map_err(CreateError::Launch)?;
                std::fs::rename(launch.snapshot.dir(), &to).map_err(io(&to))?;
                let _ = std::fs::remove_dir_all(&work);
                let m = app.manifest();
                (Some(m.port), m.probe.clone(), format!("app {} on base {}", m.name, base.manifest().name))
            }
            None => {
                DataDir::ensure(&to).map_err(ServiceError::from)?;
                for e in std::fs::read_dir(base.snapshot().dir()).map_err(io(base.snapshot().dir()))? {
                    let e = e.map_err(io(base.snapshot().dir()))?;
                    forage_vm::sparse::copy_sparse(&e.path(), &to.join(e.file_name())).map_err(io(&e.path()))?;
                }
                (None, None, format!("base {}", base.manifest().name))
            }
        };
        let m = manifest(new.id, port, probe, &base.manifest().image, new.description, source);
        Ok(repo.install(&staging, m, new.client_apps)?)
    }
    .await;
    if result.is_err() {
        let _ = std::fs::remove_dir_all(&staging);
    }
    result
}

/// Boot `import.disk` (converted to raw) with the image's kernel, wait for its service,
/// save it as service `import.id`.
pub async fn import_disk(
    data: &DataDir,
    repo: &Repository,
    import: &DiskImport<'_>,
    accel: forage_vm::Accel,
    progress: &(dyn Fn(&str) + Sync),
) -> Result<ServiceVm, CreateError> {
    let id = import.id;
    if repo.open(id).is_ok() {
        return Err(CreateError::Exists(id.into()));
    }
    let img = GuestImage::open(data, import.image).map_err(CreateError::Image)?;
    let staging = repo.staging(id)?;
    let result = async {
        let qmp = data.runtime_dir().map_err(ServiceError::from)?.join(format!("import-{}.qmp", std::process::id()));
        let run = RunPaths { dir: staging.join("run"), qmp_socket: qmp };
        DataDir::ensure(&run.dir).map_err(ServiceError::from)?;
        let raw = run.dir.join("imported.raw");
        let out = std::process::Command::new("qemu-img")
            .args(["convert", "-q", "-O", "raw"])
            .arg(import.disk)
            .arg(&raw)
            .output()
            .map_err(io(Path::new("qemu-img")))?;
        if !out.status.success() {
            return Err(CreateError::NotADisk {
                path: import.disk.into(),
                detail: String::from_utf8_lossy(&out.stderr).trim().into(),
            });
        }
        progress(&format!("service {id}: cold-booting {} with image {} ...", import.disk.display(), import.image));
        let guest = img
            .boot_from(&format!("import-{id}"), &run, Some(&raw), &[import.port], accel, Duration::from_secs(180))
            .await
            .map_err(CreateError::Boot)?;
        let (host_port, agent_port, port, probe) =
            (guest.ports[0], guest.agent_port, import.port, import.probe.clone());
        tokio::task::spawn_blocking(move || {
            wait_service(agent_port, host_port, port, probe.as_deref(), Duration::from_secs(120))
        })
        .await
        .expect("no panic")?;
        let vm = guest.vm;
        vm.save(&staging.join("snapshot")).await.map_err(CreateError::Save)?;
        drop(vm);
        let _ = std::fs::remove_dir_all(&run.dir);
        let m = manifest(
            id,
            Some(import.port),
            import.probe.clone(),
            import.image,
            "",
            format!("cold boot of {}", import.disk.display()),
        );
        Ok(repo.install(&staging, m, &[])?)
    }
    .await;
    if result.is_err() {
        let _ = std::fs::remove_dir_all(&staging);
    }
    result
}

fn wait_service(
    agent_port: u16,
    host_port: u16,
    port: u16,
    probe: Option<&str>,
    wait: Duration,
) -> Result<(), CreateError> {
    let local = |p| std::net::SocketAddr::from((std::net::Ipv4Addr::LOCALHOST, p));
    let mut agent =
        forage_agent::AgentClient::connect(local(agent_port), Duration::from_secs(30)).map_err(CreateError::Agent)?;
    let t = Instant::now();
    while t.elapsed() < wait {
        let up = match probe {
            Some(line) => forage_agent::app::request_line(local(host_port), line, Duration::from_secs(5)).is_ok(),
            None => agent.listening(port).unwrap_or(false),
        };
        if up {
            return Ok(());
        }
        std::thread::sleep(Duration::from_millis(200));
    }
    Err(CreateError::NotAnswering { port, wait })
}

fn manifest(
    id: &str,
    port: Option<u16>,
    probe: Option<String>,
    image: &str,
    description: &str,
    source: String,
) -> ServiceManifest {
    ServiceManifest {
        kind: SERVICE_KIND.into(),
        format: SERVICE_FORMAT,
        id: id.into(),
        os: forage_image::GUEST_OS.into(),
        image: image.into(),
        port,
        probe,
        description: description.into(),
        source,
        client_apps: Vec::new(),
        created_unix: now_unix(),
    }
}
