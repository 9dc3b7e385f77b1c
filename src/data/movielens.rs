//! MovieLens readers: ML-1M (`.dat`), ML-100K (`u.data`/`u.item`) and the CSV releases
//! (ml-latest-small, ml-25m). Item text for prompts is "Title (year); genres: a, b".

use std::path::Path;

use super::lines::{numbered, rating_field, read_text, timestamp_field, Encoding};
use super::{required_file, DataError, ItemInfo, RawLog};

/// ML-100K genre columns of `u.item`, in file order (from its `u.genre`).
const ML100K_GENRES: [&str; 19] = [
    "unknown",
    "Action",
    "Adventure",
    "Animation",
    "Children's",
    "Comedy",
    "Crime",
    "Documentary",
    "Drama",
    "Fantasy",
    "Film-Noir",
    "Horror",
    "Musical",
    "Mystery",
    "Romance",
    "Sci-Fi",
    "Thriller",
    "War",
    "Western",
];

/// ML-1M: `ratings.dat` `UserID::MovieID::Rating::Timestamp`, `movies.dat` `MovieID::Title::Genres`.
pub fn read_ml1m(dir: &Path) -> Result<RawLog, DataError> {
    let mut log = RawLog::default();
    let ratings = required_file(dir, "ratings.dat", "UserID::MovieID::Rating::Timestamp lines (ml-1m)")?;
    let text = read_text(&ratings, Encoding::Latin1)?;
    for (line, l) in numbered(&text) {
        let f: Vec<&str> = l.split("::").collect();
        if f.len() != 4 {
            return Err(DataError::row(
                &ratings,
                line,
                format!("expected 4 fields UserID::MovieID::Rating::Timestamp separated by '::', found {}", f.len()),
            ));
        }
        let rating = rating_field(&ratings, line, "Rating", f[2])?;
        let ts = timestamp_field(&ratings, line, "Timestamp", f[3])?;
        log.push(f[0].trim(), f[1].trim(), ts, rating);
    }
    let movies = required_file(dir, "movies.dat", "MovieID::Title::Genres lines (ml-1m)")?;
    let text = read_text(&movies, Encoding::Latin1)?;
    for (line, l) in numbered(&text) {
        let f: Vec<&str> = l.split("::").collect();
        if f.len() < 3 {
            return Err(DataError::row(
                &movies,
                line,
                format!("expected 3 fields MovieID::Title::Genres separated by '::', found {}", f.len()),
            ));
        }
        let title = f[1..f.len() - 1].join("::");
        let genres: Vec<&str> = f[f.len() - 1].split('|').collect();
        log.set_info(f[0].trim(), movie_info(&title, &genres));
    }
    Ok(log)
}

/// ML-100K: `u.data` `user\titem\trating\ttimestamp`, `u.item` `id|title|date|video date|url|19 genre flags`.
pub fn read_ml100k(dir: &Path) -> Result<RawLog, DataError> {
    let mut log = RawLog::default();
    let data = required_file(dir, "u.data", "tab-separated user item rating timestamp lines (ml-100k)")?;
    let text = read_text(&data, Encoding::Latin1)?;
    for (line, l) in numbered(&text) {
        let f: Vec<&str> = l.split('\t').collect();
        if f.len() != 4 {
            return Err(DataError::row(
                &data,
                line,
                format!("expected 4 tab-separated fields user item rating timestamp, found {}", f.len()),
            ));
        }
        let rating = rating_field(&data, line, "rating", f[2])?;
        let ts = timestamp_field(&data, line, "timestamp", f[3])?;
        log.push(f[0].trim(), f[1].trim(), ts, rating);
    }
    let items = required_file(dir, "u.item", "'|'-separated movie lines (ml-100k)")?;
    let text = read_text(&items, Encoding::Latin1)?;
    for (line, l) in numbered(&text) {
        let f: Vec<&str> = l.split('|').collect();
        if f.len() != 5 + ML100K_GENRES.len() {
            return Err(DataError::row(
                &items,
                line,
                format!(
                    "expected 24 '|'-separated fields (id|title|date|video date|url|19 genre flags), found {}",
                    f.len()
                ),
            ));
        }
        let genres: Vec<&str> =
            ML100K_GENRES.iter().zip(&f[5..]).filter(|(_, flag)| flag.trim() == "1").map(|(g, _)| *g).collect();
        log.set_info(f[0].trim(), movie_info(f[1], &genres));
    }
    Ok(log)
}

