"""The official `openai` and `anthropic` Python SDKs against `cortex serve` (static mode) and a real neuron."""

import anthropic
import openai
import pytest

QUESTION = "What is the capital of France? Answer in one sentence."


@pytest.fixture(scope="module")
def oa(gateway):
    return openai.OpenAI(base_url=f"{gateway.url}/v1", api_key="unused", max_retries=0)


@pytest.fixture(scope="module")
def an(gateway):
    return anthropic.Anthropic(base_url=gateway.url, api_key="unused", max_retries=0)


def test_catalogue_lists_loaded_and_cold_models(oa):
    models = {m.id: m for m in oa.models.list()}
    assert models["smollm2"].model_extra["state"] == "ready"
    assert "gemma3" in models


def test_openai_chat_through_the_gateway(oa):
    r = oa.chat.completions.create(model="smollm2", messages=[{"role": "user", "content": QUESTION}], temperature=0, max_tokens=40)
    assert "Paris" in r.choices[0].message.content


def test_anthropic_messages(an):
    r = an.messages.create(model="smollm2", max_tokens=40, extra_body={"temperature": 0}, system="You are a helpful assistant.",
                           messages=[{"role": "user", "content": QUESTION}])
    assert r.type == "message" and r.role == "assistant"
    assert "Paris" in r.content[0].text
    assert r.stop_reason == "end_turn"
    assert r.usage.input_tokens > 10 and r.usage.output_tokens > 3


def test_anthropic_stream_matches_and_reports_usage(an):
    kwargs = dict(model="smollm2", max_tokens=40, extra_body={"temperature": 0}, messages=[{"role": "user", "content": QUESTION}])
    whole = an.messages.create(**kwargs)
    with an.messages.stream(**kwargs) as s:
        text = "".join(s.text_stream)
        final = s.get_final_message()
    assert text == whole.content[0].text
    assert final.stop_reason == whole.stop_reason
    assert final.usage.output_tokens == whole.usage.output_tokens > 0
    assert final.usage.input_tokens == whole.usage.input_tokens > 0
    # Clients that read usage from message_start (Claude Code does) see the prompt's tokens there.
    events = list(an.messages.create(stream=True, **kwargs))
    assert events[0].type == "message_start"
    assert events[0].message.usage.input_tokens == whole.usage.input_tokens


def test_anthropic_length_stop_is_max_tokens(an):
    r = an.messages.create(model="smollm2", max_tokens=3, messages=[{"role": "user", "content": "Tell me a long story."}])
    assert r.stop_reason == "max_tokens"
    assert r.usage.output_tokens == 3


def test_anthropic_stop_sequences_are_honoured_and_reported(an):
    base = dict(model="smollm2", max_tokens=40, extra_body={"temperature": 0}, messages=[{"role": "user", "content": QUESTION}])
    full = an.messages.create(**base).content[0].text
    word = full.split()[3]
    r = an.messages.create(stop_sequences=[word], **base)
    assert r.stop_reason == "stop_sequence"
    assert r.stop_sequence == word
    assert word not in r.content[0].text
    with an.messages.stream(stop_sequences=[word], **base) as s:
        final = s.get_final_message()
    assert (final.stop_reason, final.stop_sequence) == ("stop_sequence", word)


def test_a_cold_model_loads_for_an_anthropic_stream(an):
    with an.messages.stream(model="gemma3", max_tokens=8,
                            messages=[{"role": "user", "content": "Question: What is the capital of France?"}]) as s:
        final = s.get_final_message()
    assert final.usage.output_tokens > 0


def test_errors_come_in_each_callers_dialect(an, oa):
    with pytest.raises(anthropic.NotFoundError) as e:
        an.messages.create(model="claude-nope", max_tokens=5, messages=[{"role": "user", "content": "hi"}])
    assert e.value.body["error"]["type"] == "not_found_error"
    with pytest.raises(anthropic.BadRequestError) as e:
        an.messages.create(model="smollm2", max_tokens=5, messages=[{"role": "user", "content": [
            {"type": "image", "source": {"type": "base64", "media_type": "image/png", "data": "AAAA"}}]}])
    assert "image block" in e.value.body["error"]["message"]
    with pytest.raises(openai.NotFoundError):
        oa.chat.completions.create(model="claude-nope", messages=[{"role": "user", "content": "hi"}])


