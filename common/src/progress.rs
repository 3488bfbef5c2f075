//! Progress of long transfers: a bar with bytes, rate and ETA on a terminal, plain
//! lines on stderr every few seconds otherwise (logs, CI), so that scripts and
//! people both see that something moves.

use std::io::IsTerminal;
use std::time::{Duration, Instant};

use indicatif::{ProgressBar, ProgressStyle};

/// Time between two plain progress lines.
const LINE_EVERY: Duration = Duration::from_secs(5);

/// Progress of one transfer of `total` bytes.
#[derive(Debug)]
pub struct Progress {
    what: String,
    total: u64,
    done: u64,
    started: Instant,
    last_line: Instant,
    bar: Option<ProgressBar>,
    /// Shows nothing (a worker moving checkpoints and datasets).
    quiet: bool,
}

impl Progress {
    /// Starts showing the progress of `what` (e.g. "push data.csv").
    pub fn new(what: &str, total: u64) -> Progress {
        let bar = std::io::stderr().is_terminal().then(|| {
            let bar = ProgressBar::new(total);
            let style = ProgressStyle::with_template(
                "{msg} [{bar:30}] {bytes}/{total_bytes} {bytes_per_sec} eta {eta}",
            )
            .unwrap_or_else(|_| ProgressStyle::default_bar())
            .progress_chars("=> ");
            bar.set_style(style);
            bar.set_message(what.to_string());
            bar
        });
        Progress {
            bar,
            quiet: false,
            ..Progress::quiet(what, total)
        }
    }

    /// Counts progress without showing it.
    pub fn quiet(what: &str, total: u64) -> Progress {
        let now = Instant::now();
        Progress {
            what: what.to_string(),
            total,
            done: 0,
            started: now,
            last_line: now,
            bar: None,
            quiet: true,
        }
    }

    /// Counts `bytes` more as done.
    pub fn advance(&mut self, bytes: u64) {
        self.done += bytes;
        match &self.bar {
            Some(bar) => bar.set_position(self.done),
            None if !self.quiet && self.last_line.elapsed() >= LINE_EVERY => {
                self.last_line = Instant::now();
                eprintln!("{}", self.line());
            }
            None => {}
        }
    }

    fn line(&self) -> String {
        let secs = self.started.elapsed().as_secs_f64().max(1e-9);
        let rate = self.done as f64 / secs;
        let eta = if rate > 0.0 && self.total > self.done {
            format!("{:.0}s", (self.total - self.done) as f64 / rate)
        } else {
            "-".into()
        };
        format!(
            "{}: {:.1}/{:.1} MB, {:.1} MB/s, eta {eta}",
            self.what,
            self.done as f64 / 1e6,
            self.total as f64 / 1e6,
            rate / 1e6
        )
    }

    /// Ends the display.
    pub fn finish(self) {
        if let Some(bar) = self.bar {
            bar.finish_and_clear();
        }
    }
}
