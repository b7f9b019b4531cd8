"""Gateway overhead: latency and throughput through cortex, nginx (a bare proxy hop) and LiteLLM's
proxy against calling a fast fake OpenAI backend directly, in one run; then an end-to-end run on a
real neuron. See README.md beside this file."""

import argparse
import json
import os
import pathlib
import re
import shutil
import signal
import socket
import statistics
import subprocess
import tempfile
import time
import urllib.request


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_http(url, timeout=60):
    deadline = time.time() + timeout
    while time.time() < deadline:
        try:
            urllib.request.urlopen(url, timeout=1)
            return
        except urllib.error.HTTPError:
            return
        except OSError:
            time.sleep(0.1)
    raise SystemExit(f"{url} did not answer within {timeout} s")


CHAT = {"id": "chatcmpl-fake", "object": "chat.completion", "created": 0, "model": "fake",
        "choices": [{"index": 0, "message": {"role": "assistant", "content": "Paris is the capital of France."},
                     "finish_reason": "stop", "logprobs": None}],
        "usage": {"prompt_tokens": 12, "completion_tokens": 8, "total_tokens": 20}}


def sse_body(chunks=20):
    out = []
    for i in range(chunks):
        c = {"id": "chatcmpl-fake", "object": "chat.completion.chunk", "created": 0, "model": "fake",
             "choices": [{"index": 0, "delta": {"content": f"tok{i} "}, "finish_reason": None, "logprobs": None}]}
        out.append("data: " + json.dumps(c) + "\n\n")
    out.append("data: [DONE]\n\n")
    return "".join(out)


def status(model):
    return {"node": "fake", "version": "0", "devices": [{"index": 0, "name": "fake", "kind": "cpu",
            "memoryTotal": 1 << 34, "memoryFree": 1 << 34}], "inflight": 0, "queued": 0,
            "models": [{"id": model, "state": "ready", "progress": 1.0, "source": {"uri": "file:///fake.gguf"},
                        "bytes": 1, "device": "cpu", "contextLength": 4096, "inflight": 0, "queued": 0}]}


def nginx_escape(s):
    return s.replace("\\", "\\\\").replace("'", "\\'").replace("\n", "\\n")


def start_nginx(d, name, servers):
    conf = d / f"{name}.conf"
    conf.write_text(f"""
worker_processes 1;
daemon off;
pid {d}/{name}.pid;
error_log {d}/{name}.err warn;
events {{ worker_connections 4096; }}
http {{
  access_log off;
  client_body_temp_path {d}/{name}-body;
  proxy_temp_path {d}/{name}-proxy;
  keepalive_requests 1000000;
  {servers}
}}
""")
    return subprocess.Popen(["taskset", "-c", "0", "nginx", "-c", str(conf)], stderr=subprocess.DEVNULL)


def wrk(url, body, conns, seconds, warmup=False):
    script = pathlib.Path(tempfile.mkstemp(suffix=".lua")[1])
    script.write_text(f"wrk.method = 'POST'\nwrk.body = '{nginx_escape(json.dumps(body))}'\n"
                      "wrk.headers['Content-Type'] = 'application/json'\n")
    out = subprocess.run(["taskset", "-c", "1", "wrk", "-t1", f"-c{conns}", f"-d{seconds}s", "--timeout", "60s", "--latency", "-s", str(script), url],
                         capture_output=True, text=True).stdout
    script.unlink()
    if warmup:
        return None  # a slow proxy may finish nothing in a one-second warm-up: that is fine

    def ms(label):
        m = re.search(rf"^\s*{label}%\s+([\d.]+)(us|ms|s)\s*$", out, re.M)
        if not m:
            raise SystemExit(f"cannot read the {label}th percentile from wrk:\n{out}")
        v, unit = float(m.group(1)), m.group(2)
        return v / 1000 if unit == "us" else v * 1000 if unit == "s" else v

    reqs = int(re.search(r"(\d+) requests in", out).group(1))
    if reqs == 0:
        raise SystemExit(f"{url}: no request completed in {seconds} s\n{out}")
    non2xx = re.search(r"Non-2xx or 3xx responses: (\d+)", out)
    if non2xx:
        raise SystemExit(f"{url}: {non2xx.group(1)} failed responses\n{out}")
    return {"p50": ms("50"), "p99": ms("99"), "rps": float(re.search(r"Requests/sec:\s+([\d.]+)", out).group(1)), "reqs": reqs}


