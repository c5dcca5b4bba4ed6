//! Download progress: a bar per file on a terminal, one plain line per finished file
//! otherwise (what a log file or the server wants), for both hubs.

use indicatif::{HumanBytes, ProgressBar, ProgressDrawTarget, ProgressStyle};

/// A message line, as `whet sft` prints its set-up messages.
pub(super) fn line(text: &str) {
    crate::train::progress::print_line(text);
}

pub(super) struct DownloadProgress {
    bar: Option<ProgressBar>,
    file: String,
    size: usize,
    done: usize,
}

impl DownloadProgress {
    pub(super) fn new(show_bar: bool) -> DownloadProgress {
        let bar = show_bar.then(|| {
            let bar = ProgressBar::with_draw_target(Some(0), ProgressDrawTarget::stderr());
            bar.set_style(
                ProgressStyle::with_template(
                    "{msg:32} [{bar:30}] {bytes}/{total_bytes} {bytes_per_sec} ({eta})",
                )
                .expect("valid template")
                .progress_chars("=> "),
            );
            bar
        });
        DownloadProgress {
            bar,
            file: String::new(),
            size: 0,
            done: 0,
        }
    }
}

/// hf-hub calls `init` again when it resumes a file, so `init` resets rather than adds.
impl hf_hub::api::Progress for DownloadProgress {
    fn init(&mut self, size: usize, filename: &str) {
        self.size = size;
        self.done = 0;
        self.file = filename.to_string();
        if let Some(bar) = &self.bar {
            bar.set_length(size as u64);
            bar.set_position(0);
            bar.set_message(filename.to_string());
        }
    }

    fn update(&mut self, size: usize) {
        self.done += size;
        if let Some(bar) = &self.bar {
            bar.inc(size as u64);
        }
    }

    fn finish(&mut self) {
        match &self.bar {
            Some(bar) => bar.finish(),
            None => line(&format!(
                "Downloaded {} ({})",
                self.file,
                HumanBytes(self.done.max(self.size) as u64)
            )),
        }
    }
}
