"""Many clients at once: aggregate generation tokens/s and time to first token of a cortex neuron
(continuous batching) against llama.cpp's own server (`llama-server`, continuous batching over
`--parallel` slots) and llama-cpp-python's server (one request at a time), same GGUF, same
threads, streamed /v1/completions, greedy (or sampled as chat clients do, `--sampled`), in one run."""

import argparse
import itertools
import json
import os
import pathlib
import statistics
import subprocess
import sys
import threading
import time
import urllib.request

sys.path.insert(0, str(pathlib.Path(__file__).parent))
from bench import TEXT, free_port, load, post  # noqa: E402

# Short prompts, so the table is about decoding together rather than reading prompts.
PROMPT = TEXT.split(". ")[0] + "."


def wait_http(url, proc, what):
    for _ in range(1200):
        if proc.poll() is not None:
            raise SystemExit(f"bench: {what} exited with {proc.returncode}")
        try:
            urllib.request.urlopen(url, timeout=1)
            return
        except OSError:
            time.sleep(0.1)
    raise SystemExit(f"bench: {what} did not come up")


def stream(url, body, out, i):
    """One streamed completion: (seconds to first token, tokens, seconds to last token)."""
    t0 = time.perf_counter()
    first = last = None
    chunks = 0
    usage = None
    with post(f"{url}/v1/completions", body) as r:
        for line in r:
            line = line.decode().strip()
            if not line.startswith("data: ") or line == "data: [DONE]":
                continue
            chunk = json.loads(line[6:])
            if chunk.get("usage"):
                usage = chunk["usage"]
            if chunk.get("choices") and chunk["choices"][0].get("text"):
                now = time.perf_counter()
                first = first or now
                last = now
                chunks += 1
    # Chunks can merge tokens (multi-byte characters); usage counts them when the server sends it.
    tokens = usage["completion_tokens"] if usage else chunks
    out[i] = (first - t0, tokens, last - t0)


def run_level(engine, n):
    """n streams at once; returns (generated tokens/s over the wall time, TTFTs)."""
    out = [None] * n
    threads = [
        threading.Thread(target=stream, args=(engine["url"], engine["body"](i), out, i)) for i in range(n)
    ]
    t0 = time.perf_counter()
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    wall = time.perf_counter() - t0
    if any(o is None for o in out):
        raise SystemExit(f"bench: a stream to {engine['name']} failed")
    return sum(o[1] for o in out) / wall, [o[0] for o in out]


