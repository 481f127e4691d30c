//! Where a handoff's time went, read from its trace (issue #17 asks, for every target
//! missed, where the time goes).
//!
//! Each 100 ms tick of the stream is put in one of three kinds:
//! - **link**: something encoded was not yet acknowledged at the tick, or an
//!   acknowledgement came during it: the link (or the destination applying a segment)
//!   had work;
//! - **encoders**: nothing in flight while the encoders worked: the link waited for them;
//! - **waiting for pages**: nothing to encode and nothing in flight: QEMU was held
//!   between its iterations, or had not yet found new dirty pages.
//!
//! The split is as fine as the tick: a segment sent and acknowledged within one tick
//! makes the whole tick the link's.

use serde::{Deserialize, Serialize};

use crate::pipeline::TraceRow;

/// Seconds of a span of the stream by what held it up.
#[derive(Debug, Clone, Copy, Default, PartialEq, Serialize, Deserialize)]
pub struct TimeAccount {
    pub link_s: f64,
    pub encoders_s: f64,
    pub waiting_s: f64,
}

impl TimeAccount {
    /// The ticks of `trace` that end in `(from_s, to_s]` (seconds of the trace's clock).
    pub fn of(trace: &[TraceRow], from_s: f64, to_s: f64) -> Self {
        let mut account = TimeAccount::default();
        let (mut prev_t, mut prev_acked) = (0.0, 0u64);
        for r in trace {
            let dt = (r.t_s - prev_t).max(0.0);
            let acked_now = r.acked_bytes > prev_acked;
            (prev_t, prev_acked) = (r.t_s, r.acked_bytes);
            if r.t_s <= from_s || r.t_s > to_s {
                continue;
            }
            if r.in_flight_bytes > 0 || acked_now {
                account.link_s += dt;
            } else if r.encoding {
                account.encoders_s += dt;
            } else {
                account.waiting_s += dt;
            }
        }
        account
    }

    pub fn total_s(&self) -> f64 {
        self.link_s + self.encoders_s + self.waiting_s
    }
}

impl std::fmt::Display for TimeAccount {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "{:.1} s (link {:.1}, encoders {:.1}, waiting for pages {:.1})",
            self.total_s(),
            self.link_s,
            self.encoders_s,
            self.waiting_s
        )
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn tick(t_s: f64, acked_bytes: u64, in_flight_bytes: u64, encoding: bool) -> TraceRow {
        TraceRow { t_s, acked_bytes, in_flight_bytes, encoding, ..Default::default() }
    }

    #[test]
    fn each_tick_goes_to_the_link_the_encoders_or_the_wait_for_pages() {
        let trace = [
            tick(0.1, 0, 0, true),        // encoding, nothing sent yet: encoders
            tick(0.2, 0, 5000, true),     // in flight: link
            tick(0.3, 5000, 0, false),    // acknowledged during the tick: link
            tick(0.4, 5000, 0, false),    // nothing at all: waiting
            tick(0.5, 5000, 0, false),    // waiting
            tick(0.6, 9000, 2000, false), // link
        ];
        let all = TimeAccount::of(&trace, 0.0, 1.0);
        let near = |a: f64, b: f64| (a - b).abs() < 1e-9;
        assert!(near(all.link_s, 0.3) && near(all.encoders_s, 0.1) && near(all.waiting_s, 0.2), "{all:?}");
        assert!(near(all.total_s(), 0.6));
        // A span takes the ticks that end in it, each as long as it was.
        let tail = TimeAccount::of(&trace, 0.35, 0.6);
        assert!(near(tail.link_s, 0.1) && near(tail.waiting_s, 0.2) && tail.encoders_s == 0.0, "{tail:?}");
        assert_eq!(TimeAccount::of(&[], 0.0, 1.0), TimeAccount::default());
    }
}
