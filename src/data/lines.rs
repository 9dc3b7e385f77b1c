//! Line-oriented text files: decoding (UTF-8 or latin-1) and numbered, non-empty lines.

use std::path::Path;

use super::DataError;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Encoding {
    Utf8,
    /// ISO-8859-1, as the MovieLens `.dat`/`u.item` files use: every byte is one code point.
    Latin1,
}

/// Read a whole text file, failing on an empty file (nothing to prepare from).
pub fn read_text(path: &Path, enc: Encoding) -> Result<String, DataError> {
    let bytes = std::fs::read(path).map_err(|e| DataError::io(path, e))?;
    if bytes.iter().all(|b| b.is_ascii_whitespace()) {
        return Err(DataError::file(path, "file is empty"));
    }
    match enc {
        Encoding::Latin1 => Ok(bytes.iter().map(|&b| b as char).collect()),
        Encoding::Utf8 => String::from_utf8(bytes).map_err(|e| {
            let line = 1 + e.as_bytes()[..e.utf8_error().valid_up_to()].iter().filter(|&&b| b == b'\n').count();
            DataError::row(path, line, "invalid UTF-8")
        }),
    }
}

/// Non-blank lines with their 1-based line numbers, trailing `\r` removed.
pub fn numbered(text: &str) -> impl Iterator<Item = (usize, &str)> {
    text.lines().enumerate().map(|(i, l)| (i + 1, l.trim_end_matches('\r'))).filter(|(_, l)| !l.trim().is_empty())
}

/// Parse one field, with an error that names the column and what was expected.
pub fn field<T: std::str::FromStr>(path: &Path, line: usize, name: &str, value: &str) -> Result<T, DataError> {
    value
        .trim()
        .parse()
        .map_err(|_| DataError::row(path, line, format!("column {name}: expected {}, found '{value}'", kind_of::<T>())))
}

fn kind_of<T>() -> &'static str {
    if std::any::type_name::<T>().starts_with('f') {
        "a number"
    } else {
        "an integer"
    }
}
