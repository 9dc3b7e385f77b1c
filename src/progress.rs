//! Progress bars: drawn on a terminal, hidden otherwise (the stages then log a line instead).

use indicatif::{ProgressBar, ProgressStyle};

/// A bar `prefix [====>   ] pos/len unit elapsed<eta message`.
pub fn bar(len: usize, prefix: &str, unit: &str) -> ProgressBar {
    let b = ProgressBar::new(len as u64);
    b.set_style(
        ProgressStyle::with_template(&format!(
            "{{prefix}} [{{bar:30}}] {{pos}}/{{len}} {unit} {{elapsed}}<{{eta}} {{msg}}"
        ))
        .expect("valid template")
        .progress_chars("=> "),
    );
    b.set_prefix(prefix.to_string());
    b
}
