//! Generalizing a public substrate's guest on activation: every activation of one
//! substrate would otherwise be the same machine (same host name, same
//! `/etc/machine-id`, same SSH host keys). The forage agent runs one shell script in the
//! guest that renews what the guest has and prints what it renewed:
//!
//! - `hostname`: `forage-` and 8 hex digits of the host's seed, in the kernel and `/etc/hostname` (and the
//!   `127.0.1.1` line of `/etc/hosts`, where there is one);
//! - `machine-id`: 32 other hex digits of the host's seed in `/etc/machine-id`.
//!   Running programs keep the id they read at start (systemd itself, the journal); what
//!   starts afterwards reads the new one;
//! - `ssh-host-keys`: `/etc/ssh/ssh_host_*` removed and regenerated (`ssh-keygen -A`),
//!   only where the guest has them (an image without an SSH server has none).
//!
//! The randomness comes from the host, passed to the script as `$1` (64 hex digits):
//! every activation of one substrate resumes the same memory, the guest kernel's random
//! generator included, so ids drawn inside the guest came out the same in two activations
//! (CI saw one machine-id twice). The host's bytes name the host name and machine-id
//! directly, and are written into the guest's pool before `ssh-keygen`, with a reseed
//! (`RNDRESEEDCRNG`, through python3 where the guest has it) so the keys differ too.
//!
//! Why a script through forage's own agent rather than cloud-init's per-instance run or
//! qemu-ga: every forage guest runs the agent (the tiny guest has neither cloud-init nor
//! qemu-ga) and the activation already holds a connection to it; cloud-init would need
//! a new instance id and a seed per activation and runs for seconds under TCG.

use std::time::Duration;

use forage_agent::{AgentClient, AgentError};

/// The script: POSIX sh and busybox tools only, so that it runs in every forage guest.
const RENEW: &str = r#"renewed=""
seed="$1"
case "$seed" in *[!0-9a-f]*|"") echo "no seed from the host" >&2; exit 2;; esac
[ ${#seed} -eq 64 ] || { echo "no seed from the host" >&2; exit 2; }
name="forage-$(echo "$seed" | cut -c1-8)"
if echo "$name" > /proc/sys/kernel/hostname; then
  echo "$name" > /etc/hostname 2>/dev/null
  if [ -f /etc/hosts ] && grep -q '^127\.0\.1\.1' /etc/hosts; then
    sed -i "s/^127\.0\.1\.1.*/127.0.1.1\t$name/" /etc/hosts
  fi
  renewed="hostname"
fi
# In place, not renamed over: systemd may have bind-mounted /run/machine-id there.
if [ -f /etc/machine-id ] && echo "$seed" | cut -c33-64 > /etc/machine-id; then
  renewed="$renewed machine-id"
fi
echo "$seed" > /dev/urandom
command -v python3 >/dev/null && python3 -c 'import fcntl, os; fcntl.ioctl(os.open("/dev/urandom", os.O_WRONLY), 0x5207)' 2>/dev/null
if ls /etc/ssh/ssh_host_*_key >/dev/null 2>&1 && command -v ssh-keygen >/dev/null \
    && rm -f /etc/ssh/ssh_host_* && ssh-keygen -A >/dev/null; then
  renewed="$renewed ssh-host-keys"
fi
sync
echo $renewed
"#;

/// Renew the guest's identity through `agent`; what it renewed.
pub fn renew(agent: &mut AgentClient) -> Result<Vec<String>, AgentError> {
    let seed = host_seed().map_err(|source| AgentError::Local { path: "/dev/urandom".into(), source })?;
    let out = agent.exec_ok(&["sh", "-c", RENEW, "renew", &seed], Duration::from_secs(60))?;
    Ok(out.stdout.split_whitespace().map(str::to_string).collect())
}

/// 32 bytes from the host's random generator, as 64 hex digits.
fn host_seed() -> std::io::Result<String> {
    use std::io::Read;
    let mut b = [0u8; 32];
    std::fs::File::open("/dev/urandom")?.read_exact(&mut b)?;
    Ok(hex::encode(b))
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Seeds differ, and the script, run here by sh, stops before it changes anything
    /// when the seed is missing or malformed.
    #[test]
    fn a_missing_or_malformed_seed_changes_nothing() {
        let seed = host_seed().unwrap();
        assert_eq!(seed.len(), 64);
        assert_ne!(seed, host_seed().unwrap());
        for bad in ["", "xyz", &seed[..63]] {
            let out = std::process::Command::new("sh").args(["-c", RENEW, "renew", bad]).output().unwrap();
            assert_eq!(out.status.code(), Some(2), "{bad:?}: {out:?}");
        }
    }
}
