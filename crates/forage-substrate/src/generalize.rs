//! Generalizing a public substrate's guest on activation: every activation of one
//! substrate would otherwise be the same machine (same host name, same
//! `/etc/machine-id`, same SSH host keys). The forage agent runs one shell script in the
//! guest that renews what the guest has and prints what it renewed:
//!
//! - `hostname`: a random `forage-XXXXXXXX`, in the kernel and `/etc/hostname` (and the
//!   `127.0.1.1` line of `/etc/hosts`, where there is one);
//! - `machine-id`: a fresh random id in `/etc/machine-id` (the kernel's UUID generator).
//!   Running programs keep the id they read at start (systemd itself, the journal); what
//!   starts afterwards reads the new one;
//! - `ssh-host-keys`: `/etc/ssh/ssh_host_*` removed and regenerated (`ssh-keygen -A`),
//!   only where the guest has them (an image without an SSH server has none).
//!
//! Why a script through forage's own agent rather than cloud-init's per-instance run or
//! qemu-ga: every forage guest runs the agent (the tiny guest has neither cloud-init nor
//! qemu-ga) and the activation already holds a connection to it; cloud-init would need
//! a new instance id and a seed per activation and runs for seconds under TCG.

use std::time::Duration;

use forage_agent::{AgentClient, AgentError};

/// The script: POSIX sh and busybox tools only, so that it runs in every forage guest.
const RENEW: &str = r#"renewed=""
name="forage-$(tr -dc 0-9a-f < /proc/sys/kernel/random/uuid | head -c 8)"
if echo "$name" > /proc/sys/kernel/hostname; then
  echo "$name" > /etc/hostname 2>/dev/null
  if [ -f /etc/hosts ] && grep -q '^127\.0\.1\.1' /etc/hosts; then
    sed -i "s/^127\.0\.1\.1.*/127.0.1.1\t$name/" /etc/hosts
  fi
  renewed="hostname"
fi
# In place, not renamed over: systemd may have bind-mounted /run/machine-id there.
if [ -f /etc/machine-id ] && tr -d - < /proc/sys/kernel/random/uuid > /etc/machine-id; then
  renewed="$renewed machine-id"
fi
if ls /etc/ssh/ssh_host_*_key >/dev/null 2>&1 && command -v ssh-keygen >/dev/null \
    && rm -f /etc/ssh/ssh_host_* && ssh-keygen -A >/dev/null; then
  renewed="$renewed ssh-host-keys"
fi
sync
echo $renewed
"#;

/// Renew the guest's identity through `agent`; what it renewed.
pub fn renew(agent: &mut AgentClient) -> Result<Vec<String>, AgentError> {
    let out = agent.exec_ok(&["sh", "-c", RENEW], Duration::from_secs(60))?;
    Ok(out.stdout.split_whitespace().map(str::to_string).collect())
}
