//! The models of this neuron and their lifecycle: `downloading → loading → ready → unloading`,
//! or `failed` with a message saying what was tried.

use std::collections::HashMap;
use std::fs::File;
use std::io::BufReader;
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use candle_core::Device;
use candle_core::quantized::gguf_file;
use cortex_core::neuron::{DeviceKind, LoadRequest, ModelInfo, ModelSource, ModelState};
use tokio::sync::{mpsc, watch};

use crate::engine::model::{Config, Model, estimate_bytes};
use crate::engine::{self, GenRequest, Load, LoadedModel};
use crate::error::{Error, Result, human_bytes};
use crate::gguf::Meta;
use crate::metrics::{Metrics, ResultLabel};
use crate::source::{self, DownloadProgress};
use crate::template::ChatTemplate;
use crate::tokenizer::TextTokenizer;

/// Neuron-wide settings that shape loading and queueing.
#[derive(Debug, Clone)]
pub struct Settings {
    pub model_dirs: Vec<PathBuf>,
    pub device: DeviceKind,
    /// Requests that may wait per model before new ones get 429.
    pub max_queue: usize,
    /// Cap on the memory all models together may hold (bytes), on top of what the device has free.
    pub max_memory: Option<u64>,
    /// Context served when the load request names none (capped by the model's own).
    pub default_context: usize,
    /// KV cache memory each model's sequences may hold together (default: one full context).
    pub kv_cache_memory: Option<u64>,
    /// Memory each model keeps for finished requests' blocks beyond the running budget (the
    /// prefix cache; default: one full context).
    pub prefix_cache_memory: Option<u64>,
    /// Most sequences a model runs in one batch.
    pub max_batch: usize,
}

struct Status {
    state: ModelState,
    progress: f32,
    error: Option<String>,
    bytes: u64,
    device: String,
    arch: Option<String>,
    context_length: usize,
    loaded_at: Option<u64>,
    /// KV cache budget in tokens, and the bytes one token takes.
    kv_tokens: usize,
    /// Prefix cache room beyond that, in tokens.
    prefix_tokens: usize,
    kv_token_bytes: u64,
}

struct Serving {
    lm: Arc<LoadedModel>,
    tx: mpsc::Sender<GenRequest>,
    thread: std::thread::JoinHandle<()>,
}

/// One model on this neuron.
pub struct Entry {
    pub id: String,
    pub source: ModelSource,
    status: Mutex<Status>,
    pub load: Arc<Load>,
    cancel: Arc<AtomicBool>,
    serving: Mutex<Option<Serving>>,
    state_tx: watch::Sender<ModelState>,
}

impl Entry {
    fn set(&self, f: impl FnOnce(&mut Status)) {
        let mut s = self.status.lock().expect("status lock");
        f(&mut s);
        let state = s.state;
        drop(s);
        self.state_tx.send_replace(state);
    }

    pub fn state(&self) -> ModelState {
        self.status.lock().expect("status lock").state
    }

    pub fn info(&self) -> ModelInfo {
        let s = self.status.lock().expect("status lock");
        let last = self.load.last_used.load(Ordering::Relaxed);
        ModelInfo {
            id: self.id.clone(),
            state: s.state,
            progress: s.progress,
            source: self.source.clone(),
            bytes: s.bytes,
            device: s.device.clone(),
            architecture: s.arch.clone(),
            context_length: s.context_length,
            error: s.error.clone(),
            loaded_at: s.loaded_at,
            last_used_at: (last > 0).then_some(last),
            inflight: self.load.inflight.load(Ordering::Relaxed),
            queued: self.load.queued.load(Ordering::Relaxed),
            kv_cache_bytes: s.kv_tokens as u64 * s.kv_token_bytes,
            prefix_cache_bytes: s.prefix_tokens as u64 * s.kv_token_bytes,
            prefix_cache_used_bytes: self.load.prefix_cached.load(Ordering::Relaxed) as u64
                * s.kv_token_bytes,
            kv_cache_used_bytes: self.load.kv_used.load(Ordering::Relaxed) as u64
                * s.kv_token_bytes,
        }
    }