def vegeta(binary, url, body, conns, rate, seconds):
    """Open loop: requests leave at `rate` per second whatever the answers do (at most `conns` in flight on
    `conns` connections), so the latency is the proxy's, not the queue a closed loop builds at saturation."""
    d = pathlib.Path(tempfile.mkdtemp())
    (d / "body.json").write_text(json.dumps(body))
    (d / "targets").write_text(f"POST {url}\nContent-Type: application/json\n@{d / 'body.json'}\n")
    attack = subprocess.run(["taskset", "-c", "1", binary, "attack", "-format", "http", "-targets", str(d / "targets"),
                             "-rate", f"{rate}/1s", "-duration", f"{seconds}s", "-timeout", "60s",
                             "-connections", str(conns), "-max-connections", str(conns),
                             "-workers", str(conns), "-max-workers", str(conns)], capture_output=True,
                            env={**os.environ, "GOGC": "off"})  # no collector pauses in the client's own latencies
    report = subprocess.run([binary, "report", "-type", "json"], input=attack.stdout, capture_output=True)
    shutil.rmtree(d, ignore_errors=True)
    if attack.returncode or report.returncode:
        raise SystemExit(f"vegeta failed on {url}:\n{attack.stderr.decode()}{report.stderr.decode()}")
    r = json.loads(report.stdout)
    if r["status_codes"].keys() - {"200"}:
        raise SystemExit(f"{url}: failed responses under vegeta: {r['status_codes']} {r.get('errors')}")
    lat = r["latencies"]
    return {"p50": lat["50th"] / 1e6, "p99": lat["99th"] / 1e6, "rps": r["throughput"], "reqs": r["requests"]}


def chat(plain, sse, model, stream):
    """The URL and body of one chat completion for a target (its streaming backend when `stream`)."""
    body = {"model": model + ("-stream" if stream else ""), "messages": [{"role": "user", "content": "Hi"}]}
    if stream:
        body["stream"] = True
    return (sse if stream else plain) + "/v1/chat/completions", body


def measured(pids, warm_up, run):
    """`warm_up()`, then `run()` with the CPU the processes of `pids[0]` spent per request (0 without)."""
    warm_up()
    spent = lambda: cpu_seconds(tree(pids[0])) if pids else 0.0
    before = spent()
    r = run()
    r["cpu_us"] = (spent() - before) / max(r["reqs"], 1) * 1e6 if pids else 0.0
    return r


def cpu_seconds(pids):
    total = 0.0
    tick = os.sysconf("SC_CLK_TCK")
    for pid in pids:
        try:
            fields = pathlib.Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
            total += (int(fields[11]) + int(fields[12])) / tick
        except FileNotFoundError:
            pass
    return total


def tree(pid):
    out = subprocess.run(["pgrep", "-P", str(pid)], capture_output=True, text=True).stdout.split()
    pids = [pid]
    for c in out:
        pids += tree(int(c))
    return pids