/// MovieLens CSV: `ratings.csv` (userId,movieId,rating,timestamp) and `movies.csv` (movieId,title,genres).
pub fn read_csv(dir: &Path) -> Result<RawLog, DataError> {
    let mut log = RawLog::default();
    let ratings = required_file(dir, "ratings.csv", "userId,movieId,rating,timestamp (MovieLens CSV)")?;
    let mut rows = super::generic::CsvRows::open(&ratings, &["userId", "movieId", "rating", "timestamp"])?;
    while let Some((line, r)) = rows.next_row()? {
        let rating = rating_field(&ratings, line, "rating", r[2])?;
        let ts = timestamp_field(&ratings, line, "timestamp", r[3])?;
        log.push(r[0].trim(), r[1].trim(), ts, rating);
    }
    let movies = required_file(dir, "movies.csv", "movieId,title,genres (MovieLens CSV)")?;
    let mut rows = super::generic::CsvRows::open(&movies, &["movieId", "title", "genres"])?;
    while let Some((_, r)) = rows.next_row()? {
        let genres: Vec<&str> = r[2].split('|').filter(|g| *g != "(no genres listed)").collect();
        log.set_info(r[0].trim(), movie_info(r[1], &genres));
    }
    Ok(log)
}

/// "Usual Suspects, The (1995)" → title "The Usual Suspects", text "The Usual Suspects (1995); genres: …".
pub fn movie_info(raw_title: &str, genres: &[&str]) -> ItemInfo {
    let raw_title = raw_title.trim();
    let (name, year) = split_year(raw_title);
    let title = move_article(name);
    let mut text = match year {
        Some(y) => format!("{title} ({y})"),
        None => title.clone(),
    };
    let genres: Vec<&str> = genres.iter().map(|g| g.trim()).filter(|g| !g.is_empty()).collect();
    if !genres.is_empty() {
        text.push_str("; genres: ");
        text.push_str(&genres.join(", "));
    }
    ItemInfo { title, text }
}

fn split_year(t: &str) -> (&str, Option<&str>) {
    if let Some(open) = t.rfind('(') {
        let inner = &t[open + 1..];
        if let Some(y) = inner.strip_suffix(')') {
            if y.len() == 4 && y.bytes().all(|b| b.is_ascii_digit()) {
                return (t[..open].trim_end(), Some(y));
            }
        }
    }
    (t, None)
}

fn move_article(name: &str) -> String {
    for art in ["The", "A", "An", "Les", "La", "Le", "L'", "Il", "Das", "Die", "Der", "El"] {
        let suffix = format!(", {art}");
        if let Some(stem) = name.strip_suffix(&suffix) {
            let sep = if art.ends_with('\'') { "" } else { " " };
            return format!("{art}{sep}{stem}");
        }
    }
    name.to_string()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn titles_get_year_genres_and_leading_article() {
        let i = movie_info("Usual Suspects, The (1995)", &["Crime", "Thriller"]);
        assert_eq!(i.title, "The Usual Suspects");
        assert_eq!(i.text, "The Usual Suspects (1995); genres: Crime, Thriller");
        let i = movie_info("Babe (1995)", &[]);
        assert_eq!(i.text, "Babe (1995)");
        let i = movie_info("Cosmos", &["Documentary"]);
        assert_eq!(i.text, "Cosmos; genres: Documentary");
    }
}