    fn fail(&self, e: &Error) {
        tracing::warn!(model = %self.id, error = %e, "load failed");
        self.set(|s| {
            s.state = ModelState::Failed;
            s.error = Some(e.to_string());
        });
    }

    /// The model, when it is ready to serve.
    pub fn ready(&self) -> Result<Arc<LoadedModel>> {
        let state = self.state();
        if state != ModelState::Ready {
            return Err(Error::ModelNotReady {
                id: self.id.clone(),
                state: state.as_str(),
            });
        }
        self.serving
            .lock()
            .expect("serving lock")
            .as_ref()
            .map(|s| s.lm.clone())
            .ok_or_else(|| Error::ModelNotReady {
                id: self.id.clone(),
                state: "unloading",
            })
    }

    /// Queues a request, or refuses it when the model's queue is full.
    pub fn submit(&self, req: GenRequest, max_queue: usize, metrics: &Metrics) -> Result<()> {
        let guard = self.serving.lock().expect("serving lock");
        let serving = guard.as_ref().ok_or_else(|| Error::ModelNotReady {
            id: self.id.clone(),
            state: "unloading",
        })?;
        let queued = self.load.queued.load(Ordering::Relaxed) as usize;
        if queued >= max_queue {
            return Err(Error::QueueFull {
                model: self.id.clone(),
                queued,
                retry_after: engine::retry_after(queued).as_secs(),
            });
        }
        self.load.queued.fetch_add(1, Ordering::Relaxed);
        metrics
            .waiting
            .get_or_create(&Metrics::label(&self.id))
            .inc();
        serving.tx.try_send(req).map_err(|_| {
            self.load.queued.fetch_sub(1, Ordering::Relaxed);
            metrics
                .waiting
                .get_or_create(&Metrics::label(&self.id))
                .dec();
            Error::QueueFull {
                model: self.id.clone(),
                queued,
                retry_after: engine::retry_after(queued).as_secs(),
            }
        })
    }

    /// Waits until the model is ready or failed, at most `timeout`.
    pub async fn wait(&self, timeout: Duration) -> ModelState {
        let mut rx = self.state_tx.subscribe();
        let _ = tokio::time::timeout(
            timeout,
            rx.wait_for(|s| matches!(s, ModelState::Ready | ModelState::Failed)),
        )
        .await;
        self.state()
    }
}

/// What a file needs before its weights are read.
struct Prepared {
    path: PathBuf,
    content: gguf_file::Content,
    cfg: Config,
    context: usize,
    kv_tokens: usize,
    prefix_tokens: usize,
    bytes: u64,
    device: Device,
    device_name: String,
}

pub struct Registry {
    pub settings: Settings,
    pub metrics: Arc<Metrics>,
    models: Mutex<HashMap<String, Arc<Entry>>>,
}

fn valid_id(id: &str) -> Result<()> {
    let ok = !id.is_empty()
        && id.len() <= 128
        && id
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || matches!(c, '-' | '_' | '.' | ':' | '/'));
    if ok {
        Ok(())
    } else {
        Err(Error::invalid(
            "id",
            format!("model id '{id}' must be 1-128 characters of letters, digits and - _ . : /"),
        ))
    }
}

impl Registry {
    pub fn new(settings: Settings, metrics: Arc<Metrics>) -> Arc<Self> {
        Arc::new(Registry {
            settings,
            metrics,
            models: Mutex::new(HashMap::new()),
        })
    }

    pub fn get(&self, id: &str) -> Option<Arc<Entry>> {
        self.models.lock().expect("models lock").get(id).cloned()
    }

    pub fn list(&self) -> Vec<Arc<Entry>> {
        let mut v: Vec<_> = self
            .models
            .lock()
            .expect("models lock")
            .values()
            .cloned()
            .collect();
        v.sort_by(|a, b| a.id.cmp(&b.id));
        v
    }

