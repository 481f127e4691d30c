//! The host the cloudlet runs on, read from `/proc` (Linux).

use crate::views_live::HostView;

/// The host now. Anything `/proc` does not say reads as zero or empty.
pub fn host() -> HostView {
    let read = |p: &str| std::fs::read_to_string(p).unwrap_or_default();
    let meminfo = read("/proc/meminfo");
    let kib = |key: &str| {
        meminfo
            .lines()
            .find(|l| l.starts_with(key))
            .and_then(|l| l.split_whitespace().nth(1)?.parse::<u64>().ok())
            .unwrap_or(0)
            * 1024
    };
    let loadavg = read("/proc/loadavg");
    let mut load = [0.0; 3];
    for (slot, v) in load.iter_mut().zip(loadavg.split_whitespace()) {
        *slot = v.parse().unwrap_or(0.0);
    }
    let uptime = read("/proc/uptime");
    let kernel = format!("{} {}", read("/proc/sys/kernel/ostype").trim(), read("/proc/sys/kernel/osrelease").trim())
        .trim()
        .to_string();
    HostView {
        hostname: read("/proc/sys/kernel/hostname").trim().to_string(),
        kernel,
        cores: std::thread::available_parallelism().map_or(1, |n| n.get() as u32),
        load,
        memory_total_bytes: kib("MemTotal:"),
        memory_available_bytes: kib("MemAvailable:"),
        host_uptime_s: uptime.split_whitespace().next().and_then(|u| u.parse::<f64>().ok()).unwrap_or(0.0) as u64,
    }
}

#[cfg(test)]
mod tests {
    #[test]
    fn this_host_is_described() {
        let h = super::host();
        assert!(!h.hostname.is_empty() && h.kernel.starts_with("Linux"), "{h:?}");
        assert!(h.cores >= 1 && h.memory_total_bytes >= h.memory_available_bytes && h.memory_available_bytes > 0);
    }
}
