//! Tokenizers built from GGUF metadata (`tokenizer.ggml.*`) with the `tokenizers` crate, or read
//! from a `tokenizer.json`.
//!
//! candle's own `TokenizerFromGguf` mis-tokenizes SmolLM2 and cannot read SentencePiece
//! vocabularies (see docs/candle-notes.md), so we build the `tokenizers` pipeline llama.cpp would run:
//! - `gpt2` vocabularies: byte-level BPE from `tokens` + `merges`, with the pre-tokenizer regex
//!   chosen by `tokenizer.ggml.pre`, as llama.cpp does.
//! - `llama` (SentencePiece) vocabularies such as Gemma's: BPE over `▁`-normalised text with byte
//!   fallback, merges derived from the token scores (a merge whose result scores higher wins).
//!
//! Control tokens (type 3) become special added tokens; user-defined ones (type 4) are matched
//! in text but kept in decoded output.

use std::collections::HashMap;
use std::path::Path;

use tokenizers::decoders::byte_fallback::ByteFallback;
use tokenizers::decoders::byte_level::ByteLevel as ByteLevelDecoder;
use tokenizers::decoders::fuse::Fuse;
use tokenizers::decoders::sequence::Sequence as DecoderSequence;
use tokenizers::models::bpe::BPE;
use tokenizers::normalizers::{Prepend, Replace, Sequence as NormalizerSequence};
use tokenizers::pre_tokenizers::byte_level::ByteLevel;
use tokenizers::pre_tokenizers::digits::Digits;
use tokenizers::pre_tokenizers::sequence::Sequence as PreSequence;
use tokenizers::pre_tokenizers::split::{Split, SplitPattern};
use tokenizers::{AddedToken, DecoderWrapper, NormalizerWrapper, PreTokenizerWrapper, Tokenizer};

use crate::error::{Error, Result};
use crate::gguf::Meta;

const TYPE_NORMAL: i32 = 1;
const TYPE_CONTROL: i32 = 3;
const TYPE_USER_DEFINED: i32 = 4;

/// Strings that end a turn in the chat formats we know; generation stops on any that exist.
const END_OF_TURN: &[&str] = &[
    "<|im_end|>",
    "<end_of_turn>",
    "<|eot_id|>",
    "<|eom_id|>",
    "<|endoftext|>",
    "<|end|>",
];

/// A tokenizer plus the special tokens generation needs.
pub struct TextTokenizer {
    inner: Tokenizer,
    pub bos: Option<(u32, String)>,
    pub eos: Option<(u32, String)>,
    /// Whether a raw prompt (not a rendered chat template) starts with BOS.
    pub add_bos: bool,
    /// Token ids that end generation: EOS and the end-of-turn tokens present in the vocabulary.
    pub stop_ids: Vec<u32>,
}

const GPT2_REGEX: &str =
    r"'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+";
const LLAMA3_REGEX: &str = r"(?:'[sS]|'[tT]|'[rR][eE]|'[vV][eE]|'[mM]|'[lL][lL]|'[dD])|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+";
const QWEN2_REGEX: &str = r"(?:'[sS]|'[tT]|'[rR][eE]|'[vV][eE]|'[mM]|'[lL][lL]|'[dD])|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+";

fn tok_err(e: impl std::fmt::Display) -> Error {
    Error::Load(format!("building the tokenizer failed: {e}"))
}

fn split(regex: &str) -> Result<PreTokenizerWrapper> {
    Ok(Split::new(
        SplitPattern::Regex(regex.to_string()),
        tokenizers::SplitDelimiterBehavior::Isolated,
        false,
    )
    .map_err(tok_err)?
    .into())
}

/// The pre-tokenizer llama.cpp uses for `tokenizer.ggml.pre` (the common ones; others fall back
/// to GPT-2's with a warning).
fn byte_level_pre_tokenizer(pre: &str) -> Result<PreTokenizerWrapper> {
    let no_regex: PreTokenizerWrapper = ByteLevel::new(false, false, false).into();
    Ok(match pre {
        "llama3" | "llama-v3" | "llama-bpe" | "falcon3" | "pixtral" | "dbrx" | "smaug-bpe" => {
            PreSequence::new(vec![split(LLAMA3_REGEX)?, no_regex]).into()
        }
        "qwen2" | "deepseek-r1-qwen" | "qwen35" | "megrez" | "hunyuan" => {
            PreSequence::new(vec![split(QWEN2_REGEX)?, no_regex]).into()
        }
        "smollm" | "starcoder" | "refact" | "command-r" | "codeshell" | "exaone" | "minerva" => {
            PreSequence::new(vec![Digits::new(true).into(), split(GPT2_REGEX)?, no_regex]).into()
        }
        other => {
            if !matches!(
                other,
                "default" | "gpt-2" | "gpt2" | "phi-2" | "jina-es" | "jina-de"
            ) {
                tracing::warn!(
                    pre = other,
                    "unknown tokenizer.ggml.pre; using GPT-2's pre-tokenizer"
                );
            }
            PreSequence::new(vec![split(GPT2_REGEX)?, no_regex]).into()
        }
    })
}