    /// Starts loading a model. Returns the entry and whether this call created it (`false` when
    /// the same model was already loaded or loading: loading twice is harmless).
    pub async fn load(self: &Arc<Self>, req: LoadRequest) -> Result<(Arc<Entry>, bool)> {
        valid_id(&req.id)?;
        if let Some(ctx) = req.context_length.filter(|c| *c < 16) {
            return Err(Error::invalid(
                "contextLength",
                format!("contextLength {ctx} is too small; use at least 16"),
            ));
        }
        if let Some(existing) = self.get(&req.id) {
            let state = existing.state();
            if existing.source != req.source {
                if state != ModelState::Failed {
                    return Err(Error::IdConflict {
                        id: req.id.clone(),
                        state: state.as_str(),
                        existing: existing.source.to_string(),
                        requested: req.source.to_string(),
                    });
                }
            } else if state != ModelState::Failed {
                return Ok((existing, false));
            }
        }
        // Local files are checked now, so a bad path or a model that cannot fit is refused at
        // once rather than reported later as a failed load.
        let prepared = match &req.source {
            ModelSource::Uri { uri } => {
                let path = source::resolve_uri(uri, &self.settings.model_dirs)?;
                let me = self.clone();
                let req2 = req.clone();
                Some(
                    tokio::task::spawn_blocking(move || me.prepare(path, &req2))
                        .await
                        .map_err(|e| Error::Internal(e.to_string()))??,
                )
            }
            ModelSource::Repo { .. } => None,
        };
        let (state_tx, _) = watch::channel(ModelState::Downloading);
        let entry = Arc::new(Entry {
            id: req.id.clone(),
            source: req.source.clone(),
            status: Mutex::new(Status {
                state: if prepared.is_some() {
                    ModelState::Loading
                } else {
                    ModelState::Downloading
                },
                progress: 0.0,
                error: None,
                bytes: prepared.as_ref().map(|p| p.bytes).unwrap_or(0),
                device: prepared
                    .as_ref()
                    .map(|p| p.device_name.clone())
                    .unwrap_or_default(),
                arch: prepared.as_ref().map(|p| p.cfg.arch.name().to_string()),
                context_length: prepared.as_ref().map(|p| p.context).unwrap_or(0),
                loaded_at: None,
                kv_tokens: prepared.as_ref().map(|p| p.kv_tokens).unwrap_or(0),
                prefix_tokens: prepared.as_ref().map(|p| p.prefix_tokens).unwrap_or(0),
                kv_token_bytes: prepared
                    .as_ref()
                    .map(|p| p.cfg.kv_bytes_per_token(&p.device))
                    .unwrap_or(0),
            }),
            load: Arc::new(Load::default()),
            cancel: Arc::new(AtomicBool::new(false)),
            serving: Mutex::new(None),
            state_tx,
        });
        {
            let mut models = self.models.lock().expect("models lock");
            // Another request may have raced us here; the first one wins.
            if let Some(e) = models
                .get(&req.id)
                .filter(|e| e.state() != ModelState::Failed)
            {
                return Ok((e.clone(), false));
            }
            models.insert(req.id.clone(), entry.clone());
        }
        let me = self.clone();
        let e2 = entry.clone();
        tokio::spawn(async move {
            let started = Instant::now();
            let result = me.finish_load(&e2, &req, prepared).await;
            let label = ResultLabel {
                model_name: e2.id.clone(),
                result: if result.is_ok() { "success" } else { "failure" }.into(),
            };
            me.metrics.loads.get_or_create(&label).inc();
            match result {
                Ok(()) => {
                    me.metrics
                        .load_seconds
                        .get_or_create(&Metrics::label(&e2.id))
                        .observe(started.elapsed().as_secs_f64());
                    tracing::info!(model = %e2.id, seconds = started.elapsed().as_secs_f64(), "model ready");
                }
                Err(e) => e2.fail(&e),
            }
        });
        Ok((entry, true))
    }

    /// Memory the device has for a new model of `needed` bytes, after what is loading already.
    /// Bytes a new model may take on `device`: what the device has free, less what models still
    /// loading there will allocate, and within `--max-memory` of what all models hold. `except`
    /// leaves one model out of the count (the one being checked).
    pub fn available(&self, device: &str, free_on_device: u64, except: Option<&str>) -> u64 {
        let models = self.models.lock().expect("models lock");
        let (mut pending, mut held) = (0u64, 0u64);
        for e in models.values().filter(|e| Some(e.id.as_str()) != except) {
            let s = e.status.lock().expect("status lock");
            if s.device != device || s.state == ModelState::Failed {
                continue;
            }
            held += s.bytes;
            if matches!(s.state, ModelState::Downloading | ModelState::Loading) {
                pending += s.bytes;
            }
        }
        let free = free_on_device.saturating_sub(pending);
        match self.settings.max_memory {
            Some(cap) => free.min(cap.saturating_sub(held)),
            None => free,
        }
    }

