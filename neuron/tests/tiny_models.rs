//! Architectures whose real weights cannot be fetched here (qwen2, qwen3) are exercised with tiny
//! GGUF files of random weights written by the test: loading, tokenizer-from-metadata, chat
//! template and generation run through the real neuron binary. An unsupported architecture fails
//! the load with a message naming it and the supported ones.

mod common;

use common::{Neuron, write_tiny};
use serde_json::json;

#[tokio::test(flavor = "multi_thread")]
async fn tiny_qwen2_and_qwen3_models_load_and_generate() {
    let dir = tempfile::tempdir().unwrap();
    for arch in ["qwen2", "qwen3"] {
        write_tiny(&dir.path().join(format!("tiny-{arch}.gguf")), arch, true);
    }
    write_tiny(&dir.path().join("tiny-mamba.gguf"), "mamba", true);
    let n = Neuron::start(&["--model-dirs", &dir.path().display().to_string()]);
    let c = n.client();
    for arch in ["qwen2", "qwen3"] {
        let uri = format!("file://{}/tiny-{arch}.gguf", dir.path().display());
        let (s, info) = c
            .post(
                "/models/load?wait=true",
                json!({"id": arch, "source": {"uri": uri}}),
            )
            .await;
        assert_eq!(s, 200, "{info}");
        assert_eq!(info["architecture"], arch);
        assert_eq!(
            info["contextLength"], 512,
            "the model's own context caps the default"
        );
        for stream in [false, true] {
            let (s, body) = c
                .post("/v1/chat/completions", json!({"model": arch, "max_tokens": 6, "temperature": 0, "stream": stream,
                    "messages": [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hello there"}]}))
                .await;
            assert_eq!(s, 200, "{body}");
            if !stream {
                // <|im_start|>system\nBe brief.<|im_end|>\n<|im_start|>user\nHello there<|im_end|>\n<|im_start|>assistant\n
                assert_eq!(body["usage"]["prompt_tokens"], 19, "{body}");
                let done = body["usage"]["completion_tokens"].as_u64().unwrap();
                let reason = body["choices"][0]["finish_reason"].as_str().unwrap();
                assert!(
                    (reason == "length" && done == 6) || (reason == "stop" && done <= 6),
                    "{body}"
                );
            }
        }
    }
    let uri = format!("file://{}/tiny-mamba.gguf", dir.path().display());
    let (s, body) = c
        .post(
            "/models/load?wait=true",
            json!({"id": "m", "source": {"uri": uri}}),
        )
        .await;
    assert_eq!(s, 422, "{body}");
    assert_eq!(
        body["error"]["message"],
        "architecture 'mamba' (general.architecture) is not supported; supported: llama, qwen2, qwen3, gemma3"
    );
}