/// SentencePiece-BPE merges from scores: every split of a normal token into two tokens of the
/// vocabulary is a merge, ranked by the merged token's score (higher first).
fn merges_from_scores(tokens: &[&str], scores: &[f32], types: &[i32]) -> Vec<(String, String)> {
    let index: HashMap<&str, usize> = tokens.iter().enumerate().map(|(i, t)| (*t, i)).collect();
    let mut merges: Vec<(f32, usize, usize, usize)> = Vec::new();
    for (id, tok) in tokens.iter().enumerate() {
        if types.get(id).copied().unwrap_or(TYPE_NORMAL) != TYPE_NORMAL
            || tok.chars().nth(1).is_none()
        {
            continue;
        }
        for (at, _) in tok.char_indices().skip(1) {
            let (l, r) = tok.split_at(at);
            if let (Some(&li), Some(&ri)) = (index.get(l), index.get(r)) {
                merges.push((scores.get(id).copied().unwrap_or(0.0), id, li, ri));
            }
        }
    }
    merges.sort_by(|a, b| b.0.total_cmp(&a.0).then(a.1.cmp(&b.1)).then(a.2.cmp(&b.2)));
    merges
        .into_iter()
        .map(|(_, _, l, r)| (tokens[l].to_string(), tokens[r].to_string()))
        .collect()
}

impl TextTokenizer {
    /// Builds the tokenizer from a GGUF file's `tokenizer.ggml.*` metadata.
    pub fn from_gguf(meta: &Meta<'_>) -> Result<Self> {
        let model = meta
            .str("tokenizer.ggml.model")
            .ok_or_else(|| Error::Load("GGUF metadata has no tokenizer.ggml.model".into()))?;
        let tokens = meta.strings("tokenizer.ggml.tokens")?;
        let types = meta
            .numbers_i32("tokenizer.ggml.token_type")
            .unwrap_or_else(|| vec![TYPE_NORMAL; tokens.len()]);
        let vocab: tokenizers::models::bpe::Vocab = tokens
            .iter()
            .enumerate()
            .map(|(i, t)| (t.to_string(), i as u32))
            .collect();
        let unk = meta
            .u32("tokenizer.ggml.unknown_token_id")
            .and_then(|i| tokens.get(i as usize))
            .map(|s| s.to_string());
        let mut tk = match model {
            "gpt2" => {
                let merges: Vec<(String, String)> = meta
                    .strings("tokenizer.ggml.merges")?
                    .into_iter()
                    .filter_map(|m| m.split_once(' '))
                    .map(|(a, b)| (a.to_string(), b.to_string()))
                    .collect();
                let bpe = BPE::builder()
                    .vocab_and_merges(vocab, merges)
                    .build()
                    .map_err(tok_err)?;
                let mut tk = Tokenizer::new(bpe);
                let pre = meta.str("tokenizer.ggml.pre").unwrap_or("default");
                tk.with_pre_tokenizer(Some(byte_level_pre_tokenizer(pre)?));
                tk.with_decoder(Some(ByteLevelDecoder::default()));
                tk
            }
            "llama" => {
                let scores = meta.numbers_f32("tokenizer.ggml.scores").ok_or_else(|| {
                    Error::Load("GGUF SentencePiece vocabulary has no tokenizer.ggml.scores".into())
                })?;
                let merges = merges_from_scores(&tokens, &scores, &types);
                let mut b = BPE::builder()
                    .vocab_and_merges(vocab, merges)
                    .byte_fallback(true);
                if let Some(unk) = unk {
                    b = b.unk_token(unk).fuse_unk(true);
                }
                let mut tk = Tokenizer::new(b.build().map_err(tok_err)?);
                let mut norms: Vec<NormalizerWrapper> = Vec::new();
                if meta.bool("tokenizer.ggml.add_space_prefix").unwrap_or(true) {
                    norms.push(Prepend::new("▁".into()).into());
                }
                norms.push(Replace::new(" ", "▁").map_err(tok_err)?.into());
                tk.with_normalizer(Some(NormalizerSequence::new(norms)));
                let mut decoders: Vec<DecoderWrapper> = vec![
                    tokenizers::decoders::DecoderWrapper::Replace(
                        Replace::new("▁", " ").map_err(tok_err)?,
                    ),
                    ByteFallback::new().into(),
                    Fuse::new().into(),
                ];
                if meta.bool("tokenizer.ggml.add_space_prefix").unwrap_or(true) {
                    decoders.push(tokenizers::decoders::strip::Strip::new(' ', 1, 0).into());
                }
                tk.with_decoder(Some(DecoderSequence::new(decoders)));
                tk
            }
            other => {
                return Err(Error::Load(format!(
                    "tokenizer model '{other}' in GGUF metadata is not supported; supported: gpt2 (byte-level BPE), llama (SentencePiece)"
                )));
            }
        };
        let added: Vec<AddedToken> = tokens
            .iter()
            .zip(&types)
            .filter(|(_, t)| **t == TYPE_CONTROL || **t == TYPE_USER_DEFINED)
            .map(|(s, t)| AddedToken::from(s.to_string(), *t == TYPE_CONTROL).normalized(false))
            .collect();
        tk.add_special_tokens(&added);

        let name =
            |id: Option<u32>| id.and_then(|i| tokens.get(i as usize).map(|s| (i, s.to_string())));
        let bos = name(meta.u32("tokenizer.ggml.bos_token_id"));
        let eos = name(meta.u32("tokenizer.ggml.eos_token_id"));
        let mut stop_ids: Vec<u32> = eos.iter().map(|(i, _)| *i).collect();
        for key in ["tokenizer.ggml.eot_token_id", "tokenizer.ggml.eom_token_id"] {
            stop_ids.extend(meta.u32(key));
        }
        let add_bos = meta
            .bool("tokenizer.ggml.add_bos_token")
            .unwrap_or(model == "llama");
        Ok(Self::finish(tk, bos, eos, add_bos, stop_ids))
    }

