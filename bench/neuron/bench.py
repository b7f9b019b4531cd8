"""Prompt and decode tokens/s: cortex neuron (our kernels, and candle's as they are) vs llama.cpp,
same GGUF, same threads, greedy; and the decode limit set by memory bandwidth."""

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
import numpy as np

import wide_model

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


WORDS = ["Amber", "Birch", "Cedar", "Delta", "Ember", "Fjord", "Grove", "Harbor", "Island", "Juniper",
         "Kestrel", "Lantern", "Meadow", "Nectar", "Orchid", "Pebble"]


def distinct(llm, run, text, n):
    """`n` tokens of `text` (repeated as needed) behind words of this run's own, and their text:
    no two runs share a first block, so none finds another's prefix in the cache."""
    head = f"Chapter {WORDS[run % len(WORDS)]} {run}. "
    body = head
    while len(llm.tokenize(body.encode(), add_bos=False)) < n:
        body += text + " "
    tokens = llm.tokenize(body.encode(), add_bos=False)[:n]
    # The text round-trips to the same tokens (cortex tokenizes it again).
    prompt = llm.detokenize(tokens).decode(errors="ignore")
    tokens = llm.tokenize(prompt.encode(), add_bos=False)
    return tokens, prompt


def prefix_hits(url, model):
    """Prompt tokens the neuron took from a kept prefix instead of computing (`vllm:prefix_cache_hits`)."""
    with urllib.request.urlopen(f"{url}/metrics", timeout=60) as r:
        for line in r.read().decode().splitlines():
            if line.startswith("vllm:prefix_cache_hits_total{") and f'model_name="{model}"' in line:
                return float(line.split()[-1])
    return 0.0


def last_logits(llm):
    """The logits of the last token evaluated, read from llama.cpp (`Llama.scores` stays zero
    unless the model was opened with `logits_all`, and greedy decoding then fed token 0)."""
    return np.ctypeslib.as_array(llama_cpp.llama_get_logits_ith(llm.ctx, -1), shape=(llm.n_vocab(),))


def llama_run(llm, tokens, n_new):
    llm.reset()
    t0 = time.perf_counter()
    llm.eval(tokens)
    t1 = time.perf_counter()
    tok = int(last_logits(llm).argmax())
    t2 = time.perf_counter()
    for _ in range(n_new - 1):
        llm.eval([tok])
        tok = int(last_logits(llm).argmax())
    t3 = time.perf_counter()
    return len(tokens) / (t1 - t0), (n_new - 1) / (t3 - t2)


def requantized(src, shipped, ftype_name):
    """A copy of `src` (whose name holds its type, `shipped`) requantised to another type
    (llama.cpp's quantizer), made once beside it."""
    dst = src.with_name(src.name.replace(shipped, ftype_name))
    if not dst.exists():
        params = llama_cpp.llama_model_quantize_default_params()
        params.ftype = getattr(llama_cpp, f"LLAMA_FTYPE_MOSTLY_{ftype_name}")
        params.allow_requantize = True
        params.nthread = 2
        rc = llama_cpp.llama_model_quantize(str(src).encode(), str(dst).encode(), params)
        if rc != 0:
            raise SystemExit(f"bench: requantising {src} to {ftype_name} failed ({rc})")
    return dst


def read_bandwidth(threads):
    """Bytes per second `threads` threads read from memory together (each sums its share of
    512 MB; numpy releases the GIL while it sums), best of 3: the same threads decode uses."""
    from concurrent.futures import ThreadPoolExecutor
    a = np.ones(64 << 20, dtype=np.float64)
    parts = np.array_split(a, threads)
    best = float("inf")
    with ThreadPoolExecutor(threads) as pool:
        for _ in range(3):
            t = time.perf_counter()
            list(pool.map(np.sum, parts))
            best = min(best, time.perf_counter() - t)
    return a.nbytes / best


def start_neuron(binary, dirs, threads, extra_env):
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    env = {**os.environ, "RAYON_NUM_THREADS": str(threads), "RUST_LOG": "warn", **extra_env}
    proc = subprocess.Popen([binary, "--listen", f"127.0.0.1:{port}", "--model-dirs", dirs, "--device", "cpu"], env=env)
    for _ in range(200):
        try:
            urllib.request.urlopen(f"{url}/healthz", timeout=1)
            break
        except OSError:
            time.sleep(0.05)
    return proc, url


