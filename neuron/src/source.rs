//! Model resolution: from a load request's `source` to a GGUF file on this host, and where its
//! tokenizer comes from when the GGUF has none.
//!
//! - `file://` URIs must point into one of `--model-dirs`; `..` is refused before the path is
//!   looked at, and symlinks are resolved before the directory check.
//! - Hugging Face repositories go through `hf-hub` into the HF cache (`HF_HOME`, `HF_TOKEN`,
//!   `HF_ENDPOINT`); with `HF_HUB_OFFLINE=1` only the cache is read. `quant` picks the file.

use std::path::{Component, Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};

use hf_hub::api::tokio::{Api, ApiBuilder, Progress};
use hf_hub::{Cache, Repo, RepoType};

use crate::error::{Error, Result};

/// Checks a `file://` URI against the allowed directories and returns the file's real path.
pub fn resolve_uri(uri: &str, model_dirs: &[PathBuf]) -> Result<PathBuf> {
    let path = uri.strip_prefix("file://").ok_or_else(|| {
        Error::invalid(
            "source.uri",
            format!("unsupported uri '{uri}': only file:///absolute/path.gguf is supported; use {{\"repo\": …}} for Hugging Face"),
        )
    })?;
    let path = Path::new(path);
    if !path.is_absolute() {
        return Err(Error::invalid(
            "source.uri",
            format!("uri '{uri}' must hold an absolute path (file:///dir/model.gguf)"),
        ));
    }
    if path.components().any(|c| matches!(c, Component::ParentDir)) {
        return Err(Error::invalid(
            "source.uri",
            format!(
                "uri '{uri}' contains '..'; give the file's path inside one of the model directories"
            ),
        ));
    }
    let allowed = || {
        if model_dirs.is_empty() {
            "none (start the neuron with --model-dirs DIR)".to_string()
        } else {
            model_dirs
                .iter()
                .map(|d| d.display().to_string())
                .collect::<Vec<_>>()
                .join(", ")
        }
    };
    let lexically_inside = model_dirs.iter().any(|d| path.starts_with(d));
    if !lexically_inside {
        return Err(Error::invalid(
            "source.uri",
            format!(
                "uri '{uri}' is outside the model directories this neuron may read: {}; move the file there or add its directory to --model-dirs",
                allowed()
            ),
        ));
    }
    let real = path.canonicalize().map_err(|e| {
        Error::invalid(
            "source.uri",
            format!("cannot open '{}': {e}", path.display()),
        )
    })?;
    let inside = model_dirs
        .iter()
        .filter_map(|d| d.canonicalize().ok())
        .any(|d| real.starts_with(d));
    if !inside {
        return Err(Error::invalid(
            "source.uri",
            format!(
                "'{}' resolves to '{}', outside the model directories: {}",
                path.display(),
                real.display(),
                allowed()
            ),
        ));
    }
    if !real.is_file() {
        return Err(Error::invalid(
            "source.uri",
            format!("'{}' is not a file", real.display()),
        ));
    }
    Ok(real)
}

/// Quantisation names as they appear in GGUF file names, longest first so `Q4_K_M` wins over `Q4_K`.
const QUANTS: &[&str] = &[
    "IQ1_S", "IQ1_M", "IQ2_XXS", "IQ2_XS", "IQ2_S", "IQ2_M", "IQ3_XXS", "IQ3_XS", "IQ3_S", "IQ3_M",
    "IQ4_XS", "IQ4_NL", "Q2_K_L", "Q2_K_S", "Q3_K_XL", "Q3_K_L", "Q3_K_M", "Q3_K_S", "Q4_K_XL",
    "Q4_K_L", "Q4_K_M", "Q4_K_S", "Q5_K_XL", "Q5_K_L", "Q5_K_M", "Q5_K_S", "Q6_K_XL", "Q6_K_L",
    "Q8_K_XL", "Q2_K", "Q3_K", "Q4_K", "Q5_K", "Q6_K", "Q4_0_4_4", "Q4_0_4_8", "Q4_0_8_8", "Q4_0",
    "Q4_1", "Q5_0", "Q5_1", "Q8_0", "BF16", "F16", "F32",
];

/// The quantisation a GGUF file name carries, if any (`Qwen3-0.6B-Q4_K_M.gguf` → `Q4_K_M`).
pub fn quant_of(file: &str) -> Option<&'static str> {
    let stem = file.rsplit('/').next().unwrap_or(file).to_ascii_uppercase();
    let stem = stem.strip_suffix(".GGUF").unwrap_or(&stem);
    QUANTS.iter().copied().find(|q| {
        stem.match_indices(q).any(|(i, _)| {
            let before = stem[..i].chars().last();
            let after = stem[i + q.len()..].chars().next();
            before.is_none_or(|c| !c.is_ascii_alphanumeric())
                && after.is_none_or(|c| !c.is_ascii_alphanumeric() && c != '_')
        })
    })
}