def pct(xs, p):
    xs = sorted(xs)
    return xs[min(len(xs) - 1, round(p / 100 * (len(xs) - 1)))]


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--neuron", required=True)
    ap.add_argument("--model-dir", required=True)
    ap.add_argument("--model", default="SmolLM2-135M-Instruct.Q4_1.gguf")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--levels", type=int, nargs="*", default=[1, 2, 4, 8, 16])
    ap.add_argument("--new-tokens", type=int, default=64)
    ap.add_argument("--runs", type=int, default=1, help="runs per level and engine (best taken)")
    ap.add_argument("--llama-server", help="llama.cpp's llama-server binary (build-llama-server)")
    ap.add_argument("--no-python-server", action="store_true", help="skip llama-cpp-python's server")
    ap.add_argument("--sampled", action="store_true",
                    help="temperature 1, top_p 0.95, a seed per request (what chat clients send) instead of greedy")
    args = ap.parse_args()
    path = pathlib.Path(args.model_dir) / args.model
    slots, ctx = max(args.levels), 1024
    n_new = args.new_tokens

    # Every request's prompt is new (a running story number opens it), so neither engine answers
    # from a prompt it cached on an earlier run: llama-server's slots keep their last prompt.
    serial = itertools.count(1)

    def prompt(_i):
        return f"Story {next(serial)}. {PROMPT}"

    # Greedy, or what chat clients send: every engine gets the same settings.
    def sampling(i):
        return {"temperature": 1.0, "top_p": 0.95, "seed": 1000 + i} if args.sampled else {"temperature": 0}

    engines, procs = [], []
    try:
        # cortex: KV room for every slot's full context, as llama-server gets below.
        kv = slots * ctx * 23040 if "SmolLM2" in path.name else 4 << 30
        proc, url = start_neuron_with(args.neuron, str(path.parent), args.threads, kv, slots)
        procs.append(proc)
        load(url, "m", path)
        engines.append({
            "name": "cortex", "url": url,
            "body": lambda i: {"model": "m", "prompt": prompt(i), "max_tokens": n_new, **sampling(i),
                               "ignore_eos": True, "stream": True, "stream_options": {"include_usage": True}},
        })
        if args.llama_server:
            port = free_port()
            proc = subprocess.Popen(
                [args.llama_server, "-m", str(path), "--host", "127.0.0.1", "--port", str(port),
                 "-t", str(args.threads), "-tb", str(args.threads), "-np", str(slots), "-c", str(slots * ctx),
                 "--cont-batching", "-ngl", "0", "--no-webui"],
                stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
            procs.append(proc)
            url = f"http://127.0.0.1:{port}"
            wait_http(f"{url}/health", proc, "llama-server")
            engines.append({
                "name": "llama-server", "url": url,
                "body": lambda i: {"prompt": prompt(i), "max_tokens": n_new, **sampling(i), "ignore_eos": True,
                                   "stream": True, "stream_options": {"include_usage": True}},
            })
        if not args.no_python_server:
            port = free_port()
            proc = subprocess.Popen(
                [sys.executable, "-m", "llama_cpp.server", "--model", str(path), "--host", "127.0.0.1",
                 "--port", str(port), "--n_threads", str(args.threads), "--n_threads_batch", str(args.threads),
                 "--n_ctx", str(ctx), "--interrupt_requests", "False", "--verbose", "False"],
                stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
            procs.append(proc)
            url = f"http://127.0.0.1:{port}"
            wait_http(f"{url}/v1/models", proc, "llama-cpp-python server")
            # No ignore_eos there: end-of-text tokens are banned instead, so every answer runs to n_new.
            engines.append({
                "name": "llama-cpp-python", "url": url,
                "body": lambda i: {"prompt": prompt(i), "max_tokens": n_new, **sampling(i), "stream": True,
                                   "logit_bias": {"0": -100, "2": -100}},
            })
        for e in engines:  # warm up
            run_level(e, 1)

        results = {e["name"]: {} for e in engines}
        for n in args.levels:
            for _ in range(args.runs):
                # Engines take turns inside each level, so load from neighbours falls on all alike.
                for e in engines:
                    rate, ttft = run_level(e, n)
                    best = results[e["name"]].get(n)
                    if best is None or rate > best[0]:
                        results[e["name"]][n] = (rate, ttft)
        report(path.name, args, engines, results)
    finally:
        for p in procs:
            p.kill()


def start_neuron_with(binary, dirs, threads, kv_bytes, slots):
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    env = {**os.environ, "RAYON_NUM_THREADS": str(threads), "RUST_LOG": "warn"}
    proc = subprocess.Popen([binary, "--listen", f"127.0.0.1:{port}", "--model-dirs", dirs, "--device", "cpu",
                             "--kv-cache-memory", str(kv_bytes), "--max-batch", str(slots)], env=env)
    wait_http(f"{url}/healthz", proc, "neuron")
    return proc, url


def report(model, args, engines, results):
    names = [e["name"] for e in engines]
    how = "temperature 1, top_p 0.95, seeded" if args.sampled else "greedy"
    print(f"\n{model}, {args.threads} threads, {args.new_tokens} new tokens per stream, short prompts, {how}; "
          f"generated tok/s = all streams' tokens / wall time\n")
    head = f"{'streams':>7}"
    for n in names:
        head += f" | {n + ' tok/s':>22} {'TTFT p50':>9} {'p99':>7}"
    for n in names[1:]:
        head += f" | {'cortex/' + n:>22}"
    print(head)
    for lvl in args.levels:
        row = f"{lvl:>7}"
        for n in names:
            rate, ttft = results[n][lvl]
            row += f" | {rate:>22.1f} {pct(ttft, 50):>8.2f}s {pct(ttft, 99):>6.2f}s"
        for n in names[1:]:
            row += f" | {results['cortex'][lvl][0] / results[n][lvl][0]:>21.2f}x"
        print(row)
    for n in names:
        one, eight = results[n].get(1), results[n].get(8)
        if one and eight:
            print(f"{n}: 8 streams / 1 stream = {eight[0] / one[0]:.2f}x")
    print(f"(median TTFT at 16 streams: "
          + ", ".join(f"{n} {statistics.median(results[n][max(args.levels)][1]):.2f}s" for n in names) + ")")


if __name__ == "__main__":
    main()
