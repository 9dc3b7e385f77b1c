//! Progress bars: drawn on a terminal; elsewhere (CI, log files) the same line as plain text,
//! through the log, at most once per [`PLAIN_EVERY`] (and the last state when the stage ends), with
//! no colour codes or cursor moves.

use std::sync::Mutex;
use std::time::{Duration, Instant};

use indicatif::{ProgressBar, ProgressDrawTarget, ProgressStyle, TermLike};

/// The least time between two plain progress lines.
pub const PLAIN_EVERY: Duration = Duration::from_secs(10);

/// A bar `prefix [====>   ] pos/len unit elapsed<eta message` on a terminal, or a line
/// `prefix pos/len unit, rate/s, elapsed, ETA, message` every [`PLAIN_EVERY`] otherwise.
pub fn bar(len: usize, prefix: &str, unit: &str) -> ProgressBar {
    let b = ProgressBar::new(len as u64);
    if std::io::IsTerminal::is_terminal(&std::io::stderr()) {
        b.set_style(
            ProgressStyle::with_template(&format!(
                "{{prefix}} [{{bar:30}}] {{pos}}/{{len}} {unit} {{elapsed}}<{{eta}} {{msg}}"
            ))
            .expect("valid template")
            .progress_chars("=> "),
        );
    } else {
        b.set_draw_target(ProgressDrawTarget::term_like(Box::new(PlainLines::new(PLAIN_EVERY))));
        b.set_style(
            ProgressStyle::with_template(&format!(
                "{{prefix}} {{pos}}/{{len}} {unit}, {{per_sec}}, {{elapsed}} elapsed, ETA {{eta}} {{msg}}"
            ))
            .expect("valid template"),
        );
    }
    b.set_prefix(prefix.to_string());
    b
}

/// A draw target that writes the bar's line to the log when `every` has passed since the last
/// one, and the last line not yet written when it is dropped (the stage ended).
#[derive(Debug)]
struct PlainLines {
    every: Duration,
    state: Mutex<Plain>,
}

#[derive(Debug, Default)]
struct Plain {
    last: Option<Instant>,
    pending: Option<String>,
    written: String,
}

impl PlainLines {
    fn new(every: Duration) -> Self {
        Self { every, state: Mutex::new(Plain::default()) }
    }

    fn put(&self, s: &str) {
        let s = s.trim();
        if !s.is_empty() {
            self.state.lock().unwrap_or_else(|p| p.into_inner()).pending = Some(s.to_string());
        }
    }
}

impl Plain {
    fn emit(&mut self) {
        if let Some(line) = self.pending.take() {
            if line != self.written {
                tracing::info!("{line}");
                self.written = line;
            }
            self.last = Some(Instant::now());
        }
    }
}

impl TermLike for PlainLines {
    fn width(&self) -> u16 {
        200
    }
    fn move_cursor_up(&self, _: usize) -> std::io::Result<()> {
        Ok(())
    }
    fn move_cursor_down(&self, _: usize) -> std::io::Result<()> {
        Ok(())
    }
    fn move_cursor_right(&self, _: usize) -> std::io::Result<()> {
        Ok(())
    }
    fn move_cursor_left(&self, _: usize) -> std::io::Result<()> {
        Ok(())
    }
    fn write_line(&self, s: &str) -> std::io::Result<()> {
        self.put(s);
        Ok(())
    }
    fn write_str(&self, s: &str) -> std::io::Result<()> {
        self.put(s);
        Ok(())
    }
    fn clear_line(&self) -> std::io::Result<()> {
        Ok(())
    }
    fn flush(&self) -> std::io::Result<()> {
        let mut st = self.state.lock().unwrap_or_else(|p| p.into_inner());
        if st.last.is_none_or(|t| t.elapsed() >= self.every) {
            st.emit();
        }
        Ok(())
    }
}

impl Drop for PlainLines {
    fn drop(&mut self) {
        self.state.get_mut().unwrap_or_else(|p| p.into_inner()).emit();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn plain_lines_are_throttled_and_the_last_state_is_written_at_the_end() {
        let t = PlainLines::new(Duration::from_secs(3600));
        t.write_str("a 0/3").unwrap();
        t.flush().unwrap(); // the first state: written
        assert_eq!(t.state.lock().unwrap().written, "a 0/3");
        t.write_str("a 1/3").unwrap();
        t.flush().unwrap(); // within the period: held
        t.write_str("a 2/3").unwrap();
        t.flush().unwrap();
        assert_eq!(t.state.lock().unwrap().written, "a 0/3");
        assert_eq!(t.state.lock().unwrap().pending.as_deref(), Some("a 2/3"));
        let mut t = t;
        t.state.get_mut().unwrap().emit(); // what drop does
        assert_eq!(t.state.lock().unwrap().written, "a 2/3");
    }
}