/// Picks the GGUF file of a repository listing: `file` if given, else the one whose quant matches.
pub fn pick_file(
    repo: &str,
    files: &[String],
    quant: Option<&str>,
    file: Option<&str>,
) -> Result<String> {
    let ggufs: Vec<&String> = files
        .iter()
        .filter(|f| {
            f.to_ascii_lowercase().ends_with(".gguf") && !f.to_ascii_lowercase().contains("mmproj")
        })
        .collect();
    let available = || {
        let mut q: Vec<&str> = ggufs.iter().filter_map(|f| quant_of(f)).collect();
        q.sort_unstable();
        q.dedup();
        if q.is_empty() {
            "none".to_string()
        } else {
            q.join(", ")
        }
    };
    if let Some(file) = file {
        return if files.iter().any(|f| f == file) {
            Ok(file.to_string())
        } else {
            Err(Error::Load(format!(
                "no file '{file}' in {repo}; GGUF files there: {}",
                ggufs
                    .iter()
                    .map(|s| s.as_str())
                    .collect::<Vec<_>>()
                    .join(", ")
            )))
        };
    }
    if ggufs.is_empty() {
        return Err(Error::Load(format!(
            "no GGUF file in {repo}; cortex serves GGUF repositories (often named …-GGUF)"
        )));
    }
    let matching: Vec<&&String> = match quant {
        Some(q) => ggufs
            .iter()
            .filter(|f| quant_of(f).is_some_and(|fq| fq.eq_ignore_ascii_case(q)))
            .collect(),
        None if ggufs.len() == 1 => ggufs.iter().collect(),
        None => ggufs
            .iter()
            .filter(|f| quant_of(f) == Some("Q4_K_M"))
            .collect(),
    };
    match (matching.as_slice(), quant) {
        ([one], _) => Ok(one.to_string()),
        ([], Some(q)) => Err(Error::Load(format!(
            "no GGUF file matching quant {q} in {repo}; available: {}",
            available()
        ))),
        ([], None) => Err(Error::Load(format!(
            "{repo} has several GGUF files; say which with \"quant\" (available: {})",
            available()
        ))),
        (many, _) => {
            let first = many
                .iter()
                .find(|f| f.contains("-00001-of-"))
                .unwrap_or(&many[0]);
            if many.iter().any(|f| f.contains("-of-")) {
                Err(Error::Load(format!(
                    "{repo} ships this quant split over {} files ({first} …); split GGUF files are not supported yet, pick another quant (available: {})",
                    many.len(),
                    available()
                )))
            } else {
                Ok(first.to_string())
            }
        }
    }
}

/// The repository a GGUF repo was converted from: `unsloth/Qwen3-0.6B-GGUF` → `unsloth/Qwen3-0.6B`.
pub fn base_repo(repo: &str) -> Option<String> {
    ["-GGUF", "-gguf"]
        .iter()
        .find_map(|s| repo.strip_suffix(s))
        .map(str::to_string)
}

/// Reports download progress (0..1) to the model's state. hf-hub clones the reporter for each
/// chunk it fetches, so the counts are shared between the clones.
#[derive(Clone)]
pub struct DownloadProgress {
    total: Arc<AtomicUsize>,
    done: Arc<AtomicUsize>,
    report: Arc<dyn Fn(f32) + Send + Sync>,
}

impl DownloadProgress {
    pub fn new(report: Arc<dyn Fn(f32) + Send + Sync>) -> Self {
        DownloadProgress {
            total: Arc::default(),
            done: Arc::default(),
            report,
        }
    }
}

impl Progress for DownloadProgress {
    async fn init(&mut self, size: usize, _filename: &str) {
        self.total.store(size, Ordering::Relaxed);
        self.done.store(0, Ordering::Relaxed);
        (self.report)(0.0);
    }
    async fn update(&mut self, size: usize) {
        let done = self.done.fetch_add(size, Ordering::Relaxed) + size;
        let total = self.total.load(Ordering::Relaxed);
        if total > 0 {
            (self.report)((done as f32 / total as f32).min(1.0));
        }
    }
    async fn finish(&mut self) {
        (self.report)(1.0);
    }
}

fn offline() -> bool {
    std::env::var("HF_HUB_OFFLINE").is_ok_and(|v| v == "1" || v.eq_ignore_ascii_case("true"))
}

