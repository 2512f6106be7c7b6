//! Progress bars for the terminal: drawn only when stderr is a terminal.

use std::io::IsTerminal;

use indicatif::{ProgressBar, ProgressDrawTarget, ProgressStyle};
use revive::progress::Progress;

/// An indicatif bar behind the library's [`Progress`] trait.
pub struct Bar {
    bar: ProgressBar,
}

impl Bar {
    /// A bar counting bytes.
    pub fn bytes(verb: &str) -> Bar {
        Self::with_template(
            verb,
            "{prefix} {wide_bar} {bytes}/{total_bytes} {bytes_per_sec} eta {eta} {msg}",
        )
    }

    /// A bar counting items.
    pub fn items(verb: &str) -> Bar {
        Self::with_template(verb, "{prefix} {wide_bar} {pos}/{len} eta {eta} {msg}")
    }

    fn with_template(verb: &str, template: &str) -> Bar {
        let bar = ProgressBar::hidden();
        if std::io::stderr().is_terminal() {
            bar.set_draw_target(ProgressDrawTarget::stderr());
        }
        if let Ok(style) = ProgressStyle::with_template(template) {
            bar.set_style(style);
        }
        bar.set_prefix(verb.to_string());
        Bar { bar }
    }

    /// Removes the bar from the terminal.
    pub fn finish(&self) {
        self.bar.finish_and_clear();
    }
}

impl Progress for Bar {
    fn set_total(&self, total: u64) {
        self.bar.set_length(total);
    }
    fn advance(&self, done: u64) {
        self.bar.inc(done);
    }
    fn set_phase(&self, phase: &str) {
        self.bar.set_message(phase.to_string());
    }
}