    fn check_memory(&self, id: &str, device: &str, free_on_device: u64, needed: u64) -> Result<()> {
        let free = self.available(device, free_on_device, Some(id));
        if needed > free {
            return Err(Error::InsufficientMemory {
                id: id.to_string(),
                device: device.to_string(),
                needed,
                free,
                needed_h: human_bytes(needed),
                free_h: human_bytes(free),
            });
        }
        Ok(())
    }

    fn pick_device(&self, want: Option<DeviceKind>) -> Result<(Device, String, u64)> {
        let want = want.unwrap_or(self.settings.device);
        let gpus = crate::devices::gpus();
        match want {
            DeviceKind::Cpu => {}
            DeviceKind::Cuda if gpus.is_empty() => {
                return Err(Error::invalid(
                    "device",
                    if cfg!(feature = "cuda") {
                        "device cuda requested but no NVIDIA GPU is visible to this neuron (NVML found none)"
                    } else {
                        "device cuda requested but this neuron was built without the cuda feature; use device cpu or a CUDA build"
                    },
                ));
            }
            DeviceKind::Cuda | DeviceKind::Auto if !gpus.is_empty() => {
                let best = gpus
                    .iter()
                    .max_by_key(|g| g.memory_free)
                    .expect("non-empty");
                let dev = Device::new_cuda(best.index as usize)
                    .map_err(|e| Error::Load(format!("opening cuda:{}: {e}", best.index)))?;
                return Ok((dev, format!("cuda:{}", best.index), best.memory_free));
            }
            _ => {}
        }
        let (_, free) = crate::devices::system_memory();
        Ok((Device::Cpu, "cpu".into(), free))
    }

    /// Reads a GGUF's header, picks the device and context, and checks that the model fits.
    fn prepare(&self, path: PathBuf, req: &LoadRequest) -> Result<Prepared> {
        let mut f = BufReader::new(
            File::open(&path)
                .map_err(|e| Error::Load(format!("cannot open {}: {e}", path.display())))?,
        );
        let content = gguf_file::Content::read(&mut f).map_err(|e| {
            Error::Load(format!(
                "{} is not a readable GGUF file ({e}); check that the download finished and the file is GGUF v2/v3",
                path.display()
            ))
        })?;
        let size = std::fs::metadata(&path).map(|m| m.len()).unwrap_or(0);
        let data_end = content
            .tensor_infos
            .values()
            .map(|ti| {
                content.tensor_data_offset
                    + ti.offset
                    + (ti.shape.elem_count() / ti.ggml_dtype.block_size()
                        * ti.ggml_dtype.type_size()) as u64
            })
            .max()
            .unwrap_or(0);
        if data_end > size {
            return Err(Error::Load(format!(
                "{} is truncated: its tensors need {data_end} bytes but the file has {size}; download it again",
                path.display()
            )));
        }
        let cfg = Config::from_meta(&Meta(&content.metadata))?;
        let context = match req.context_length {
            Some(c) if c > cfg.context_length => {
                return Err(Error::invalid(
                    "contextLength",
                    format!(
                        "contextLength {c} is more than the {} tokens {} was trained for",
                        cfg.context_length,
                        path.display()
                    ),
                ));
            }
            Some(c) => c,
            None => cfg.context_length.min(self.settings.default_context),
        };
        let (device, device_name, free) = self.pick_device(req.device)?;
        let token_bytes = cfg.kv_bytes_per_token(&device);
        // The KV budget bounds the context: one sequence must fit alone.
        let (context, kv_tokens) = match self.settings.kv_cache_memory {
            None => (context, context),
            Some(budget) => {
                let tokens = (budget / token_bytes) as usize;
                if tokens < 16 {
                    return Err(Error::invalid(
                        "kvCacheMemory",
                        format!(
                            "--kv-cache-memory {budget} holds {tokens} tokens of {} ({} bytes each); give at least {}",
                            path.display(),
                            token_bytes,
                            16 * token_bytes
                        ),
                    ));
                }
                match req.context_length {
                    Some(c) if c > tokens => {
                        return Err(Error::invalid(
                            "contextLength",
                            format!(
                                "contextLength {c} needs {} bytes of KV cache but --kv-cache-memory allows {budget} ({tokens} tokens); ask for at most {tokens} or raise --kv-cache-memory",
                                c as u64 * token_bytes
                            ),
                        ));
                    }
                    _ => (context.min(tokens), tokens),
                }
            }
        };
        // Finished requests' blocks stay for the next prompts that start alike: by default as
        // many as one full context, so a long prompt outlives the next long one.
        let prefix_tokens = match self.settings.prefix_cache_memory {
            None => context,
            Some(bytes) => (bytes / token_bytes) as usize,
        };
        let bytes = estimate_bytes(&content, &cfg, kv_tokens + prefix_tokens, &device);
        self.check_memory(&req.id, &device_name, free, bytes)?;
        Ok(Prepared {
            path,
            content,
            cfg,
            context,
            kv_tokens,
            prefix_tokens,
            bytes,
            device,
            device_name,
        })
    }

