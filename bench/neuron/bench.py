"""Prompt and decode tokens/s: cortex neuron vs llama.cpp, same GGUF, same threads, greedy."""

import argparse
import json
import os
import pathlib
import socket
import statistics
import subprocess
import time
import urllib.request

import llama_cpp

TEXT = (
    "The history of the city begins with a small settlement on an island in the river. Over the centuries "
    "it grew into a centre of trade, learning and government. Its bridges, markets and cathedrals drew "
    "merchants and scholars from far away, and its streets filled with the languages of many nations. "
    "Kings built palaces along the water, and the people built workshops, theatres and schools. Wars and "
    "revolutions changed its rulers many times, yet the city kept its character: a place of argument, "
    "invention and beauty. Today visitors walk along the old quays, climb the towers and sit in the cafes, "
    "and they ask the same question that travellers have asked for a thousand years: what makes this city"
)


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def post(url, body):
    req = urllib.request.Request(url, json.dumps(body).encode(), {"content-type": "application/json"})
    return urllib.request.urlopen(req, timeout=600)


def cortex_run(url, model, prompt, n_new):
    t0 = time.perf_counter()
    first = last = None
    n = 0
    usage = None
    body = {"model": model, "prompt": prompt, "max_tokens": n_new, "temperature": 0, "ignore_eos": True,
            "stream": True, "stream_options": {"include_usage": True}}
    with post(f"{url}/v1/completions", body) as r:
        for line in r:
            line = line.decode().strip()
            if not line.startswith("data: ") or line == "data: [DONE]":
                continue
            chunk = json.loads(line[6:])
            if chunk.get("usage"):
                usage = chunk["usage"]
            if chunk["choices"] and chunk["choices"][0]["text"]:
                now = time.perf_counter()
                first = first or now
                last = now
                n += 1
    # Text chunks can merge tokens (multi-byte characters); the token counts come from usage.
    gen = usage["completion_tokens"]
    return usage["prompt_tokens"], usage["prompt_tokens"] / (first - t0), (gen - 1) / (last - first)


def llama_run(llm, tokens, n_new):
    llm.reset()
    t0 = time.perf_counter()
    llm.eval(tokens)
    t1 = time.perf_counter()
    tok = int(llm.scores[llm.n_tokens - 1].argmax())
    t2 = time.perf_counter()
    for _ in range(n_new - 1):
        llm.eval([tok])
        tok = int(llm.scores[llm.n_tokens - 1].argmax())
    t3 = time.perf_counter()
    return len(tokens) / (t1 - t0), (n_new - 1) / (t3 - t2)


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--neuron", required=True)
    ap.add_argument("--model-dir", required=True)
    ap.add_argument("--models", nargs="*")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--runs", type=int, default=3)
    ap.add_argument("--new-tokens", type=int, default=128)
    a = ap.parse_args()
    models = a.models or [
        str(pathlib.Path(a.model_dir) / "SmolLM2-135M-Instruct.Q4_1.gguf"),
        str(pathlib.Path(a.model_dir) / "gemma-3-270m-Q4_K_M.gguf"),
    ]
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    dirs = ",".join(sorted({str(pathlib.Path(m).resolve().parent) for m in models}))
    env = {**os.environ, "RAYON_NUM_THREADS": str(a.threads), "RUST_LOG": "warn"}
    neuron = subprocess.Popen([a.neuron, "--listen", f"127.0.0.1:{port}", "--model-dirs", dirs, "--device", "cpu"], env=env)
    try:
        for _ in range(200):
            try:
                urllib.request.urlopen(f"{url}/healthz", timeout=1)
                break
            except OSError:
                time.sleep(0.05)
        rows = []
        for path in models:
            name = pathlib.Path(path).name
            llm = llama_cpp.Llama(model_path=path, n_ctx=1024, n_threads=a.threads, n_threads_batch=a.threads,
                                  n_batch=512, verbose=False, logits_all=False)
            tokens = llm.tokenize(TEXT.encode(), add_bos=False)[:127]
            prompt = llm.detokenize(tokens).decode()
            post(f"{url}/models/load?wait=true", {"id": name, "source": {"uri": f"file://{pathlib.Path(path).resolve()}"},
                                                  "contextLength": 1024}).read()
            cortex_run(url, name, prompt, 8)  # warm-up
            llama_run(llm, tokens, 8)
            c = [cortex_run(url, name, prompt, a.new_tokens) for _ in range(a.runs)]
            l = [llama_run(llm, tokens, a.new_tokens) for _ in range(a.runs)]
            n_prompt = c[0][0]
            cp, cd = statistics.median(x[1] for x in c), statistics.median(x[2] for x in c)
            lp, ld = statistics.median(x[0] for x in l), statistics.median(x[1] for x in l)
            rows.append((name, n_prompt, len(tokens), cp, lp, cd, ld))
            post(f"{url}/models/unload", {"id": name}).read()
            del llm
        print(f"\nthreads={a.threads} runs={a.runs} new_tokens={a.new_tokens} (median)")
        print(f"{'model':38} {'prompt':>6} {'pp cortex':>10} {'pp llama':>9} {'ratio':>6} {'tg cortex':>10} {'tg llama':>9} {'ratio':>6}")
        for name, nc, nl, cp, lp, cd, ld in rows:
            note = "" if nc == nl else f"  (prompt tokens differ: cortex {nc}, llama.cpp {nl})"
            print(f"{name:38} {nc:6d} {cp:10.1f} {lp:9.1f} {cp / lp:6.2f} {cd:10.1f} {ld:9.1f} {cd / ld:6.2f}{note}")
    finally:
        neuron.kill()


if __name__ == "__main__":
    main()
