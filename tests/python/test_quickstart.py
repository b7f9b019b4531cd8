"""scripts/quickstart end to end, as the README's "Try it on one machine" runs it: it builds, fetches
the models, starts a neuron and the gateway, asks SmolLM2 with the curl command it prints and shows
the answer. `--check` then stops both and exits 0 (without it the fleet stays up for the user).
Each run gets free ports and a directory of its own, so a fleet the user runs is left alone, and
the debug build `scripts/test` has already made. Nothing quickstart starts may outlive it.
"""

import os
import signal
import socket
import subprocess

import pytest

from conftest import ROOT, free_port


def quickstart(tmp_path, **env):
    """Runs `scripts/quickstart --check` in a session of its own; its exit status, its output and
    the ports it was given. Fails when anything it started is still running after it exited."""
    ports = {"neuron": free_port(), "gateway": free_port(), "metrics": free_port()}
    proc = subprocess.Popen(
        [str(ROOT / "scripts" / "quickstart"), "--check"],
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        start_new_session=True,
        env={
            **os.environ,
            "CORTEX_QUICKSTART_PROFILE": "dev",
            "CORTEX_QUICKSTART_NEURON_PORT": str(ports["neuron"]),
            "CORTEX_QUICKSTART_PORT": str(ports["gateway"]),
            "CORTEX_QUICKSTART_METRICS_PORT": str(ports["metrics"]),
            "CORTEX_QUICKSTART_DIR": str(tmp_path),
            **env,
        },
    )
    try:
        # A first build of this package selection may take a while on two cores.
        out, _ = proc.communicate(timeout=1800)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        out, _ = proc.communicate()
        pytest.fail(f"scripts/quickstart --check did not finish in 30 minutes:\n{out}")
    # Its own session: every process it started is in this group, so none may be left.
    try:
        os.killpg(proc.pid, signal.SIGKILL)
        left = True
    except ProcessLookupError:
        left = False
    assert not left, f"scripts/quickstart left processes running after it exited:\n{out}"
    for name, port in ports.items():
        with socket.socket() as s:
            assert s.connect_ex(("127.0.0.1", port)) != 0, f"the {name} port {port} still answers:\n{out}"
    return proc.returncode, out, ports


def test_quickstart_asks_smollm2_through_the_gateway_and_shows_the_answer(tmp_path):
    code, out, ports = quickstart(tmp_path)
    assert code == 0, out
    gw = f"http://127.0.0.1:{ports['gateway']}"
    assert f"cortex is serving on {gw}" in out, out
    assert f"curl {gw}/v1/chat/completions" in out, out
    answer = [line for line in out.splitlines() if line.startswith("smollm2 says: ")]
    assert len(answer) == 1, out
    assert "Paris" in answer[0], out
    assert "the check passed" in out, out
    assert (tmp_path / "neuron.log").stat().st_size > 0
    assert f"127.0.0.1:{ports['neuron']}" in (tmp_path / "cortex.toml").read_text()


def test_quickstart_fails_loudly_naming_the_logs_when_smollm2_is_not_ready_in_time(tmp_path):
    code, out, _ = quickstart(tmp_path, CORTEX_QUICKSTART_WAIT_SECS="0")
    assert code == 1, out
    assert "smollm2 was not ready within 0 s (CORTEX_QUICKSTART_WAIT_SECS)" in out, out
    assert f"{tmp_path}/neuron.log and {tmp_path}/gateway.log" in out, out
    assert "smollm2 says" not in out, out
