"""Faults and bad input through the official `openai` and `anthropic` SDKs: `cortex serve` in front of
a real neuron that is killed (SIGKILL) or frozen (SIGSTOP) mid-stream, wrong API keys, malformed
bodies. Each fault test gets its own neuron and gateway, since it breaks them."""

import json
import os
import signal
import time
import urllib.error
import urllib.request

import anthropic
import openai
import pytest

from conftest import MODELS, SMOLLM2, Process, binary, free_port, http, model

KEY = "sk-faults"
IDLE = 3  # stream_idle_timeout_secs of these gateways
ESSAY = [{"role": "user", "content": "Write a very long essay about the history of the sea and its ships."}]


class Fleet:
    """One neuron and `cortex serve` with an API key and short timeouts; smollm2 pinned."""

    def __init__(self, d):
        nport, gport, mport = free_port(), free_port(), free_port()
        self.neuron = Process(
            [str(binary("neuron")), "--listen", f"127.0.0.1:{nport}", "--model-dirs", str(MODELS), "--device", "cpu"],
            f"http://127.0.0.1:{nport}",
        )
        (d / "cortex.toml").write_text(
            f'[gateway]\nlisten = "127.0.0.1:{gport}"\nmetrics_listen = "127.0.0.1:{mport}"\npoll_interval_secs = 0.2\n'
            f'api_keys = ["{KEY}"]\nstream_idle_timeout_secs = {IDLE}\nrequest_timeout_secs = 10\nload_timeout_secs = 60\n'
            f'[[neurons]]\nname = "local"\nendpoint = "http://127.0.0.1:{nport}"\n'
        )
        (d / "models.toml").write_text(
            f'[[placements]]\nname = "smollm2"\npinned = true\nmodel = {{ uri = "file://{model(SMOLLM2)}" }}\n'
        )
        self.gateway = Process([str(binary("cortex")), "serve", "--config", str(d / "cortex.toml")], f"http://127.0.0.1:{gport}")
        self.url = self.gateway.url
        deadline = time.time() + 60
        while time.time() < deadline:
            status, _ = http("GET", f"{self.neuron.url}/models/smollm2")
            if status == 200 and http("GET", f"{self.neuron.url}/models/smollm2")[1]["state"] == "ready":
                break
            time.sleep(0.1)
        else:
            pytest.fail("smollm2 never became ready on the neuron")
        # The gateway routes once its poller has seen it ready.
        while time.time() < deadline:
            _, body = http("GET", f"{self.url}/v1/models", token=KEY)
            if any(m["id"] == "smollm2" and m["state"] == "ready" for m in body["data"]):
                break
            time.sleep(0.1)
        else:
            pytest.fail(f"smollm2 never became ready behind the gateway: {body}")
        self.an = anthropic.Anthropic(base_url=self.url, api_key=KEY, max_retries=0, timeout=60)
        self.oa = openai.OpenAI(base_url=f"{self.url}/v1", api_key=KEY, max_retries=0, timeout=60)

    def signal(self, sig):
        os.kill(self.neuron.proc.pid, sig)

    def stop(self):
        if self.neuron.proc.poll() is None:
            self.signal(signal.SIGCONT)
        self.gateway.stop()
        self.neuron.stop()


@pytest.fixture
def fleet(tmp_path):
    f = Fleet(tmp_path)
    yield f
    f.stop()


@pytest.fixture(scope="module")
def shared(tmp_path_factory):
    """For the tests that break nothing."""
    f = Fleet(tmp_path_factory.mktemp("faults"))
    yield f
    f.stop()


def test_a_neuron_killed_mid_stream_ends_the_anthropic_stream_with_an_error(fleet):
    started = time.monotonic()
    texts = []
    with pytest.raises(anthropic.APIStatusError) as e:
        with fleet.an.messages.stream(model="smollm2", max_tokens=2000, messages=ESSAY) as s:
            for text in s.text_stream:
                texts.append(text)
                if len(texts) == 1:
                    fleet.neuron.proc.kill()
    assert texts, "the stream ended before its first text"
    assert time.monotonic() - started < 30, "the stream hung after its neuron died"
    assert e.value.body["type"] == "error", e.value.body
    assert "neuron" in e.value.body["error"]["message"], e.value.body
    # The gateway keeps serving: with its only neuron gone it says so, in the caller's dialect.
    with pytest.raises(anthropic.InternalServerError) as e:
        fleet.an.messages.create(model="smollm2", max_tokens=5, messages=[{"role": "user", "content": "hi"}])
    assert e.value.status_code == 503
    assert e.value.body["error"]["type"] == "overloaded_error"
    assert e.value.response.headers["retry-after"] == "10"
    assert fleet.oa.models.list().data


