//! Progress lines of long work: recovery at open ([`crate::engine::OpenOptions::progress`]),
//! and the `refctl` commands that read a whole device.

use std::time::{Duration, Instant};

/// Items (extents, log records) between two clock reads of [`Progress`].
pub const PROGRESS_CHECK_ITEMS: usize = 16 * 1024;

/// Progress lines of long work (recovery, `refctl fsck` / `dump`), for a
/// person watching:
/// nothing until a step has run for [`Progress::EVERY`], then one line
/// per period (so small devices print nothing).
pub struct Progress {
    print: Box<dyn FnMut(&str)>,
    every: Duration,
    start: Instant,
    last: Instant,
}

impl std::fmt::Debug for Progress {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Progress")
            .field("every", &self.every)
            .field("start", &self.start)
            .finish()
    }
}

impl Progress {
    /// Time between two lines.
    pub const EVERY: Duration = Duration::from_secs(2);

    /// Lines go to `print` (e.g. a function that writes them to stderr),
    /// one per [`Progress::EVERY`] at most.
    pub fn new(print: impl FnMut(&str) + 'static) -> Progress {
        Progress::with_period(print, Self::EVERY)
    }

    /// [`Progress::new`] with another period.
    pub fn with_period(print: impl FnMut(&str) + 'static, every: Duration) -> Progress {
        let now = Instant::now();
        Progress {
            print: Box::new(print),
            every,
            start: now,
            last: now,
        }
    }

    /// Prints `what()` (with the time since the start) if a period passed.
    pub fn tick(&mut self, what: impl FnOnce() -> String) {
        let now = Instant::now();
        if now.duration_since(self.last) >= self.every {
            self.last = now;
            (self.print)(&format!(
                "{} ({:.0} s)",
                what(),
                now.duration_since(self.start).as_secs_f64()
            ));
        }
    }
}

#[cfg(test)]
mod tests {
    use super::Progress;
    use std::sync::{Arc, Mutex};
    use std::time::Duration;

    #[test]
    fn progress_prints_once_per_period() {
        let lines = Arc::new(Mutex::new(Vec::<String>::new()));
        let sink = Arc::clone(&lines);
        let mut quiet = Progress::with_period(
            move |l: &str| sink.lock().unwrap().push(l.to_string()),
            Duration::from_secs(3600),
        );
        quiet.tick(|| "never".into());
        assert!(lines.lock().unwrap().is_empty(), "nothing within a period");
        let sink = Arc::clone(&lines);
        let mut every = Progress::with_period(
            move |l: &str| sink.lock().unwrap().push(l.to_string()),
            Duration::ZERO,
        );
        every.tick(|| "checked 1 extents".into());
        every.tick(|| "checked 2 extents".into());
        let got = lines.lock().unwrap().clone();
        assert_eq!(got.len(), 2, "{got:?}");
        assert!(got[1].starts_with("checked 2 extents ("), "{got:?}");
    }
}