def end_to_end(a, d, procs):
    """Direct and through the gateway on a real neuron, at concurrency 1 and 4."""
    p_n, p_gw2, p_gw2_m = free_port(), free_port(), free_port()
    neuron = subprocess.Popen([a.neuron, "--listen", f"127.0.0.1:{p_n}", "--model-dirs", a.model_dir, "--device", "cpu"],
                              env={**os.environ, "RUST_LOG": "warn"})
    procs.append(neuron)
    wait_http(f"http://127.0.0.1:{p_n}/healthz")
    (d / "real.toml").write_text(
        f'[gateway]\nlisten = "127.0.0.1:{p_gw2}"\nmetrics_listen = "127.0.0.1:{p_gw2_m}"\nmodels = "real-models.toml"\n'
        f'[[neurons]]\nname = "real"\nendpoint = "http://127.0.0.1:{p_n}"\n')
    (d / "real-models.toml").write_text(
        f'[[placements]]\nname = "smollm2"\npinned = true\nmodel = {{ uri = "file://{a.model_dir}/SmolLM2-135M-Instruct.Q4_1.gguf" }}\n')
    gw2 = subprocess.Popen([a.gateway, "serve", "--config", str(d / "real.toml")], env={**os.environ, "RUST_LOG": "warn"})
    procs.append(gw2)
    wait_http(f"http://127.0.0.1:{p_gw2}/healthz")
    deadline = time.time() + 60
    while time.time() < deadline and '"state":"ready"' not in urllib.request.urlopen(f"http://127.0.0.1:{p_gw2}/v1/models").read().decode():
        time.sleep(0.2)
    real = []
    for stream in (False, True):
        body = {"model": "smollm2", "max_tokens": 16, "temperature": 0, "ignore_eos": True,
                "messages": [{"role": "user", "content": "What is the capital of France?"}]}
        if stream:
            body["stream"] = True
        for c in (1, 4):
            base = None
            for name, url in (("direct", f"http://127.0.0.1:{p_n}"), ("cortex", f"http://127.0.0.1:{p_gw2}")):
                req = urllib.request.Request(url + "/v1/chat/completions", json.dumps(body).encode(), {"content-type": "application/json"})
                urllib.request.urlopen(req, timeout=60).read()  # warm-up: one whole answer
                r = wrk(url + "/v1/chat/completions", body, c, max(a.seconds, 10))
                base = base or r
                real.append(("stream" if stream else "json", c, name, r, base))

    return real


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--gateway", required=True)
    ap.add_argument("--neuron", help="the neuron binary for the end-to-end run; without it that run is skipped")
    ap.add_argument("--model-dir", required=True)
    ap.add_argument("--litellm")
    ap.add_argument("--seconds", type=int, default=5)
    ap.add_argument("--concurrency", default="1,16,64")
    ap.add_argument("--vegeta", help="vegeta binary: adds open-loop rows at --rate on 64 connections")
    ap.add_argument("--rate", default="2000,5000", help="offered loads (req/s, comma-separated) for the open-loop rows")
    ap.add_argument("--rounds", type=int, default=5, help="interleaved rounds per open-loop cell (the median is shown)")
    a = ap.parse_args()
    conc = [int(c) for c in a.concurrency.split(",")]
    d = pathlib.Path(tempfile.mkdtemp())
    procs = []
    try:
        p_plain, p_sse, p_nginx_plain, p_nginx_sse, p_gw, p_gw_m = (free_port() for _ in range(6))
        backend = f"""
  server {{ listen 127.0.0.1:{p_plain}; default_type application/json;
    location = /status {{ return 200 '{nginx_escape(json.dumps(status("fake")))}'; }}
    location / {{ return 200 '{nginx_escape(json.dumps(CHAT))}'; }} }}
  server {{ listen 127.0.0.1:{p_sse}; default_type text/event-stream;
    location = /status {{ default_type application/json; return 200 '{nginx_escape(json.dumps(status("fake-stream")))}'; }}
    location / {{ return 200 '{nginx_escape(sse_body())}'; }} }}"""
        procs.append(start_nginx(d, "backend", backend))
        proxy = f"""
  upstream plain {{ server 127.0.0.1:{p_plain}; keepalive 128; }}
  upstream sse {{ server 127.0.0.1:{p_sse}; keepalive 128; }}
  server {{ listen 127.0.0.1:{p_nginx_plain}; location / {{ proxy_pass http://plain; proxy_http_version 1.1; proxy_set_header Connection ""; }} }}
  server {{ listen 127.0.0.1:{p_nginx_sse}; location / {{ proxy_pass http://sse; proxy_http_version 1.1; proxy_set_header Connection ""; proxy_buffering off; }} }}"""
        nginx_proxy = start_nginx(d, "proxy", proxy)
        procs.append(nginx_proxy)
        (d / "cortex.toml").write_text(
            f'[gateway]\nlisten = "127.0.0.1:{p_gw}"\nmetrics_listen = "127.0.0.1:{p_gw_m}"\n'
            f'[[neurons]]\nname = "plain"\nendpoint = "http://127.0.0.1:{p_plain}"\n'
            f'[[neurons]]\nname = "sse"\nendpoint = "http://127.0.0.1:{p_sse}"\n')
        (d / "models.toml").write_text(
            '[[placements]]\nname = "fake"\nminReplicas = 0\nmodel = { uri = "file:///fake.gguf" }\n'
            '[[placements]]\nname = "fake-stream"\nminReplicas = 0\nmodel = { uri = "file:///fake.gguf" }\n')
        gw = subprocess.Popen(["taskset", "-c", "0", a.gateway, "serve", "--config", str(d / "cortex.toml")],
                              env={**os.environ, "RUST_LOG": "warn", "TOKIO_WORKER_THREADS": "1"})
        procs.append(gw)
        wait_http(f"http://127.0.0.1:{p_plain}/status")
        wait_http(f"http://127.0.0.1:{p_gw}/healthz")
        time.sleep(2.5)  # one status poll
        targets = [("direct", f"http://127.0.0.1:{p_plain}", f"http://127.0.0.1:{p_sse}", [], "fake"),
                   ("nginx", f"http://127.0.0.1:{p_nginx_plain}", f"http://127.0.0.1:{p_nginx_sse}", tree(nginx_proxy.pid), "fake"),
                   ("cortex", f"http://127.0.0.1:{p_gw}", f"http://127.0.0.1:{p_gw}", [gw.pid], "fake")]
        if a.litellm:
            p_ll = free_port()
            (d / "litellm.yaml").write_text(
                "model_list:\n"
                f"  - model_name: fake\n    litellm_params: {{model: openai/fake, api_base: 'http://127.0.0.1:{p_plain}/v1', api_key: x}}\n"
                f"  - model_name: fake-stream\n    litellm_params: {{model: openai/fake, api_base: 'http://127.0.0.1:{p_sse}/v1', api_key: x}}\n")
            ll = subprocess.Popen(["taskset", "-c", "0", a.litellm, "--config", str(d / "litellm.yaml"), "--port", str(p_ll),
                                   "--num_workers", "1"], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                                  # A loopback bench needs no master key; LiteLLM refuses to start without one unless told.
                                  env={**os.environ, "LITELLM_DANGEROUSLY_PERMIT_WEAK_OR_UNSET_MASTER_KEY": "true"})
            procs.append(ll)
            wait_http(f"http://127.0.0.1:{p_ll}/health/liveliness", timeout=120)
            targets.append(("litellm", f"http://127.0.0.1:{p_ll}", f"http://127.0.0.1:{p_ll}", tree(ll.pid), "fake"))
        rows = []
        for stream in (False, True):
            for c in conc:
                base = None
                for name, plain, sse, pids, model in targets:
                    url, body = chat(plain, sse, model, stream)
                    r = measured(pids, lambda: wrk(url, body, c, 1, warmup=True), lambda: wrk(url, body, c, a.seconds))
                    base = base or r
                    rows.append((("stream" if stream else "json"), c, name, r, base))
        # Open loop (vegeta): a fixed offered load on 64 connections. A closed loop at c=64 runs every proxy
        # flat out, so its p99 is mostly queueing; at a load the host can carry, the p99 is the proxy's own.
        open_rows = []
        if a.vegeta:
            for stream in (False, True):
                for rate in (int(x) for x in a.rate.split(",")):
                    runs = {}
                    # Rounds interleave the targets, and each cell reports the median of its rounds: on a shared
                    # VM one p99 moves by milliseconds between back-to-back runs of the same target.
                    for _ in range(a.rounds):
                        for name, plain, sse, pids, model in targets:
                            if name == "litellm":
                                continue  # tops out near 80 req/s: an offered load of thousands would only measure its queue
                            url, body = chat(plain, sse, model, stream)
                            r = measured(pids, lambda: vegeta(a.vegeta, url, body, 64, rate, 1),
                                         lambda: vegeta(a.vegeta, url, body, 64, rate, a.seconds))
                            runs.setdefault(name, []).append(r)
                    base = None
                    for name, rs in runs.items():
                        r = {k: statistics.median(x[k] for x in rs) for k in rs[0]}
                        r["p99s"] = sorted(x["p99"] for x in rs)
                        base = base or r
                        open_rows.append((("stream" if stream else "json"), rate, name, r, base))
        # End to end on a real neuron (SmolLM2, 16 tokens per answer): the gateway's share of a real request.
        real = end_to_end(a, d, procs) if a.neuron else []

        print(f"\n{a.seconds} s per cell; wrk on core 1, proxies and the fake backend on core 0; added = vs direct")
        print(f"{'mode':7}{'c':>4}  {'target':8}{'p50 ms':>9}{'p99 ms':>9}{'+p50 ms':>9}{'+p99 ms':>9}{'req/s':>10}"
              f"{'vs direct':>10}{'CPU µs/req':>12}  CPU and req/s against nginx and LiteLLM")
        by = {(mode, c, name): r for mode, c, name, r, _ in rows}
        for mode, c, name, r, base in rows:
            cpu = f"{r['cpu_us']:.0f}" if name != "direct" else "-"
            vs = []
            if name == "cortex":
                nginx, litellm = by.get((mode, c, "nginx")), by.get((mode, c, "litellm"))
                if nginx and nginx["cpu_us"]:
                    vs.append(f"{r['cpu_us'] / nginx['cpu_us']:.1f}× nginx's CPU")
                if litellm and r["cpu_us"]:
                    vs.append(f"{litellm['cpu_us'] / r['cpu_us']:.0f}× less CPU and {r['rps'] / litellm['rps']:.0f}× the req/s of LiteLLM")
            print(f"{mode:7}{c:>4}  {name:8}{r['p50']:9.3f}{r['p99']:9.3f}{r['p50'] - base['p50']:9.3f}{r['p99'] - base['p99']:9.3f}"
                  f"{r['rps']:10.0f}{r['rps'] / base['rps']:10.2f}{cpu:>12}  {'; '.join(vs)}")
        if open_rows:
            print(f"\nopen loop (vegeta on core 1, 64 connections, at most 64 in flight), a fixed offered load; "
                  f"median of {a.rounds} interleaved rounds of {a.seconds} s; added = vs direct")
            print(f"{'mode':7}{'req/s':>7}  {'target':8}{'p50 ms':>9}{'p99 ms':>9}{'+p50 ms':>9}{'+p99 ms':>9}{'served':>9}{'CPU µs/req':>12}  p99 of each round")
            for mode, rate, name, r, base in open_rows:
                cpu = f"{r['cpu_us']:.0f}" if name != "direct" else "-"
                print(f"{mode:7}{rate:>7}  {name:8}{r['p50']:9.3f}{r['p99']:9.3f}{r['p50'] - base['p50']:9.3f}{r['p99'] - base['p99']:9.3f}"
                      f"{r['rps']:9.0f}{cpu:>12}  {' '.join(f'{x:.2f}' for x in r['p99s'])}")
        if not real:
            return
        print("\nend to end on a real neuron (SmolLM2 Q4_1, CPU, 16 generated tokens per request)")
        print(f"{'mode':7}{'c':>4}  {'target':8}{'p50 ms':>9}{'p99 ms':>9}{'+p50 ms':>9}{'req/s':>8}{'vs direct':>10}")
        for mode, c, name, r, base in real:
            print(f"{mode:7}{c:>4}  {name:8}{r['p50']:9.1f}{r['p99']:9.1f}{r['p50'] - base['p50']:9.2f}{r['rps']:8.2f}{r['rps'] / base['rps']:10.2f}")
    finally:
        for p in procs:
            p.send_signal(signal.SIGTERM)
        for p in procs:
            try:
                p.wait(timeout=10)
            except subprocess.TimeoutExpired:
                p.kill()
        shutil.rmtree(d, ignore_errors=True)


if __name__ == "__main__":
    main()
