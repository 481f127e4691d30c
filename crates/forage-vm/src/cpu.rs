//! The CPU a saved VM needs, and whether this host can provide it.
//!
//! A saved VM resumes only where QEMU gives it the same virtual CPU: the same CPU model
//! with every feature the guest saw, under the same accelerator (a KVM save does not
//! resume under TCG, nor the reverse). Bases and overlays record [`CpuNeeds`]; a cloudlet
//! checks them against [`HostCpu`] before anything is transferred, instead of failing
//! half-way with QEMU's "guest CPU is not compatible".
//!
//! What the host provides is asked of QEMU itself: `query-cpu-definitions` under the
//! host's accelerator lists each model with the features this host cannot give it.

use std::io::Write;
use std::process::{Command, Stdio};

use serde::{Deserialize, Serialize};

use crate::accel::{Accel, AccelChoice};
use crate::spec::VmSpec;

/// QEMU 7.2's CPU model for `-machine pc` when none is given.
pub const DEFAULT_MODEL: &str = "qemu64";

/// The virtual CPU a saved VM needs.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct CpuNeeds {
    /// QEMU's CPU model name.
    pub model: String,
    /// The accelerator the VM was saved under.
    pub accel: Accel,
}

impl CpuNeeds {
    /// What a VM of `spec` saved under `accel` needs.
    pub fn of(spec: &VmSpec, accel: Accel) -> Self {
        Self { model: spec.cpu_model.clone().unwrap_or_else(|| DEFAULT_MODEL.to_string()), accel }
    }
}

impl std::fmt::Display for CpuNeeds {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "CPU model {} under {}", self.model, self.accel)
    }
}

/// Why this host cannot give a VM the CPU it needs.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum CpuMismatch {
    #[error("it was saved under {needed} and this host runs {have}{}", why.as_deref().map(|w| format!(" ({w})")).unwrap_or_default())]
    Accel { needed: Accel, have: Accel, why: Option<String> },
    #[error("QEMU here does not know CPU model {model:?} under {accel}")]
    UnknownModel { model: String, accel: Accel },
    #[error("this host cannot give CPU model {model} under {accel} these features: {}", missing.join(" "))]
    Features { model: String, accel: Accel, missing: Vec<String> },
    #[error("CPU model {model} is this host's own CPU: a VM saved with it resumes only where it was saved")]
    HostModel { model: String },
}

/// Asking QEMU what it provides failed.
#[derive(Debug, thiserror::Error)]
pub enum CpuProbeError {
    #[error("running {program} to list its CPU models")]
    Spawn {
        program: String,
        #[source]
        source: std::io::Error,
    },
    #[error("{program} -machine none,accel={accel} answered no CPU model list: {detail}")]
    Answer { program: String, accel: Accel, detail: String },
}

/// One model as QEMU lists it.
#[derive(Debug, Clone, Deserialize)]
struct CpuDefinition {
    name: String,
    #[serde(rename = "unavailable-features", default)]
    unavailable_features: Vec<String>,
    #[serde(rename = "alias-of", default)]
    alias_of: Option<String>,
}

#[derive(Debug, Deserialize)]
struct QmpReturn {
    #[serde(rename = "return")]
    ret: Option<Vec<CpuDefinition>>,
}

/// The CPUs this host's QEMU can give a VM under its accelerator.
#[derive(Debug, Clone)]
pub struct HostCpu {
    pub accel: AccelChoice,
    models: Vec<CpuDefinition>,
}

impl HostCpu {
    /// Ask this host's QEMU (`FORAGE_QEMU` or `qemu-system-x86_64`) under the detected
    /// accelerator. Takes about a tenth of a second; callers keep the answer.
    pub fn detect() -> Result<Self, CpuProbeError> {
        Self::probe(crate::accel::detect())
    }

    /// [`Self::detect`] under a chosen accelerator.
    pub fn probe(accel: AccelChoice) -> Result<Self, CpuProbeError> {
        let program = crate::process::qemu_binary()
            .map(|p| p.to_string_lossy().into_owned())
            .unwrap_or_else(|_| "qemu-system-x86_64".to_string());
        let models = query_models(&program, accel.accel)?;
        Ok(Self { accel, models })
    }

