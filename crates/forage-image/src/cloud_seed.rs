//! A cloud-init NoCloud seed: what stock cloud images read at first boot. An ISO 9660
//! image labelled `cidata` holding `meta-data` (instance id, host name) and `user-data`
//! (`#cloud-config`: a user, optionally an SSH key, and a line on the serial console when
//! configuration is done), made by `genisoimage` as cloud-image-utils' `cloud-localds`
//! makes it. Nothing here is forage-specific inside the guest: cloud-init reads it from a
//! CD drive and forgets it.

use std::path::{Path, PathBuf};
use std::process::Command;

/// What the seed configures.
#[derive(Debug, Clone)]
pub struct NoCloudSeed {
    /// cloud-init runs its per-instance modules once per instance id.
    pub instance_id: String,
    pub hostname: String,
    /// A user to create (sudo without password, locked password).
    pub user: String,
    /// An SSH public key for that user (one line).
    pub ssh_key: Option<String>,
    /// Printed on the serial console (`/dev/ttyS0`) when cloud-init's final stage ran.
    pub ready_marker: String,
}

#[derive(Debug, thiserror::Error)]
pub enum SeedError {
    #[error("{what} {value:?} is not a plain word (letters, digits, '.', '_', '-', at most 128)")]
    NotPlain { what: &'static str, value: String },
    #[error("the SSH key is not one line of the form `TYPE BASE64 [COMMENT]`")]
    BadSshKey,
    #[error("{}", path.display())]
    Io {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("genisoimage failed (install it: apt-get install genisoimage): {detail}")]
    Genisoimage { detail: String },
}

fn plain(s: &str) -> bool {
    !s.is_empty() && s.len() <= 128 && s.chars().all(|c| c.is_ascii_alphanumeric() || "._-".contains(c))
}

impl NoCloudSeed {
    fn check(&self) -> Result<(), SeedError> {
        for (what, value) in [
            ("instance id", &self.instance_id),
            ("host name", &self.hostname),
            ("user name", &self.user),
            ("ready marker", &self.ready_marker),
        ] {
            if !plain(value) {
                return Err(SeedError::NotPlain { what, value: value.clone() });
            }
        }
        if let Some(key) = &self.ssh_key {
            let mut words = key.split_whitespace();
            let ok = key.len() <= 16 * 1024
                && !key.contains(['\n', '\r', '"', '\\'])
                && words.next().is_some_and(|t| t.starts_with("ssh-") || t.starts_with("ecdsa-"))
                && words.next().is_some_and(|b| b.chars().all(|c| c.is_ascii_alphanumeric() || "+/=".contains(c)));
            if !ok {
                return Err(SeedError::BadSshKey);
            }
        }
        Ok(())
    }

    pub fn meta_data(&self) -> String {
        format!("instance-id: {}\nlocal-hostname: {}\n", self.instance_id, self.hostname)
    }

    /// `#cloud-config` user data. Every value was checked plain (or, the key, quoted).
    pub fn user_data(&self) -> String {
        let key = match &self.ssh_key {
            Some(k) => format!("    ssh_authorized_keys:\n      - \"{}\"\n", k.trim()),
            None => String::new(),
        };
        format!(
            "#cloud-config\n\
             users:\n  - name: {user}\n    shell: /bin/bash\n    lock_passwd: true\n    sudo: \"ALL=(ALL) NOPASSWD:ALL\"\n{key}\
             runcmd:\n  - [sh, -c, 'echo {marker} > /dev/ttyS0']\n",
            user = self.user,
            marker = self.ready_marker,
        )
    }

    /// Write the seed ISO to `out` (its two files in a scratch folder beside it).
    pub fn write_iso(&self, out: &Path) -> Result<(), SeedError> {
        self.check()?;
        let io = |path: &Path| {
            let path = path.to_path_buf();
            move |source| SeedError::Io { path, source }
        };
        let dir = out.with_extension("seed.d");
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).map_err(io(&dir))?;
        let (meta, user) = (dir.join("meta-data"), dir.join("user-data"));
        std::fs::write(&meta, self.meta_data()).map_err(io(&meta))?;
        std::fs::write(&user, self.user_data()).map_err(io(&user))?;
        let run = Command::new("genisoimage")
            .args(["-quiet", "-volid", "cidata", "-joliet", "-rock", "-output"])
            .arg(out)
            .arg(&user)
            .arg(&meta)
            .output();
        let _ = std::fs::remove_dir_all(&dir);
        match run {
            Ok(o) if o.status.success() => Ok(()),
            Ok(o) => Err(SeedError::Genisoimage { detail: String::from_utf8_lossy(&o.stderr).trim().to_string() }),
            Err(e) => Err(SeedError::Genisoimage { detail: e.to_string() }),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn seed() -> NoCloudSeed {
        NoCloudSeed {
            instance_id: "base-b1".into(),
            hostname: "b1".into(),
            user: "operator".into(),
            ssh_key: Some("ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAAIG9f me@host".into()),
            ready_marker: "cloud-init-done-b1".into(),
        }
    }

    #[test]
    fn user_data_is_cloud_config_with_user_key_and_marker() {
        let u = seed().user_data();
        assert!(u.starts_with("#cloud-config\nusers:\n  - name: operator\n"), "{u}");
        assert!(u.contains("      - \"ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAAIG9f me@host\"\n"), "{u}");
        assert!(u.ends_with("runcmd:\n  - [sh, -c, 'echo cloud-init-done-b1 > /dev/ttyS0']\n"), "{u}");
        assert_eq!(seed().meta_data(), "instance-id: base-b1\nlocal-hostname: b1\n");
    }

    #[test]
    fn words_that_would_change_the_yaml_are_refused() {
        let mut s = seed();
        s.user = "root\n  - name: x".into();
        assert!(matches!(s.check(), Err(SeedError::NotPlain { what: "user name", .. })));
        let mut s = seed();
        s.ssh_key = Some("ssh-rsa AAAA\"\nruncmd: [reboot]".into());
        assert!(matches!(s.check(), Err(SeedError::BadSshKey)));
        let mut s = seed();
        s.ssh_key = Some("not a key".into());
        assert!(s.check().is_err());
        assert!(seed().check().is_ok());
    }

    #[test]
    fn iso_is_labelled_cidata() {
        if Command::new("genisoimage").arg("--version").output().is_err() {
            eprintln!("genisoimage missing (scripts/deps.sh installs it): skipped");
            return;
        }
        let dir = tempfile::tempdir().unwrap();
        let iso = dir.path().join("seed.iso");
        seed().write_iso(&iso).unwrap();
        let bytes = std::fs::read(&iso).unwrap();
        // The primary volume descriptor at 32 KiB: type 1, "CD001", volume id at byte 40.
        assert_eq!(&bytes[32768..32774], b"\x01CD001");
        assert_eq!(&bytes[32768 + 40..32768 + 46], b"cidata");
        assert!(!dir.path().join("seed.seed.d").exists(), "scratch removed");
    }
}