    async fn finish_load(
        self: &Arc<Self>,
        entry: &Arc<Entry>,
        req: &LoadRequest,
        prepared: Option<Prepared>,
    ) -> Result<()> {
        let prepared = match prepared {
            Some(p) => p,
            None => {
                let ModelSource::Repo {
                    repo,
                    quant,
                    file,
                    revision,
                    ..
                } = &req.source
                else {
                    unreachable!("uri sources are prepared before the task starts")
                };
                let e = entry.clone();
                let progress = DownloadProgress::new(Arc::new(move |p| e.set(|s| s.progress = p)));
                let path = source::resolve_repo(
                    repo,
                    quant.as_deref(),
                    file.as_deref(),
                    revision.as_deref(),
                    progress,
                )
                .await?;
                let me = self.clone();
                let req2 = req.clone();
                let p = tokio::task::spawn_blocking(move || me.prepare(path, &req2))
                    .await
                    .map_err(|e| Error::Internal(e.to_string()))??;
                entry.set(|s| {
                    s.state = ModelState::Loading;
                    s.progress = 0.0;
                    s.bytes = p.bytes;
                    s.device = p.device_name.clone();
                    s.arch = Some(p.cfg.arch.name().to_string());
                    s.context_length = p.context;
                    s.kv_tokens = p.kv_tokens;
                    s.prefix_tokens = p.prefix_tokens;
                    s.kv_token_bytes = p.cfg.kv_bytes_per_token(&p.device);
                });
                p
            }
        };
        // A GGUF without tokenizer metadata takes tokenizer.json from the repositories in order.
        let has_vocab = prepared
            .content
            .metadata
            .contains_key("tokenizer.ggml.tokens");
        let (repo, revision, tok_repo) = match &req.source {
            ModelSource::Repo {
                repo,
                revision,
                tokenizer_repo,
                ..
            } => (
                Some(repo.as_str()),
                revision.as_deref(),
                tokenizer_repo.as_deref(),
            ),
            ModelSource::Uri { .. } => (None, None, None),
        };
        let tokenizer_json = if has_vocab {
            None
        } else {
            Some(source::find_tokenizer(repo, revision, tok_repo).await?)
        };
        let template_json = match (&tokenizer_json, repo) {
            (Some(_), Some(r)) => source::fetch_file(r, revision, "tokenizer_config.json", None)
                .await
                .ok(),
            _ => None,
        };
        let id = entry.id.clone();
        let e = entry.clone();
        let cancel = entry.cancel.clone();
        let batching = engine::Batching {
            kv_tokens: prepared.kv_tokens,
            prefix_tokens: prepared.prefix_tokens,
            max_batch: self.settings.max_batch.max(1),
        };
        self.metrics
            .kv_budget
            .get_or_create(&Metrics::label(&entry.id))
            .set(
                (prepared.kv_tokens as u64 * prepared.cfg.kv_bytes_per_token(&prepared.device))
                    as i64,
            );
        let lm = tokio::task::spawn_blocking(move || -> Result<LoadedModel> {
            let meta = Meta(&prepared.content.metadata);
            let tokenizer = match &tokenizer_json {
                None => TextTokenizer::from_gguf(&meta)?,
                Some(p) => TextTokenizer::from_file(p, &meta)?,
            };
            let template = load_template(&meta, template_json.as_deref(), &tokenizer)?;
            let mut f = BufReader::new(File::open(&prepared.path).map_err(|err| {
                Error::Load(format!("cannot open {}: {err}", prepared.path.display()))
            })?);
            let progress = |p: f32| e.set(|s| s.progress = p);
            let model = Model::load(
                &prepared.content,
                &mut f,
                prepared.cfg,
                prepared.context,
                &prepared.device,
                &progress,
            )
            .map_err(|err| match err {
                Error::Load(m) => Error::Load(format!("{}: {m}", prepared.path.display())),
                other => Error::Load(format!("loading {}: {other}", prepared.path.display())),
            })?;
            if cancel.load(Ordering::Relaxed) {
                return Err(Error::Load("unloaded while loading".into()));
            }
            Ok(LoadedModel {
                id,
                model,
                tokenizer,
                template,
            })
        })
        .await
        .map_err(|e| Error::Internal(format!("load task: {e}")))??;
        let lm = Arc::new(lm);
        let (tx, rx) = mpsc::channel(self.settings.max_queue.max(1));
        let thread = {
            let (lm, cancel, load, metrics) = (
                lm.clone(),
                entry.cancel.clone(),
                entry.load.clone(),
                self.metrics.clone(),
            );
            std::thread::Builder::new()
                .name(format!("engine-{}", entry.id))
                .spawn(move || engine::run_loop(lm, rx, cancel, load, metrics, batching))
                .map_err(|e| Error::Internal(format!("starting the engine thread: {e}")))?
        };
        *entry.serving.lock().expect("serving lock") = Some(Serving { lm, tx, thread });
        let bytes = entry.status.lock().expect("status lock").bytes;
        self.metrics
            .model_bytes
            .get_or_create(&Metrics::label(&entry.id))
            .set(bytes as i64);
        entry.set(|s| {
            s.state = ModelState::Ready;
            s.progress = 1.0;
            s.loaded_at = Some(crate::now_secs());
        });
        Ok(())
    }