def freeze_after_first_chunk(fleet, chunks, at):
    """Reads `chunks` (from an SDK stream), freezing the neuron at the first and noting when in
    `at["frozen"]`; returns how many came."""
    n = 0
    for _ in chunks:
        n += 1
        if "frozen" not in at:
            fleet.signal(signal.SIGSTOP)
            at["frozen"] = time.monotonic()
    return n


def test_a_neuron_frozen_mid_stream_ends_the_openai_stream_within_the_idle_bound(fleet):
    at = {}
    stream = fleet.oa.chat.completions.create(model="smollm2", max_tokens=2000, messages=ESSAY, stream=True)
    with pytest.raises(openai.APIError) as e:
        freeze_after_first_chunk(fleet, stream, at)
    took = time.monotonic() - at["frozen"]
    assert IDLE - 0.5 < took < IDLE + 5, f"ended {took:.1f} s after the freeze"
    assert f"sent nothing for {IDLE} s mid-answer" in e.value.message, e.value.message
    fleet.signal(signal.SIGCONT)
    # The gateway keeps serving once the neuron thaws.
    r = fleet.oa.chat.completions.create(model="smollm2", max_tokens=3, messages=[{"role": "user", "content": "Hi"}])
    assert r.choices[0].message.content


def test_a_neuron_frozen_mid_stream_ends_the_anthropic_stream_within_the_idle_bound(fleet):
    at = {}
    with pytest.raises(anthropic.APIStatusError) as e:
        with fleet.an.messages.stream(model="smollm2", max_tokens=2000, messages=ESSAY) as s:
            freeze_after_first_chunk(fleet, s.text_stream, at)
    took = time.monotonic() - at["frozen"]
    assert IDLE - 0.5 < took < IDLE + 5, f"ended {took:.1f} s after the freeze"
    assert e.value.body["type"] == "error", e.value.body
    assert f"sent nothing for {IDLE} s mid-answer" in e.value.body["error"]["message"], e.value.body


def test_a_wrong_api_key_is_an_authentication_error_in_both_sdks(shared):
    an = anthropic.Anthropic(base_url=shared.url, api_key="sk-wrong", max_retries=0)
    with pytest.raises(anthropic.AuthenticationError) as e:
        an.messages.create(model="smollm2", max_tokens=5, messages=[{"role": "user", "content": "hi"}])
    assert e.value.body["error"]["type"] == "authentication_error"
    assert "x-api-key" in e.value.body["error"]["message"]
    oa = openai.OpenAI(base_url=f"{shared.url}/v1", api_key="sk-wrong", max_retries=0)
    with pytest.raises(openai.AuthenticationError) as e:
        oa.chat.completions.create(model="smollm2", messages=[{"role": "user", "content": "hi"}], max_tokens=3)
    assert e.value.code == "invalid_api_key"
    assert "Authorization: Bearer" in e.value.message
    # The right key, through the same SDKs, is served.
    r = shared.an.messages.create(model="smollm2", max_tokens=3, messages=[{"role": "user", "content": "hi"}])
    assert r.usage.output_tokens > 0


def raw_post(url, data):
    req = urllib.request.Request(url, data=data, method="POST",
                                 headers={"content-type": "application/json", "x-api-key": KEY})
    try:
        with urllib.request.urlopen(req, timeout=30) as r:
            return r.status, json.loads(r.read())
    except urllib.error.HTTPError as e:
        return e.code, json.loads(e.read())


@pytest.mark.parametrize("data", [b'{"model": "smollm2", "messages": [', b"not json", b"[1, 2]"])
def test_a_malformed_body_is_a_400_in_each_dialect(shared, data):
    for path in ("/v1/chat/completions", "/v1/completions"):
        status, body = raw_post(f"{shared.url}{path}", data)
        assert status == 400, (path, body)
        assert body["error"]["type"] == "invalid_request_error", body
        assert "JSON" in body["error"]["message"], body
    for path in ("/v1/messages", "/v1/messages/count_tokens"):
        status, body = raw_post(f"{shared.url}{path}", data)
        assert status == 400, (path, body)
        assert body["type"] == "error" and body["error"]["type"] == "invalid_request_error", body
        assert "request" in body["error"]["message"], body