    /// Reads a `tokenizer.json`; special token ids still come from the GGUF metadata.
    pub fn from_file(path: &Path, meta: &Meta<'_>) -> Result<Self> {
        let tk = Tokenizer::from_file(path)
            .map_err(|e| Error::Load(format!("reading {}: {e}", path.display())))?;
        let name = |key: &str| {
            meta.u32(key)
                .and_then(|i| tk.id_to_token(i).map(|s| (i, s)))
        };
        let bos = name("tokenizer.ggml.bos_token_id");
        let eos = name("tokenizer.ggml.eos_token_id");
        let stop_ids = eos.iter().map(|(i, _)| *i).collect();
        let add_bos = meta.bool("tokenizer.ggml.add_bos_token").unwrap_or(false);
        Ok(Self::finish(tk, bos, eos, add_bos, stop_ids))
    }

    /// The tokenizer as `tokenizer.json`.
    pub fn to_json(&self) -> Result<String> {
        self.inner
            .to_string(false)
            .map_err(|e| Error::Internal(format!("serialising the tokenizer: {e}")))
    }

    fn finish(
        inner: Tokenizer,
        bos: Option<(u32, String)>,
        eos: Option<(u32, String)>,
        add_bos: bool,
        mut stop_ids: Vec<u32>,
    ) -> Self {
        stop_ids.extend(END_OF_TURN.iter().filter_map(|s| inner.token_to_id(s)));
        stop_ids.sort_unstable();
        stop_ids.dedup();
        TextTokenizer {
            inner,
            bos,
            eos,
            add_bos,
            stop_ids,
        }
    }

    /// Encodes text, recognising special tokens written in it (as a rendered chat template has).
    pub fn encode(&self, text: &str, add_bos: bool) -> Result<Vec<u32>> {
        let enc = self
            .inner
            .encode_fast(text, false)
            .map_err(|e| Error::Internal(format!("tokenizing: {e}")))?;
        let mut ids = Vec::with_capacity(enc.len() + 1);
        if let Some((bos, _)) = self.bos.as_ref().filter(|_| add_bos) {
            ids.push(*bos);
        }
        ids.extend_from_slice(enc.get_ids());
        Ok(ids)
    }

    /// Decodes ids to text, leaving out control tokens.
    pub fn decode(&self, ids: &[u32]) -> Result<String> {
        self.inner
            .decode(ids, true)
            .map_err(|e| Error::Internal(format!("detokenizing: {e}")))
    }

    pub fn token_id(&self, token: &str) -> Option<u32> {
        self.inner.token_to_id(token)
    }

    pub fn vocab_size(&self) -> usize {
        self.inner.get_vocab_size(true)
    }
}

/// Turns a stream of token ids into text pieces without splitting multi-byte characters: text is
/// released only once the tokens decode to complete characters.
#[derive(Default)]
pub struct StreamDecoder {
    ids: Vec<u32>,
    prefix: usize,
    read: usize,
}

impl StreamDecoder {
    pub fn push(&mut self, tok: &TextTokenizer, id: u32) -> Result<String> {
        self.ids.push(id);
        let before = tok.decode(&self.ids[self.prefix..self.read])?;
        let after = tok.decode(&self.ids[self.prefix..])?;
        if after.len() > before.len() && !after.ends_with('\u{FFFD}') {
            let piece = after.get(before.len()..).unwrap_or_default().to_string();
            self.prefix = self.read;
            self.read = self.ids.len();
            Ok(piece)
        } else {
            Ok(String::new())
        }
    }
}
