"""Fixtures for the end-to-end tests that drive cortex binaries with the official SDKs.

The binaries come from the cargo target directory (CARGO_TARGET_DIR, default ./target); the models
from scripts/fetch-test-models. Missing pieces fail loudly with the command that provides them.
"""

import json
import os
import pathlib
import socket
import subprocess
import time
import urllib.request

import pytest

ROOT = pathlib.Path(__file__).resolve().parents[2]
CACHE = pathlib.Path(os.environ.get("CORTEX_CACHE", pathlib.Path.home() / ".cache" / "cortex"))
MODELS = CACHE / "models"
SMOLLM2 = MODELS / "SmolLM2-135M-Instruct.Q4_1.gguf"
GEMMA3 = MODELS / "gemma-3-270m-Q4_K_M.gguf"


def binary(name: str) -> pathlib.Path:
    target = pathlib.Path(os.environ.get("CARGO_TARGET_DIR", ROOT / "target"))
    path = target / "debug" / name
    if not path.exists():
        pytest.fail(f"{path} is missing; build it with `cargo build --workspace` first")
    return path


def model(path: pathlib.Path) -> pathlib.Path:
    if not path.exists():
        pytest.fail(f"test model {path} is missing; run scripts/fetch-test-models first")
    return path


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def http(method: str, url: str, body=None, token=None):
    data = json.dumps(body).encode() if body is not None else None
    req = urllib.request.Request(url, data=data, method=method, headers={"content-type": "application/json"})
    if token:
        req.add_header("authorization", f"Bearer {token}")
    try:
        with urllib.request.urlopen(req, timeout=120) as r:
            return r.status, json.loads(r.read() or b"null")
    except urllib.error.HTTPError as e:
        return e.code, json.loads(e.read() or b"null")


class Process:
    def __init__(self, args, url):
        self.proc = subprocess.Popen(args, stdout=subprocess.DEVNULL, env={**os.environ, "RUST_LOG": "warn"})
        self.url = url
        deadline = time.time() + 20
        while time.time() < deadline:
            try:
                with urllib.request.urlopen(f"{url}/healthz", timeout=1):
                    return
            except OSError:
                time.sleep(0.05)
        self.proc.kill()
        pytest.fail(f"{args[0]} did not answer /healthz within 20 s")

    def stop(self):
        self.proc.kill()
        self.proc.wait()


@pytest.fixture(scope="session")
def neuron():
    """A real neuron serving SmolLM2 (as `smollm2`) and Gemma 3 270M (as `gemma3`) on the CPU."""
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    p = Process([str(binary("neuron")), "--listen", f"127.0.0.1:{port}", "--model-dirs", str(MODELS), "--device", "cpu"], url)
    for name, path in [("smollm2", SMOLLM2), ("gemma3", GEMMA3)]:
        status, body = http("POST", f"{url}/models/load?wait=true", {"id": name, "source": {"uri": f"file://{model(path)}"}})
        assert status == 200, body
    yield p
    p.stop()


@pytest.fixture(scope="session")
def gateway(tmp_path_factory):
    """`cortex serve` in static mode in front of one real neuron: smollm2 pinned and loaded at start,
    gemma3 loaded on first use."""
    d = tmp_path_factory.mktemp("fleet")
    nport, gport, mport = free_port(), free_port(), free_port()
    neuron = Process(
        [str(binary("neuron")), "--listen", f"127.0.0.1:{nport}", "--model-dirs", str(MODELS), "--device", "cpu"],
        f"http://127.0.0.1:{nport}",
    )
    (d / "cortex.toml").write_text(
        f'[gateway]\nlisten = "127.0.0.1:{gport}"\nmetrics_listen = "127.0.0.1:{mport}"\npoll_interval_secs = 0.2\n'
        f'[[neurons]]\nname = "local"\nendpoint = "http://127.0.0.1:{nport}"\n'
    )
    (d / "models.toml").write_text(
        f'[[placements]]\nname = "smollm2"\npinned = true\nmodel = {{ uri = "file://{model(SMOLLM2)}" }}\n'
        f'[[placements]]\nname = "gemma3"\nminReplicas = 0\ncontextLength = 2048\nmodel = {{ uri = "file://{model(GEMMA3)}" }}\n'
    )
    gw = Process([str(binary("cortex")), "serve", "--config", str(d / "cortex.toml")], f"http://127.0.0.1:{gport}")
    gw.metrics_url = f"http://127.0.0.1:{mport}/metrics"
    gw.neuron_url = neuron.url
    deadline = time.time() + 60
    while time.time() < deadline:
        _, body = http("GET", f"{gw.url}/v1/models")
        if any(m["id"] == "smollm2" and m["state"] == "ready" for m in body["data"]):
            break
        time.sleep(0.1)
    else:
        pytest.fail(f"smollm2 never became ready behind the gateway: {body}")
    yield gw
    gw.stop()
    neuron.stop()
