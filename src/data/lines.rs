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

/// Largest timestamp accepted: 10^14 (seconds or milliseconds since 1970; anything above is a
/// corrupt value that would otherwise become a user's newest, held-out interaction).
pub const MAX_TIMESTAMP: i64 = 100_000_000_000_000;

/// A rating: any finite number (`inf` and `NaN` parse as floats but order nothing).
pub fn rating(path: &Path, line: usize, name: &str, value: f64) -> Result<f32, DataError> {
    if value.is_finite() && value.abs() <= f32::MAX as f64 {
        Ok(value as f32)
    } else {
        Err(DataError::row(path, line, format!("column {name}: expected a finite number, found {value}")))
    }
}

/// A timestamp in [0, [`MAX_TIMESTAMP`]].
pub fn timestamp(path: &Path, line: usize, name: &str, value: i64) -> Result<i64, DataError> {
    if (0..=MAX_TIMESTAMP).contains(&value) {
        Ok(value)
    } else {
        Err(DataError::row(
            path,
            line,
            format!("column {name}: expected seconds (or milliseconds) since 1970 in [0, 1e14], found {value}"),
        ))
    }
}

/// [`field`] for the rating column, checked by [`rating`].
pub fn rating_field(path: &Path, line: usize, name: &str, value: &str) -> Result<f32, DataError> {
    let v: f64 = field(path, line, name, value)?;
    rating(path, line, name, v)
}

/// [`field`] for the timestamp column, checked by [`timestamp`].
pub fn timestamp_field(path: &Path, line: usize, name: &str, value: &str) -> Result<i64, DataError> {
    let v: i64 = field(path, line, name, value)?;
    timestamp(path, line, name, v)
}