    /// A host answering with these models (tests).
    pub fn with_models(accel: AccelChoice, models: &[(&str, &[&str])]) -> Self {
        let models = models
            .iter()
            .map(|(n, f)| CpuDefinition {
                name: n.to_string(),
                unavailable_features: f.iter().map(|s| s.to_string()).collect(),
                alias_of: None,
            })
            .collect();
        Self { accel, models }
    }

    /// Can a VM that needs `needs` resume here?
    pub fn check(&self, needs: &CpuNeeds) -> Result<(), CpuMismatch> {
        if needs.accel != self.accel.accel {
            return Err(CpuMismatch::Accel {
                needed: needs.accel,
                have: self.accel.accel,
                why: self.accel.why_not_kvm.clone(),
            });
        }
        if matches!(needs.model.as_str(), "host" | "max") && needs.accel == Accel::Kvm {
            return Err(CpuMismatch::HostModel { model: needs.model.clone() });
        }
        let found = self
            .models
            .iter()
            .find(|m| m.name == needs.model)
            .ok_or_else(|| CpuMismatch::UnknownModel { model: needs.model.clone(), accel: self.accel.accel })?;
        let unavailable = match &found.alias_of {
            Some(target) => self
                .models
                .iter()
                .find(|m| &m.name == target)
                .map(|m| m.unavailable_features.clone())
                .unwrap_or_else(|| found.unavailable_features.clone()),
            None => found.unavailable_features.clone(),
        };
        if !unavailable.is_empty() {
            return Err(CpuMismatch::Features { model: needs.model.clone(), accel: needs.accel, missing: unavailable });
        }
        Ok(())
    }
}

fn query_models(program: &str, accel: Accel) -> Result<Vec<CpuDefinition>, CpuProbeError> {
    let mut child = Command::new(program)
        .args(["-machine", &format!("none,accel={accel}"), "-nodefaults", "-display", "none", "-qmp", "stdio"])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .map_err(|source| CpuProbeError::Spawn { program: program.to_string(), source })?;
    let script = concat!(
        r#"{"execute":"qmp_capabilities"}"#,
        "\n",
        r#"{"execute":"query-cpu-definitions"}"#,
        "\n",
        r#"{"execute":"quit"}"#,
        "\n"
    );
    if let Some(mut stdin) = child.stdin.take() {
        let _ = stdin.write_all(script.as_bytes());
    }
    let out =
        child.wait_with_output().map_err(|source| CpuProbeError::Spawn { program: program.to_string(), source })?;
    let text = String::from_utf8_lossy(&out.stdout);
    for line in text.lines() {
        if let Ok(QmpReturn { ret: Some(models) }) = serde_json::from_str::<QmpReturn>(line) {
            if !models.is_empty() {
                return Ok(models);
            }
        }
    }
    Err(CpuProbeError::Answer {
        program: program.to_string(),
        accel,
        detail: String::from_utf8_lossy(&out.stderr).lines().last().unwrap_or("").to_string(),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn tcg() -> AccelChoice {
        AccelChoice { accel: Accel::Tcg, why_not_kvm: Some("no /dev/kvm".into()) }
    }

    #[test]
    fn needs_are_checked_against_what_the_host_gives() {
        let host = HostCpu::with_models(tcg(), &[("qemu64", &[]), ("Skylake-Server", &["avx512f", "pku"])]);
        host.check(&CpuNeeds { model: "qemu64".into(), accel: Accel::Tcg }).unwrap();
        let e = host.check(&CpuNeeds { model: "qemu64".into(), accel: Accel::Kvm }).unwrap_err();
        assert!(e.to_string().contains("saved under kvm and this host runs tcg (no /dev/kvm)"), "{e}");
        let e = host.check(&CpuNeeds { model: "Skylake-Server".into(), accel: Accel::Tcg }).unwrap_err();
        assert!(e.to_string().contains("avx512f pku"), "{e}");
        let e = host.check(&CpuNeeds { model: "Zen9".into(), accel: Accel::Tcg }).unwrap_err();
        assert!(matches!(e, CpuMismatch::UnknownModel { .. }), "{e}");
    }

    #[test]
    fn this_hosts_qemu_lists_its_models() {
        let Ok(host) = HostCpu::detect() else {
            eprintln!("no QEMU here: skipped");
            return;
        };
        host.check(&CpuNeeds { model: DEFAULT_MODEL.into(), accel: host.accel.accel }).unwrap();
    }
}