def load(url, name, path, context=1024):
    post(f"{url}/models/load?wait=true", {"id": name, "source": {"uri": f"file://{pathlib.Path(path).resolve()}"},
                                          "contextLength": context}).read()


# Agent-length prompts: (model file, context, prompt lengths). The lengths fill the context
# less the tokens decoded after them.
LONG = [("SmolLM2-135M-Instruct.Q4_1.gguf", 8192, [512, 2048, 4096, 8100]),
        ("gemma-3-270m-Q4_K_M.gguf", 32768, [16384, 32600])]


def long_prompts(a, url):
    """Prompt tokens/s as the prompt grows, and decode tokens/s after it, cortex beside llama.cpp
    (flash attention on, as llama.cpp picks on CPU by default, and off)."""
    rows = []
    for file, context, lengths in LONG:
        path = str(pathlib.Path(a.model_dir) / file)
        name = f"long-{file}"
        load(url, name, path, context)
        llms = {fa: llama_cpp.Llama(model_path=path, n_ctx=context, n_threads=a.threads,
                                    n_threads_batch=a.threads, n_batch=512, verbose=False,
                                    flash_attn=fa) for fa in (True, False)}
        run = 100
        for n in lengths:
            res = {e: [] for e in ("cortex", True, False)}
            for _ in range(a.long_runs):
                run += 1
                tokens, prompt = distinct(llms[True], run, TEXT, n)
                res["cortex"].append(cortex_run(url, name, prompt, a.long_new_tokens)[1:])
                for fa, llm in llms.items():
                    res[fa].append(llama_run(llm, tokens, a.long_new_tokens))
            med = {e: (statistics.median(x[0] for x in r), statistics.median(x[1] for x in r)) for e, r in res.items()}
            rows.append((file, n, med))
            print(f"bench: {file} {n} tokens: {med}", flush=True)
        if (hits := prefix_hits(url, name)) > 0:
            raise SystemExit(f"bench: cortex reused {hits:.0f} cached prompt tokens of {name}")
        post(f"{url}/models/unload", {"id": name}).read()
        del llms
    print(f"\nlong prompts: threads={a.threads} runs={a.long_runs} (median), then {a.long_new_tokens} tokens decoded; "
          "llama.cpp with flash attention (fa) and without")
    print(f"{'model':32} {'prompt':>6} {'pp cortex':>9} {'pp fa':>7} {'pp no-fa':>8} {'ratio':>5} "
          f"{'tg cortex':>9} {'tg fa':>7} {'tg no-fa':>8} {'ratio':>5}")
    for file, n, med in rows:
        cp, cd = med["cortex"]
        bp, bd = max(med[True][0], med[False][0]), max(med[True][1], med[False][1])
        print(f"{file:32} {n:6} {cp:9.1f} {med[True][0]:7.1f} {med[False][0]:8.1f} {cp / bp:5.2f} "
              f"{cd:9.1f} {med[True][1]:7.1f} {med[False][1]:8.1f} {cd / bd:5.2f}")
    print("ratio: cortex against the faster of llama.cpp's two")


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--neuron", required=True)
    ap.add_argument("--model-dir", required=True)
    ap.add_argument("--models", nargs="*")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--runs", type=int, default=3)
    ap.add_argument("--new-tokens", type=int, default=128)
    ap.add_argument("--no-candle", action="store_true", help="skip candle's own kernels (CORTEX_KERNELS=candle)")
    ap.add_argument("--long", action="store_true", help="only the agent-length prompts (512 to 32k tokens)")
    ap.add_argument("--long-runs", type=int, default=1)
    ap.add_argument("--long-new-tokens", type=int, default=64)
    a = ap.parse_args()
    if a.long:
        proc, url = start_neuron(a.neuron, a.model_dir, a.threads, {})
        try:
            long_prompts(a, url)
        finally:
            proc.kill()
        return
    if a.models:
        models = a.models
    else:
        # Every type the kernels serve, on the same model (SmolLM2 as shipped in Q4_1), and the
        # listed three on Gemma 3 too (shipped in Q4_K_M).
        smol = pathlib.Path(a.model_dir) / "SmolLM2-135M-Instruct.Q4_1.gguf"
        gemma = pathlib.Path(a.model_dir) / "gemma-3-270m-Q4_K_M.gguf"
        models = [str(requantized(smol, "Q4_1", "Q4_0")), str(smol), str(requantized(smol, "Q4_1", "Q8_0")),
                  *(str(requantized(smol, "Q4_1", t)) for t in ("Q4_K_M", "Q5_K_M", "Q6_K")),
                  str(requantized(gemma, "Q4_K_M", "Q4_0")), str(requantized(gemma, "Q4_K_M", "Q4_1")), str(gemma)]
        # Both models are too narrow for K-quants in most matrices; this one is not (random
        # weights, for speed only: see wide_model.py).
        wide = pathlib.Path(a.model_dir) / f"{wide_model.NAME}.F16.gguf"
        if not wide.exists():
            wide_model.write(smol, wide)
        models += [str(requantized(wide, "F16", t)) for t in ("Q4_K_M", "Q5_K_M", "Q6_K")]
    dirs = ",".join(sorted({str(pathlib.Path(m).resolve().parent) for m in models}))
    bandwidth = read_bandwidth(a.threads)
    engines = {"cortex": start_neuron(a.neuron, dirs, a.threads, {})}
    if not a.no_candle:
        engines["candle"] = start_neuron(a.neuron, dirs, a.threads, {"CORTEX_KERNELS": "candle"})
    try:
        rows = []
        for path in models:
            name = pathlib.Path(path).name
            llm = llama_cpp.Llama(model_path=path, n_ctx=1024, n_threads=a.threads, n_threads_batch=a.threads,
                                  n_batch=512, verbose=False, logits_all=False)
            # Each run's prompt starts with its own words, so the neuron's prefix cache (blocks of
            # 64 tokens) has nothing to reuse: the prompt figure is prompt processing.
            prompts = [distinct(llm, run, TEXT, 127) for run in range(a.runs + 1)]
            for _, url in engines.values():
                load(url, name, path)
                cortex_run(url, name, prompts[-1][1], 8)  # warm-up
            llama_run(llm, prompts[-1][0], 8)
            # Engines take turns within each run, so a neighbour's load on the shared cores falls
            # on all of them alike rather than on whichever happened to run then.
            runs = {e: [] for e in [*engines, "llama"]}
            for tokens, prompt in prompts[:-1]:
                for e, (_, url) in engines.items():
                    runs[e].append(cortex_run(url, name, prompt, a.new_tokens))
                runs["llama"].append((len(tokens), *llama_run(llm, tokens, a.new_tokens)))
            for e, (_, url) in engines.items():
                # If a run had found another's prefix, its prompt figure would measure a hit.
                if (hits := prefix_hits(url, name)) > 0:
                    raise SystemExit(f"bench: {e} reused {hits:.0f} cached prompt tokens of {name}; "
                                     "its prompt tok/s would not be prompt processing")
                post(f"{url}/models/unload", {"id": name}).read()
            res = {e: (r[0][0], statistics.median(x[1] for x in r), statistics.median(x[2] for x in r))
                   for e, r in runs.items()}
            lp, ld = res.pop("llama")[1:]
            limit = bandwidth / os.path.getsize(path)
            rows.append((name, len(prompts[0][0]), res, lp, ld, limit))
            del llm
        print(f"\nthreads={a.threads} runs={a.runs} new_tokens={a.new_tokens} (median); "
              f"read bandwidth ({a.threads} threads) {bandwidth / 1e9:.1f} GB/s; decode limit = bandwidth / file size")
        print(f"{'model':36} {'pp candle':>9} {'pp cortex':>9} {'pp llama':>8} {'ratio':>5} "
              f"{'tg candle':>9} {'tg cortex':>9} {'tg llama':>8} {'ratio':>5} {'tg limit':>8}")
        for name, nl, res, lp, ld, limit in rows:
            nc, cp, cd = res["cortex"]
            kp, kd = (res["candle"][1], res["candle"][2]) if "candle" in res else (float("nan"),) * 2
            note = "" if nc == nl else f"  (prompt tokens differ: cortex {nc}, llama.cpp {nl})"
            print(f"{name:36} {kp:9.1f} {cp:9.1f} {lp:8.1f} {cp / lp:5.2f} "
                  f"{kd:9.1f} {cd:9.1f} {ld:8.1f} {cd / ld:5.2f} {limit:8.0f}{note}")
        print("\nweight bytes by tensor type:")
        for path in models:
            print(f"{pathlib.Path(path).name:36} {wide_model.type_shares(pathlib.Path(path))}")
    finally:
        for proc, _ in engines.values():
            proc.kill()


if __name__ == "__main__":
    main()