fn api() -> Result<Api> {
    let mut b = ApiBuilder::from_env().with_progress(false);
    if let Ok(token) = std::env::var("HF_TOKEN") {
        b = b.with_token(Some(token));
    }
    b.build()
        .map_err(|e| Error::Load(format!("Hugging Face client: {e}")))
}

fn hf_repo(repo: &str, revision: Option<&str>) -> Repo {
    Repo::with_revision(
        repo.to_string(),
        RepoType::Model,
        revision.unwrap_or("main").to_string(),
    )
}

/// Files of a repository: from the hub, or from the local cache when offline.
async fn list_files(repo: &str, revision: Option<&str>) -> Result<Vec<String>> {
    if offline() {
        let cache = Cache::from_env();
        let dir = cache
            .path()
            .join(format!("models--{}", repo.replace('/', "--")));
        let rev = revision.unwrap_or("main");
        let commit = std::fs::read_to_string(dir.join("refs").join(rev)).map_err(|_| {
            Error::Load(format!(
                "HF_HUB_OFFLINE is set and {repo}@{rev} is not in the Hugging Face cache at {}; download it once online or unset HF_HUB_OFFLINE",
                cache.path().display()
            ))
        })?;
        let snap = dir.join("snapshots").join(commit.trim());
        let mut out = Vec::new();
        let mut stack = vec![snap.clone()];
        while let Some(d) = stack.pop() {
            for e in std::fs::read_dir(&d).into_iter().flatten().flatten() {
                let p = e.path();
                if p.is_dir() {
                    stack.push(p);
                } else if let Ok(rel) = p.strip_prefix(&snap) {
                    out.push(rel.to_string_lossy().into_owned());
                }
            }
        }
        return Ok(out);
    }
    let info = api()?
        .repo(hf_repo(repo, revision))
        .info()
        .await
        .map_err(|e| Error::Load(format!("listing {repo} on Hugging Face failed: {e}")))?;
    Ok(info.siblings.into_iter().map(|s| s.rfilename).collect())
}

/// Fetches one file of a repository into the HF cache (or finds it there when offline).
pub async fn fetch_file(
    repo: &str,
    revision: Option<&str>,
    file: &str,
    progress: Option<DownloadProgress>,
) -> Result<PathBuf> {
    if offline() {
        return Cache::from_env()
            .repo(hf_repo(repo, revision))
            .get(file)
            .ok_or_else(|| {
                Error::Load(format!(
                    "HF_HUB_OFFLINE is set and {repo}/{file} is not in the Hugging Face cache"
                ))
            });
    }
    let r = api()?.repo(hf_repo(repo, revision));
    let res = match progress {
        Some(p) => r.download_with_progress(file, p).await,
        None => r.get(file).await,
    };
    res.map_err(|e| Error::Load(format!("downloading {repo}/{file} failed: {e}")))
}

/// Resolves a repository source to the GGUF file, downloading it.
pub async fn resolve_repo(
    repo: &str,
    quant: Option<&str>,
    file: Option<&str>,
    revision: Option<&str>,
    progress: DownloadProgress,
) -> Result<PathBuf> {
    let files = list_files(repo, revision).await?;
    let chosen = pick_file(repo, &files, quant, file)?;
    fetch_file(repo, revision, &chosen, Some(progress)).await
}