def test_count_tokens_matches_the_prompt_tokens_of_a_message(an):
    messages = [{"role": "user", "content": QUESTION}]
    counted = an.messages.count_tokens(model="smollm2", system="You are a helpful assistant.", messages=messages)
    used = an.messages.create(model="smollm2", max_tokens=2, system="You are a helpful assistant.", messages=messages)
    assert counted.input_tokens == used.usage.input_tokens > 10


def promtool(text):
    import shutil
    import subprocess

    if not shutil.which("promtool"):
        pytest.fail("promtool is missing; install it with `apt-get install prometheus` (scripts/test does)")
    return subprocess.run(["promtool", "check", "metrics"], input=text, capture_output=True, text=True)


def test_gateway_and_neuron_metrics_pass_promtool(gateway, oa):
    import urllib.request

    oa.chat.completions.create(model="smollm2", messages=[{"role": "user", "content": "Hi"}], max_tokens=3)
    text = urllib.request.urlopen(gateway.metrics_url).read().decode()
    assert "cortex_gateway_requests_total{" in text
    r = promtool(text)
    assert r.returncode == 0, r.stdout + r.stderr
    text = urllib.request.urlopen(f"{gateway.neuron_url}/metrics").read().decode()
    assert "vllm:time_to_first_token_seconds_bucket{" in text
    r = promtool(text)
    # vLLM's names carry a colon, which promtool's style lint flags; nothing else may be flagged.
    problems = [l for l in (r.stdout + r.stderr).splitlines() if l.strip() and "should not contain ':'" not in l]
    assert problems == [], problems


def metric_sum(text, name):
    """Sum of the samples of `name` (any labels)."""
    total = 0.0
    for line in text.splitlines():
        if line.startswith(name + "{") or line.startswith(name + " "):
            total += float(line.rsplit(" ", 1)[1])
    return total


def test_gateway_counts_tokens_itl_and_queue_time_and_keeps_usage_opt_in(gateway, oa):
    import urllib.request

    def scrape():
        return urllib.request.urlopen(gateway.metrics_url).read().decode()

    before = scrape()
    msgs = [{"role": "user", "content": QUESTION}]
    # A stream without include_usage gets no usage chunk, though the gateway asked the neuron for one.
    chunks = list(oa.chat.completions.create(model="smollm2", messages=msgs, max_tokens=12, temperature=0, stream=True))
    assert all(c.usage is None for c in chunks)
    assert all(c.model == "smollm2" for c in chunks)
    streamed_tokens = sum(1 for c in chunks if c.choices and c.choices[0].delta.content)
    # With include_usage it gets exactly one.
    chunks = list(oa.chat.completions.create(model="smollm2", messages=msgs, max_tokens=12, temperature=0, stream=True,
                                             stream_options={"include_usage": True}))
    usages = [c.usage for c in chunks if c.usage is not None]
    assert len(usages) == 1 and usages[0].completion_tokens > 3
    r = oa.chat.completions.create(model="smollm2", messages=msgs, max_tokens=12, temperature=0)
    # Greedy: all three answers are the same tokens.
    assert r.usage.completion_tokens == usages[0].completion_tokens
    after = scrape()

    def delta(name):
        return metric_sum(after, name) - metric_sum(before, name)

    assert delta("cortex_gateway_generation_tokens_total") == 3 * r.usage.completion_tokens
    assert delta("cortex_gateway_prompt_tokens_total") == 3 * r.usage.prompt_tokens
    # One gap per streamed text chunk after the first, for both streams (the role-only first chunk
    # and the usage chunk carry no token); the JSON answer has no token timing.
    assert delta("cortex_gateway_inter_token_latency_seconds_count") == 2 * (streamed_tokens - 1)
    assert delta("cortex_gateway_time_to_first_token_seconds_count") == 2
    assert delta("cortex_gateway_generation_tokens_per_second_count") == 2
    assert delta("cortex_gateway_e2e_request_latency_seconds_count") == 3
    assert delta("cortex_gateway_request_queue_time_seconds_count") == 3
    r = promtool(after)
    assert r.returncode == 0, r.stdout + r.stderr
