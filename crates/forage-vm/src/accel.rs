//! Which accelerator QEMU should use: KVM where it really runs ordinary guests, TCG
//! otherwise.

use std::fmt;
use std::path::Path;

use serde::{Deserialize, Serialize};

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Accel {
    Kvm,
    Tcg,
}

impl fmt::Display for Accel {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Accel::Kvm => "kvm",
            Accel::Tcg => "tcg",
        })
    }
}

/// The chosen accelerator and, when it is TCG, why KVM was not used.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AccelChoice {
    pub accel: Accel,
    pub why_not_kvm: Option<String>,
}

/// Pick the accelerator. `FORAGE_ACCEL=kvm|tcg` overrides detection.
///
/// KVM is refused when `/dev/kvm` cannot be opened read-write, and when the host module is
/// `kvm_pvm`: that module (shadow-paging nested virtualization) opens and creates VMs but
/// ordinary guest kernels hang early in boot (see `shared/notes/qemu-7.2.md`).
pub fn detect() -> AccelChoice {
    match std::env::var("FORAGE_ACCEL").as_deref() {
        Ok("kvm") => return AccelChoice { accel: Accel::Kvm, why_not_kvm: None },
        Ok("tcg") => return AccelChoice { accel: Accel::Tcg, why_not_kvm: Some("FORAGE_ACCEL=tcg".into()) },
        _ => {}
    }
    detect_in(Path::new("/"))
}

/// Detection against a root directory (tests point it at a fake tree).
pub fn detect_in(root: &Path) -> AccelChoice {
    let kvm = root.join("dev/kvm");
    let why = if !kvm.exists() {
        Some("/dev/kvm does not exist".to_string())
    } else if let Err(e) = std::fs::OpenOptions::new().read(true).write(true).open(&kvm) {
        Some(format!("/dev/kvm cannot be opened: {e}"))
    } else if root.join("sys/module/kvm_pvm").exists() {
        Some("the host KVM module is kvm_pvm, which cannot run ordinary guests".to_string())
    } else {
        None
    };
    AccelChoice { accel: if why.is_none() { Accel::Kvm } else { Accel::Tcg }, why_not_kvm: why }
}

/// [`detect`], with the one warning line an operator sees when it is not KVM (printed
/// once per process).
pub fn choose() -> Accel {
    static WARNED: std::sync::Once = std::sync::Once::new();
    let choice = detect();
    if let Some(why) = &choice.why_not_kvm {
        WARNED.call_once(|| eprintln!("warning: using TCG software emulation (slow), not KVM: {why}"));
    }
    choice.accel
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn no_dev_kvm_means_tcg() {
        let root = tempfile::tempdir().unwrap();
        let c = detect_in(root.path());
        assert_eq!(c.accel, Accel::Tcg);
        assert!(c.why_not_kvm.unwrap().contains("does not exist"));
    }

    #[test]
    fn kvm_pvm_means_tcg_and_says_so() {
        let root = tempfile::tempdir().unwrap();
        std::fs::create_dir_all(root.path().join("dev")).unwrap();
        std::fs::write(root.path().join("dev/kvm"), b"").unwrap();
        std::fs::create_dir_all(root.path().join("sys/module/kvm_pvm")).unwrap();
        let c = detect_in(root.path());
        assert_eq!(c.accel, Accel::Tcg);
        assert!(c.why_not_kvm.unwrap().contains("kvm_pvm"));
        std::fs::remove_dir(root.path().join("sys/module/kvm_pvm")).unwrap();
        assert_eq!(detect_in(root.path()).accel, Accel::Kvm);
    }
}
