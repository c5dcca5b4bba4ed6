//! What a person watching `whet sft` sees: on a terminal, a progress bar with loss, learning
//! rate, tokens/s and ETA (messages print above it); otherwise plain lines on stdout, one per
//! message and one per logging.jsonl record, which is what a log file or the server wants.

use indicatif::{ProgressBar, ProgressStyle};

/// Writes a line to stdout, ignoring a closed pipe: a run must not die because nobody reads
/// its output any more (`println!` would panic).
pub(crate) fn print_line(text: &str) {
    use std::io::Write;
    let mut out = std::io::stdout().lock();
    let _ = writeln!(out, "{text}");
    let _ = out.flush();
}

pub struct Console {
    bar: Option<ProgressBar>,
    /// Ranks other than 0 stay silent: rank 0 speaks for the job.
    quiet: bool,
}

impl Console {
    /// A bar when `interactive` (stderr is a terminal), plain lines otherwise.
    pub fn new(interactive: bool) -> Self {
        // Hidden until `start`, so that set-up messages print as plain lines.
        let bar = interactive.then(|| {
            let bar = ProgressBar::hidden();
            bar.set_style(
                ProgressStyle::with_template(
                    "Train {bar:30} {pos}/{len} [{elapsed_precise}<{eta_precise}] {msg}",
                )
                .expect("valid template"),
            );
            bar
        });
        Self { bar, quiet: false }
    }

    /// Prints nothing (a rank other than 0).
    pub fn quiet() -> Self {
        Self {
            bar: None,
            quiet: true,
        }
    }

    /// Shows the bar from `done` of `total` steps.
    pub fn start(&self, done: u64, total: u64) {
        if let Some(bar) = &self.bar {
            bar.set_draw_target(indicatif::ProgressDrawTarget::stderr());
            bar.set_length(total);
            bar.set_position(done);
            bar.reset_eta();
        }
    }

    /// A message line (above the bar on a terminal).
    pub fn line(&self, text: &str) {
        if self.quiet {
            return;
        }
        match &self.bar {
            Some(bar) if !bar.is_hidden() => bar.println(text),
            _ => print_line(text),
        }
    }

    /// A logging.jsonl record: the bar's status on a terminal, a plain line otherwise.
    pub fn record(&self, json_line: &str) {
        if self.quiet {
            return;
        }
        match &self.bar {
            Some(bar) if !bar.is_hidden() => bar.println(json_line),
            _ => print_line(json_line),
        }
    }

    /// One optimizer step done.
    pub fn step(&self, step: u64, loss: f64, learning_rate: f64, tokens_per_second: f64) {
        if let Some(bar) = &self.bar {
            bar.set_position(step);
            bar.set_message(format!(
                "loss {loss:.4}  lr {learning_rate:.3e}  {tokens_per_second:.0} tok/s"
            ));
        }
    }

    pub fn finish(&self) {
        if let Some(bar) = &self.bar {
            bar.finish();
        }
    }
}
