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
                "{{prefix}} [{{bar:30}}] {{pos}}/{{len}} {unit} {{elapsed}}<{{mean_eta}} {{msg}}"
            ))
            .expect("valid template")
            .with_key("mean_eta", mean_eta)
            .progress_chars("=> "),
        );
    } else {
        b.set_draw_target(ProgressDrawTarget::term_like(Box::new(PlainLines::new(PLAIN_EVERY))));
        b.set_style(
            ProgressStyle::with_template(&format!(
                "{{prefix}} {{pos}}/{{len}} {unit}, {{mean_rate}}, {{elapsed}} elapsed, ETA {{mean_eta}} {{msg}}"
            ))
            .expect("valid template")
            .with_key("mean_rate", mean_rate)
            .with_key("mean_eta", mean_eta),
        );
    }
    b.set_prefix(prefix.to_string());
    b
}

/// Steps per second since the start (indicatif's own estimate weighs the last seconds, which for
/// steps of half a minute, like epochs, reads as a rate 20× too low and an ETA of hours).
fn mean_rate(state: &indicatif::ProgressState, w: &mut dyn std::fmt::Write) {
    let _ = w.write_str(&rate_text(state.pos(), state.elapsed().as_secs_f64()));
}

fn rate_text(pos: u64, secs: f64) -> String {
    let rate = if secs > 0.0 { pos as f64 / secs } else { 0.0 };
    if rate >= 1.0 || rate == 0.0 {
        format!("{rate:.1}/s")
    } else {
        format!("{:.1}s each", 1.0 / rate)
    }
}

/// The time left at the mean rate since the start (`?` before the first step).
fn mean_eta(state: &indicatif::ProgressState, w: &mut dyn std::fmt::Write) {
    let _ = w.write_str(&eta_text(state.pos(), state.len(), state.elapsed().as_secs_f64()));
}

fn eta_text(pos: u64, len: Option<u64>, secs: f64) -> String {
    if pos == 0 {
        return "?".into();
    }
    let left = len.unwrap_or(pos).saturating_sub(pos) as f64 * secs / pos as f64;
    indicatif::HumanDuration(Duration::from_secs_f64(left)).to_string()
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
    fn rate_and_eta_are_the_means_since_the_start() {
        // Two 30-second epochs of 30: 30 s each, 14 minutes left.
        assert_eq!(rate_text(2, 60.0), "30.0s each");
        assert_eq!(eta_text(2, Some(30), 60.0), "14 minutes");
        assert_eq!(rate_text(500, 10.0), "50.0/s");
        assert_eq!(eta_text(500, Some(1000), 10.0), "10 seconds");
        assert_eq!(eta_text(0, Some(10), 5.0), "?");
    }

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
