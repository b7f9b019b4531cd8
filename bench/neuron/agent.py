"""An agent conversation: a system prompt of about 4,000 tokens, then turns that each add the
previous answer and a new question (what Claude Code, IDE agents and chat UIs send). Time to first
token per turn, cortex's neuron beside llama.cpp's llama-server (which keeps each slot's prompt),
same GGUF, same threads, greedy, `/v1/chat/completions` streamed; and the cached prompt tokens each
reports. See README.md beside this file."""

import argparse
import json
import os
import pathlib
import socket
import subprocess
import time
import urllib.request

RULES = [
    "Read the files you change before you change them, and keep the style of the code around them.",
    "Prefer the smallest change that solves the problem; explain any change that touches public APIs.",
    "Run the tests that cover the code you changed, and report what they printed when they fail.",
    "Never commit secrets, credentials or generated files; check the diff before every commit.",
    "When a command fails, read its error before trying again, and do not repeat a failing command unchanged.",
    "Ask before deleting files, rewriting history or changing the build; say what will be lost.",
    "Quote file paths and line numbers when you refer to code, so the user can follow.",
    "Keep answers short: lead with the result, then the reasons, then what is left to do.",
]

TOOLS = ["read_file(path, offset, limit)", "edit_file(path, old, new)", "run(command, timeout)",
         "search(pattern, path, glob)", "list(path, depth)", "fetch(url)", "todo(items)", "ask(question)"]

QUESTIONS = [
    "Which tool would you use to find where a function is defined? One sentence.",
    "And to change one line of that file? One sentence.",
    "How do you check that the change did not break anything? One sentence.",
    "What do you do if the tests fail? One sentence.",
    "Summarise the three steps in one line.",
]


def system_prompt(tokens_wanted, count):
    """Rules and tool descriptions repeated with numbers until `count` says the text is long enough."""
    parts = ["You are a coding agent working in the user's repository. Follow these rules."]
    i = 0
    while count("\n".join(parts)) < tokens_wanted:
        parts.append(f"Rule {i + 1}: {RULES[i % len(RULES)]}")
        parts.append(f"Tool {i + 1}: {TOOLS[i % len(TOOLS)]} - use it only for what its name says; "
                     f"its output may be long, so read only what you need (section {i + 1}).")
        i += 1
    return "\n".join(parts)


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def post(url, body, timeout=900):
    req = urllib.request.Request(url, json.dumps(body).encode(), {"content-type": "application/json"})
    return urllib.request.urlopen(req, timeout=timeout)


def wait_http(url, proc, what):
    for _ in range(1200):
        if proc.poll() is not None:
            raise SystemExit(f"bench: {what} exited with {proc.returncode}")
        try:
            urllib.request.urlopen(url, timeout=1)
            return
        except OSError:
            time.sleep(0.1)
    raise SystemExit(f"bench: {what} did not answer at {url}")


def turn(url, model, messages, n_new):
    """Streams one answer; returns (time to first token, answer, prompt tokens, cached tokens)."""
    body = {"model": model, "messages": messages, "max_tokens": n_new, "temperature": 0, "stream": True,
            "stream_options": {"include_usage": True}}
    t0 = time.perf_counter()
    first = None
    text = ""
    prompt = cached = None
    with post(f"{url}/v1/chat/completions", body) as r:
        for line in r:
            line = line.decode().strip()
            if not line.startswith("data: ") or line == "data: [DONE]":
                continue
            chunk = json.loads(line[6:])
            for c in chunk.get("choices") or []:
                piece = (c.get("delta") or {}).get("content")
                if piece:
                    first = first or time.perf_counter()
                    text += piece
            if u := chunk.get("usage"):
                prompt = u.get("prompt_tokens")
                if (d := u.get("prompt_tokens_details")) is not None:
                    cached = d.get("cached_tokens")
            # llama-server reports what its slot reused as `timings.cache_n`.
            if (t := chunk.get("timings")) and "cache_n" in t:
                cached = t["cache_n"]
                prompt = prompt or t.get("cache_n", 0) + t.get("prompt_n", 0)
    return (first or time.perf_counter()) - t0, text, prompt, cached


