"""Claude Code (Anthropic's coding agent, from npm) pointed at the gateway with ANTHROPIC_BASE_URL.

The binary comes from scripts/claude-code (cached under ~/.cache/cortex/claude-code). Claude Code
streams /v1/messages with its own fields (adaptive thinking, context management, cache_control on
blocks, `system` messages among the messages, a billing header that changes on every request); the
gateway must take them all, and keep the prompt's prefix stable for the neurons' prefix cache.
"""

import json
import os
import pathlib
import subprocess
import urllib.request

import pytest

from conftest import CACHE


@pytest.fixture(scope="module")
def claude():
    path = pathlib.Path(os.environ.get("CORTEX_CLAUDE_CODE", CACHE / "claude-code" / "node_modules" / ".bin" / "claude"))
    if not path.exists():
        pytest.fail(f"Claude Code is missing at {path}; install it with scripts/claude-code")
    return path


def run(claude, gateway, tmp_path, prompt, *args, max_output=200, timeout=180):
    env = {
        **os.environ,
        "HOME": str(tmp_path),
        "ANTHROPIC_BASE_URL": gateway.url,
        "ANTHROPIC_API_KEY": "sk-unused",
        # What a local model fits; Claude Code asks for 32,000 otherwise.
        "CLAUDE_CODE_MAX_OUTPUT_TOKENS": str(max_output),
        "DISABLE_TELEMETRY": "1",
        "DISABLE_AUTOUPDATER": "1",
        "CLAUDE_CODE_DISABLE_NONESSENTIAL_TRAFFIC": "1",
    }
    p = subprocess.run(
        [str(claude), "-p", prompt, "--model", "smollm2", "--no-session-persistence", "--output-format", "json", *args],
        env=env, cwd=tmp_path, capture_output=True, text=True, timeout=timeout,
    )
    lines = [l for l in p.stdout.splitlines() if l.startswith("{")]
    assert lines, f"Claude Code printed no result (exit {p.returncode}):\n{p.stdout}\n{p.stderr}"
    return p.returncode, json.loads(lines[-1])


def test_claude_code_answers_through_the_gateway(claude, gateway, tmp_path):
    code, r = run(claude, gateway, tmp_path, "What is the capital of France? Answer in one word.",
                  "--bare", "--tools", "", "--system-prompt", "You are a helpful assistant.")
    brief = {k: r.get(k) for k in ("subtype", "result", "stop_reason", "api_error_status", "num_turns", "usage")}
    assert r["api_error_status"] is None and r["subtype"] == "success", brief
    if code == 0:
        assert not r["is_error"] and r["result"].strip(), brief
    else:
        # SmolLM2 samples (Claude Code sends no temperature) and sometimes rambles past the
        # 200 tokens: Claude Code then reports the length stop it was given as `max_tokens`.
        assert "exceeded the 200 output token maximum" in r["result"], brief
    # Usage reached Claude Code from the stream (message_start and message_delta), not zero.
    assert r["usage"]["input_tokens"] > 20 and r["usage"]["output_tokens"] > 0, r


def test_claude_code_with_its_whole_agent_prompt(claude, gateway, tmp_path):
    # Its default agent: tools, `system` messages among the messages with its reminders, adaptive
    # thinking, context management. About 4,000 tokens reach SmolLM2 (its template leaves the
    # tool definitions out), so the first turn takes a while on two cores.
    turns = []
    for prompt in ("Say hi.", "Say hello."):
        code, r = run(claude, gateway, tmp_path, prompt, "--max-turns", "1", max_output=16, timeout=600)
        assert r["api_error_status"] is None, r
        # The model may answer, or call one of the offered tools (which ends the one turn allowed).
        assert r["subtype"] in ("success", "error_max_turns"), (code, r)
        u = r["usage"]
        prompt_tokens = u["input_tokens"] + u["cache_read_input_tokens"] + u["cache_creation_input_tokens"]
        assert prompt_tokens > 2000 and u["output_tokens"] > 0, u
        turns.append(u)
    # The second run sends the same system prompt and tools (its billing header, which changes on
    # every request, is dropped by the gateway): the neuron's prefix cache reads all of them and
    # computes only the new question, and Claude Code is told so.
    first, second = turns
    # Claude Code makes several requests in one run (it asks again when an answer stops at
    # max_tokens); its usage sums them. The first run computes the prompt once and keeps it.
    assert first["cache_creation_input_tokens"] > 2000, first
    # The second run computes almost nothing: every request reads the system prompt and tools.
    assert second["cache_read_input_tokens"] > 2000, second
    assert second["input_tokens"] + second["cache_creation_input_tokens"] < 1000, second
    read = second["cache_read_input_tokens"]
    assert read / (read + second["input_tokens"] + second["cache_creation_input_tokens"]) > 0.9, second
    # And the gateway counts what was read, by model.
    text = urllib.request.urlopen(gateway.metrics_url).read().decode()
    cached = sum(float(l.split()[-1]) for l in text.splitlines()
                 if l.startswith("cortex_gateway_prompt_cached_tokens_total{") and 'model="smollm2"' in l)
    assert cached >= first["cache_read_input_tokens"] + second["cache_read_input_tokens"], text
