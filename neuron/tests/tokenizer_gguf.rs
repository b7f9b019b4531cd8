//! Tokenizers built from GGUF metadata against llama.cpp's tokenization of the same strings
//! (`tests/data/llamacpp-tokens-*.json`, written by llama-cpp-python 0.3.36 with special-token
//! parsing on), for SmolLM2's byte-level BPE and Gemma 3's SentencePiece vocabulary.

mod common;

use std::collections::BTreeMap;
use std::fs::File;
use std::io::BufReader;

use candle_core::quantized::gguf_file;
use neuron::gguf::Meta;
use neuron::tokenizer::{StreamDecoder, TextTokenizer};

fn tokenizer(name: &str) -> TextTokenizer {
    let mut f = BufReader::new(File::open(common::model_path(name)).unwrap());
    let ct = gguf_file::Content::read(&mut f).unwrap();
    TextTokenizer::from_gguf(&Meta(&ct.metadata)).unwrap()
}

fn check(name: &str, vectors: &str) {
    let tk = tokenizer(name);
    let cases: BTreeMap<String, Vec<u32>> = serde_json::from_str(vectors).unwrap();
    let mut wrong = Vec::new();
    for (text, want) in &cases {
        let got = tk.encode(text, false).unwrap();
        if &got != want {
            wrong.push(format!("{text:?}: got {got:?}, llama.cpp {want:?}"));
        }
    }
    assert!(
        wrong.is_empty(),
        "{} of {} strings differ:\n{}",
        wrong.len(),
        cases.len(),
        wrong.join("\n")
    );
    // Decoding gives the text back, streamed token by token too.
    for text in cases
        .keys()
        .filter(|t| !t.contains("<|") && !t.contains("<start"))
    {
        let ids = tk.encode(text, false).unwrap();
        assert_eq!(&tk.decode(&ids).unwrap(), text);
        let mut d = StreamDecoder::default();
        let streamed: String = ids.iter().map(|&i| d.push(&tk, i).unwrap()).collect();
        assert_eq!(&streamed, text);
    }
}

#[test]
fn smollm2_tokenizes_like_llama_cpp() {
    check(
        common::SMOLLM2,
        include_str!("data/llamacpp-tokens-smollm2.json"),
    );
}

#[test]
fn gemma3_sentencepiece_tokenizes_like_llama_cpp() {
    check(
        common::GEMMA3,
        include_str!("data/llamacpp-tokens-gemma3.json"),
    );
}

#[test]
fn end_of_turn_tokens_stop_generation() {
    let smol = tokenizer(common::SMOLLM2);
    assert!(
        smol.stop_ids
            .contains(&smol.token_id("<|im_end|>").unwrap())
    );
    let gemma = tokenizer(common::GEMMA3);
    assert!(
        gemma
            .stop_ids
            .contains(&gemma.token_id("<end_of_turn>").unwrap())
    );
    assert!(gemma.add_bos);
}