def conversation(url, model, system, n_new):
    messages = [{"role": "system", "content": system}]
    rows = []
    for q in QUESTIONS:
        messages.append({"role": "user", "content": q})
        ttft, answer, prompt, cached = turn(url, model, messages, n_new)
        messages.append({"role": "assistant", "content": answer})
        rows.append((ttft, prompt, cached))
    return rows


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--neuron", required=True)
    ap.add_argument("--llama-server", required=True)
    ap.add_argument("--model", required=True)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--context", type=int, default=8192)
    ap.add_argument("--system-tokens", type=int, default=4000)
    ap.add_argument("--new-tokens", type=int, default=32)
    a = ap.parse_args()
    path = pathlib.Path(a.model).resolve()
    procs = []
    try:
        port = free_port()
        neuron = f"http://127.0.0.1:{port}"
        env = {**os.environ, "RAYON_NUM_THREADS": str(a.threads), "RUST_LOG": "warn"}
        procs.append(subprocess.Popen([a.neuron, "--listen", f"127.0.0.1:{port}", "--model-dirs", str(path.parent),
                                       "--device", "cpu"], env=env))
        wait_http(f"{neuron}/healthz", procs[-1], "neuron")
        post(f"{neuron}/models/load?wait=true", {"id": "agent", "source": {"uri": f"file://{path}"},
                                                 "contextLength": a.context}).read()
        port = free_port()
        server = f"http://127.0.0.1:{port}"
        procs.append(subprocess.Popen(
            [a.llama_server, "-m", str(path), "--host", "127.0.0.1", "--port", str(port), "-t", str(a.threads),
             "-tb", str(a.threads), "-np", "1", "-c", str(a.context), "-ngl", "0", "--no-webui", "--jinja"],
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL))
        wait_http(f"{server}/health", procs[-1], "llama-server")

        # Counted by the neuron's own tokenizer, through its chat template.
        def count(text):
            body = {"model": "agent", "messages": [{"role": "system", "content": text}], "max_tokens": 1}
            with post(f"{neuron}/v1/chat/completions", body) as r:
                return json.load(r)["usage"]["prompt_tokens"]

        # Tokens per character of this text, from one count of a sample of it.
        # (It starts with words of its own: the system prompt must be new to both engines.)
        sample = "Counting sample. " + system_prompt(600, len)
        per_char = count(sample) / len(sample)
        system = system_prompt(a.system_tokens, lambda t: len(t) * per_char)
        # The engines take turns: cortex's conversation, llama-server's, each from a cold cache
        # for this system prompt (it is new to both).
        results = {"cortex": conversation(neuron, "agent", system, a.new_tokens),
                   "llama-server": conversation(server, "agent", system, a.new_tokens)}
    finally:
        for p in procs:
            p.kill()
    print(f"\n{path.name}, context {a.context}, {a.threads} threads, system prompt {count_note(results)}, "
          f"{a.new_tokens} tokens per answer, greedy")
    print(f"{'turn':>4} {'prompt':>6} | {'cortex ttft s':>13} {'cached':>6} {'of turn 1':>9} | "
          f"{'llama-server ttft s':>19} {'cached':>6} {'of turn 1':>9} | {'ratio':>5}")
    c, l = results["cortex"], results["llama-server"]
    for i, ((ct, cp, cc), (lt, lp, lc)) in enumerate(zip(c, l)):
        print(f"{i + 1:4} {cp:6} | {ct:13.2f} {cc if cc is not None else '-':>6} {ct / c[0][0]:9.1%} | "
              f"{lt:19.2f} {lc if lc is not None else '-':>6} {lt / l[0][0]:9.1%} | {ct / lt:5.2f}")
    print("ratio: cortex time to first token / llama-server's (below 1: cortex answers sooner)")


def count_note(results):
    return f"{results['cortex'][0][1]} prompt tokens at turn 1"


if __name__ == "__main__":
    main()
