//! The link of one set of handoff runs: a fixed rate, or a schedule of rates that
//! plays from the start of each handoff (the VM handoff paper's Figure 18: 5 -> 35 -> 5
//! Mbit/s), applied to the bench's `tc tbf` link.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use anyhow::{bail, Context};
use forage_testkit::wan::WanLink;

/// The link of one set of runs: a fixed rate, or steps of (seconds from the start of
/// each handoff, Mbit/s), the first at 0.
#[derive(Debug, Clone)]
pub enum Link {
    Fixed(f64),
    Schedule(Vec<(f64, f64)>),
}

impl Link {
    pub fn parse(s: &str) -> anyhow::Result<Self> {
        let mut steps = Vec::new();
        for part in s.split(',') {
            let (at, mbps) = part
                .split_once(':')
                .and_then(|(a, m)| Some((a.trim().parse::<f64>().ok()?, m.trim().parse::<f64>().ok()?)))
                .with_context(|| format!("--changing-link: {part:?} is not SECONDS:MBPS"))?;
            if !(at.is_finite() && at >= 0.0 && mbps.is_finite() && mbps > 0.0) {
                bail!("--changing-link: {part:?} is out of range");
            }
            if steps.last().is_some_and(|&(last, _)| at <= last) {
                bail!("--changing-link: the steps' seconds must increase");
            }
            steps.push((at, mbps));
        }
        if steps.first().map(|&(at, _)| at) != Some(0.0) {
            bail!("--changing-link: the first step is at 0 s");
        }
        Ok(Link::Schedule(steps))
    }

    pub fn first_mbps(&self) -> f64 {
        match self {
            Link::Fixed(m) => *m,
            Link::Schedule(s) => s[0].1,
        }
    }

    pub fn label(&self) -> String {
        match self {
            Link::Fixed(m) => m.to_string(),
            Link::Schedule(s) => s.iter().map(|(at, m)| format!("{at}:{m}")).collect::<Vec<_>>().join(","),
        }
    }
}

/// The link's schedule running; dropping it stops it.
pub struct Shaping {
    stop: Arc<AtomicBool>,
    handle: Option<std::thread::JoinHandle<()>>,
}

impl Drop for Shaping {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        if let Some(h) = self.handle.take() {
            let _ = h.join();
        }
    }
}

/// Set `link` on `wan` now; a schedule's later steps follow in a thread until the
/// returned guard drops.
pub fn shape(wan: &Arc<Mutex<WanLink>>, link: &Link) -> anyhow::Result<Shaping> {
    wan.lock().unwrap_or_else(|p| p.into_inner()).set_rate(link.first_mbps())?;
    let stop = Arc::new(AtomicBool::new(false));
    let handle = match link {
        Link::Fixed(_) => None,
        Link::Schedule(steps) => {
            let (steps, flag, shared) = (steps[1..].to_vec(), stop.clone(), wan.clone());
            Some(std::thread::spawn(move || {
                let t0 = Instant::now();
                for (at, mbps) in steps {
                    while t0.elapsed().as_secs_f64() < at {
                        if flag.load(Ordering::Relaxed) {
                            return;
                        }
                        std::thread::sleep(Duration::from_millis(20));
                    }
                    if let Err(e) = shared.lock().unwrap_or_else(|p| p.into_inner()).set_rate(mbps) {
                        eprintln!("changing the link to {mbps} Mbit/s: {e}");
                    }
                }
            }))
        }
    };
    Ok(Shaping { stop, handle })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn schedules_parse_and_refuse_nonsense() {
        let l = Link::parse("0:5,4:35,8:5").unwrap();
        assert_eq!(l.label(), "0:5,4:35,8:5");
        assert_eq!(l.first_mbps(), 5.0);
        for bad in ["", "4:35", "0:5,0:6", "0:5,x:3", "0:-1", "0:5,3"] {
            assert!(Link::parse(bad).is_err(), "{bad:?}");
        }
    }
}