    /// Unloads a model: requests in flight end with an error, memory is freed before this returns.
    pub async fn unload(&self, id: &str) -> Result<ModelInfo> {
        let entry = self
            .models
            .lock()
            .expect("models lock")
            .remove(id)
            .ok_or_else(|| Error::ModelNotFound(id.to_string()))?;
        entry.cancel.store(true, Ordering::Relaxed);
        entry.set(|s| s.state = ModelState::Unloading);
        let info = entry.info();
        let serving = entry.serving.lock().expect("serving lock").take();
        if let Some(Serving { lm, tx, thread }) = serving {
            drop(tx);
            drop(lm);
            // The engine thread ends after at most one more forward pass.
            let _ = tokio::task::spawn_blocking(move || thread.join()).await;
        }
        self.metrics.forget(id);
        tracing::info!(model = %id, "model unloaded");
        Ok(info)
    }
}

fn load_template(
    meta: &Meta<'_>,
    tokenizer_config: Option<&std::path::Path>,
    tok: &TextTokenizer,
) -> Result<Option<ChatTemplate>> {
    if let Some(t) = meta.str("tokenizer.chat_template") {
        return ChatTemplate::new(t, "GGUF tokenizer.chat_template").map(Some);
    }
    if let Some(p) = tokenizer_config {
        let v: serde_json::Value = std::fs::read_to_string(p)
            .ok()
            .and_then(|s| serde_json::from_str(&s).ok())
            .unwrap_or_default();
        if let Some(t) = v.get("chat_template").and_then(|t| t.as_str()) {
            return ChatTemplate::new(t, "tokenizer_config.json").map(Some);
        }
    }
    Ok(ChatTemplate::fallback(|s| tok.token_id(s).is_some()))
}