/// Finds a `tokenizer.json` for a GGUF without tokenizer metadata: the repo itself, its base repo,
/// then `tokenizerRepo`. The error names every repository tried.
pub async fn find_tokenizer(
    repo: Option<&str>,
    revision: Option<&str>,
    tokenizer_repo: Option<&str>,
) -> Result<PathBuf> {
    let mut tried = Vec::new();
    let mut candidates: Vec<(String, Option<&str>)> = Vec::new();
    if let Some(r) = repo {
        candidates.push((r.to_string(), revision));
        if let Some(b) = base_repo(r) {
            candidates.push((b, None));
        }
    }
    if let Some(t) = tokenizer_repo {
        candidates.push((t.to_string(), None));
    }
    for (r, rev) in candidates {
        match fetch_file(&r, rev, "tokenizer.json", None).await {
            Ok(p) => return Ok(p),
            Err(e) => tried.push(format!("{r} ({e})")),
        }
    }
    Err(Error::Load(format!(
        "the GGUF has no tokenizer metadata and no tokenizer.json was found; tried: {}; set model.tokenizerRepo to a repository with tokenizer.json",
        if tried.is_empty() {
            "no repository (file:// source without tokenizerRepo)".to_string()
        } else {
            tried.join("; ")
        }
    )))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn listing() -> Vec<String> {
        [
            "README.md",
            "Qwen3-0.6B-Q2_K.gguf",
            "Qwen3-0.6B-Q3_K_M.gguf",
            "Qwen3-0.6B-Q4_K_M.gguf",
            "Qwen3-0.6B-Q8_0.gguf",
            "Qwen3-0.6B-UD-Q4_K_XL.gguf",
            "mmproj-F16.gguf",
        ]
        .map(String::from)
        .to_vec()
    }

    #[test]
    fn quant_picks_the_matching_file() {
        let f = pick_file("unsloth/Qwen3-0.6B-GGUF", &listing(), Some("q4_k_m"), None).unwrap();
        assert_eq!(f, "Qwen3-0.6B-Q4_K_M.gguf");
    }

    #[test]
    fn unknown_quant_lists_available_files() {
        let e = pick_file("unsloth/Qwen3-0.6B-GGUF", &listing(), Some("Q5_K_M"), None).unwrap_err();
        assert_eq!(
            e.to_string(),
            "no GGUF file matching quant Q5_K_M in unsloth/Qwen3-0.6B-GGUF; available: Q2_K, Q3_K_M, Q4_K_M, Q4_K_XL, Q8_0"
        );
    }

    #[test]
    fn without_quant_q4_k_m_is_the_default_among_many() {
        assert_eq!(
            pick_file("r", &listing(), None, None).unwrap(),
            "Qwen3-0.6B-Q4_K_M.gguf"
        );
    }

    #[test]
    fn split_files_are_refused_with_the_alternatives() {
        let files = vec![
            "m-Q8_0-00001-of-00002.gguf".to_string(),
            "m-Q8_0-00002-of-00002.gguf".to_string(),
            "m-Q4_0.gguf".to_string(),
        ];
        let e = pick_file("r", &files, Some("Q8_0"), None)
            .unwrap_err()
            .to_string();
        assert!(e.contains("split") && e.contains("Q4_0"), "{e}");
    }

    #[test]
    fn quant_of_reads_names() {
        assert_eq!(quant_of("SmolLM2-135M-Instruct.Q4_1.gguf"), Some("Q4_1"));
        assert_eq!(quant_of("gemma-3-270m-it-Q4_K_M.gguf"), Some("Q4_K_M"));
        assert_eq!(quant_of("model-q8_0.gguf"), Some("Q8_0"));
        assert_eq!(quant_of("model.gguf"), None);
    }

    #[test]
    fn base_repo_strips_the_gguf_suffix() {
        assert_eq!(
            base_repo("unsloth/Qwen3-0.6B-GGUF").as_deref(),
            Some("unsloth/Qwen3-0.6B")
        );
        assert_eq!(base_repo("Qwen/Qwen3-0.6B"), None);
    }

    #[test]
    fn uri_outside_model_dirs_is_refused() {
        let dir = tempfile::tempdir().unwrap();
        let other = tempfile::tempdir().unwrap();
        let f = other.path().join("x.gguf");
        std::fs::write(&f, b"x").unwrap();
        let e = resolve_uri(
            &format!("file://{}", f.display()),
            &[dir.path().to_path_buf()],
        )
        .unwrap_err();
        assert!(
            e.to_string().contains("outside the model directories"),
            "{e}"
        );
    }

    #[test]
    fn dot_dot_is_refused_before_touching_the_disk() {
        let dir = tempfile::tempdir().unwrap();
        let e = resolve_uri(
            &format!("file://{}/../etc/passwd", dir.path().display()),
            &[dir.path().to_path_buf()],
        )
        .unwrap_err();
        assert!(e.to_string().contains("'..'"), "{e}");
    }

    #[test]
    fn symlink_escaping_the_model_dir_is_refused() {
        let dir = tempfile::tempdir().unwrap();
        let other = tempfile::tempdir().unwrap();
        let target = other.path().join("secret.gguf");
        std::fs::write(&target, b"x").unwrap();
        let link = dir.path().join("link.gguf");
        std::os::unix::fs::symlink(&target, &link).unwrap();
        let e = resolve_uri(
            &format!("file://{}", link.display()),
            &[dir.path().to_path_buf()],
        )
        .unwrap_err();
        assert!(e.to_string().contains("resolves to"), "{e}");
    }

    #[test]
    fn file_inside_model_dirs_resolves() {
        let dir = tempfile::tempdir().unwrap();
        let f = dir.path().join("m.gguf");
        std::fs::write(&f, b"x").unwrap();
        let p = resolve_uri(
            &format!("file://{}", f.display()),
            &[dir.path().to_path_buf()],
        )
        .unwrap();
        assert_eq!(p, f.canonicalize().unwrap());
    }
}
