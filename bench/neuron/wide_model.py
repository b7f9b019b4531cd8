"""A llama-architecture GGUF whose widths are multiples of 256, with random weights, for speed only.

Neither real test model (SmolLM2-135M: width 576; Gemma 3 270M: 640) can hold K-quants in most of
its matrices: llama.cpp's quantizer needs rows of whole 256-weight super-blocks and falls back to
Q5_0/Q5_1/Q8_0 elsewhere. This model (width 768, feed-forward 2048, 12 layers of 12 query and 4
key/value heads of 64, SmolLM2's tokenizer and vocabulary, tied output) is quantized by llama.cpp
into files where Q4_K, Q5_K and Q6_K carry nearly every weight, so the bench times those kernels
end to end. Its text is noise; the speed of a product does not depend on the values multiplied.
"""
import pathlib

import gguf
import numpy as np

WIDTH, FFN, LAYERS, HEADS, KV_HEADS, HEAD_DIM = 768, 2048, 12, 12, 4, 64
NAME = f"synthetic-llama-{WIDTH}x{LAYERS}"


def write(tokenizer_src: pathlib.Path, dst: pathlib.Path) -> None:
    """Writes the F16 model to `dst`, with the tokenizer metadata of the llama GGUF `tokenizer_src`."""
    src = gguf.GGUFReader(str(tokenizer_src))
    tmp = dst.with_suffix(".part")
    w = gguf.GGUFWriter(str(tmp), "llama")
    w.add_name(NAME)
    w.add_context_length(8192)
    w.add_embedding_length(WIDTH)
    w.add_block_count(LAYERS)
    w.add_feed_forward_length(FFN)
    w.add_head_count(HEADS)
    w.add_head_count_kv(KV_HEADS)
    w.add_rope_dimension_count(HEAD_DIM)
    w.add_rope_freq_base(100000.0)
    w.add_layer_norm_rms_eps(1e-5)
    w.add_file_type(gguf.LlamaFileType.MOSTLY_F16)
    vocab = 0
    for key, field in src.fields.items():
        if not key.startswith("tokenizer."):
            continue
        types = field.types
        sub = types[1] if types[0] == gguf.GGUFValueType.ARRAY else None
        w.add_key_value(key, field.contents(), types[0], sub_type=sub)
        if key == "tokenizer.ggml.tokens":
            vocab = len(field.contents())
    w.add_vocab_size(vocab)
    rng = np.random.default_rng(0)

    def matrix(rows, cols):
        return (rng.standard_normal((rows, cols), dtype=np.float32) * 0.02).astype(np.float16)

    w.add_tensor("token_embd.weight", matrix(vocab, WIDTH))
    w.add_tensor("output_norm.weight", np.ones(WIDTH, dtype=np.float32))
    for i in range(LAYERS):
        b = f"blk.{i}"
        w.add_tensor(f"{b}.attn_norm.weight", np.ones(WIDTH, dtype=np.float32))
        w.add_tensor(f"{b}.attn_q.weight", matrix(HEADS * HEAD_DIM, WIDTH))
        w.add_tensor(f"{b}.attn_k.weight", matrix(KV_HEADS * HEAD_DIM, WIDTH))
        w.add_tensor(f"{b}.attn_v.weight", matrix(KV_HEADS * HEAD_DIM, WIDTH))
        w.add_tensor(f"{b}.attn_output.weight", matrix(WIDTH, HEADS * HEAD_DIM))
        w.add_tensor(f"{b}.ffn_norm.weight", np.ones(WIDTH, dtype=np.float32))
        w.add_tensor(f"{b}.ffn_gate.weight", matrix(FFN, WIDTH))
        w.add_tensor(f"{b}.ffn_up.weight", matrix(FFN, WIDTH))
        w.add_tensor(f"{b}.ffn_down.weight", matrix(WIDTH, FFN))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    tmp.rename(dst)


def type_shares(path: pathlib.Path) -> str:
    """Each tensor type's share of a GGUF file's weight bytes, largest first."""
    shares: dict[str, int] = {}
    for t in gguf.GGUFReader(str(path)).tensors:
        shares[t.tensor_type.name] = shares.get(t.tensor_type.name, 0) + int(t.n_bytes)
    total = sum(shares.values())
    return ", ".join(f"{k} {v / total:.0%}" for k, v in sorted(shares.items(), key=lambda kv: -kv[1]))
