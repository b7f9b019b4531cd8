"""The official `openai` Python SDK against a real neuron."""

import openai
import pytest


@pytest.fixture(scope="module")
def client(neuron):
    return openai.OpenAI(base_url=f"{neuron.url}/v1", api_key="unused", max_retries=0)


def test_models_lists_both_loaded_models(client):
    ids = {m.id for m in client.models.list()}
    assert {"smollm2", "gemma3"} <= ids


def test_chat_says_paris(client):
    r = client.chat.completions.create(
        model="smollm2",
        messages=[{"role": "user", "content": "What is the capital of France? Answer in one sentence."}],
        temperature=0,
        max_tokens=40,
    )
    assert "Paris" in r.choices[0].message.content
    assert r.choices[0].finish_reason == "stop"
    assert r.usage.prompt_tokens == 42
    assert r.usage.total_tokens == r.usage.prompt_tokens + r.usage.completion_tokens


def test_streamed_chat_matches_the_whole_answer_and_reports_usage_last(client):
    kwargs = dict(
        model="smollm2",
        messages=[{"role": "system", "content": "You are terse."}, {"role": "user", "content": "Name a fruit."}],
        temperature=0,
        max_completion_tokens=20,
    )
    whole = client.chat.completions.create(**kwargs)
    chunks = list(client.chat.completions.create(stream=True, stream_options={"include_usage": True}, **kwargs))
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == whole.choices[0].message.content
    assert [c.choices[0].finish_reason for c in chunks if c.choices and c.choices[0].finish_reason] == [
        whole.choices[0].finish_reason
    ]
    assert chunks[-1].choices == []
    assert chunks[-1].usage.completion_tokens == whole.usage.completion_tokens
    assert chunks[-1].usage.prompt_tokens == whole.usage.prompt_tokens


def test_continuous_usage_stats_put_usage_on_every_chunk(client):
    # vLLM's extension; the gateway uses it to fill Anthropic's message_start.
    kwargs = dict(model="smollm2", messages=[{"role": "user", "content": "Name a fruit."}], temperature=0, max_tokens=12)
    whole = client.chat.completions.create(**kwargs)
    chunks = list(
        client.chat.completions.create(
            stream=True, stream_options={"include_usage": True, "continuous_usage_stats": True}, **kwargs
        )
    )
    content = [c for c in chunks if c.choices and c.choices[0].delta.content]
    assert content and chunks[0].usage is not None
    assert chunks[0].usage.prompt_tokens == whole.usage.prompt_tokens and chunks[0].usage.completion_tokens == 0
    counts = [c.usage.completion_tokens for c in content]
    assert counts == sorted(counts) and 0 < counts[0] <= counts[-1] <= whole.usage.completion_tokens
    assert chunks[-1].usage.completion_tokens == whole.usage.completion_tokens
    # Without it, usage comes only on the last chunk.
    plain = list(client.chat.completions.create(stream=True, stream_options={"include_usage": True}, **kwargs))
    assert [c.usage is not None for c in plain] == [False] * (len(plain) - 1) + [True]


def test_gemma3_completion_with_a_stop_string(client):
    r = client.completions.create(
        model="gemma3",
        prompt="Question: What is the capital of France?\nAnswer:",
        max_tokens=8,
        temperature=0,
        stop=["\n"],
    )
    assert r.choices[0].text.strip() == "Paris"
    assert r.choices[0].finish_reason == "stop"


def test_streamed_completion(client):
    chunks = list(
        client.completions.create(model="smollm2", prompt="The capital of France is", max_tokens=6, temperature=0, stream=True)
    )
    assert "Paris" in "".join(c.choices[0].text for c in chunks)
    assert chunks[-1].choices[0].finish_reason == "length"


def test_unknown_model_is_a_not_found_error(client):
    with pytest.raises(openai.NotFoundError) as e:
        client.chat.completions.create(model="gpt-9", messages=[{"role": "user", "content": "hi"}])
    assert e.value.code == "model_not_found"


def test_too_many_tokens_is_a_bad_request_naming_both_lengths(client):
    with pytest.raises(openai.BadRequestError) as e:
        client.chat.completions.create(model="smollm2", messages=[{"role": "user", "content": "hi"}], max_tokens=100000)
    assert "maximum context length is 8192 tokens" in e.value.message
    assert "100000 for the completion" in e.value.message


def test_bad_sampling_values_name_the_field(client):
    with pytest.raises(openai.BadRequestError) as e:
        client.chat.completions.create(model="smollm2", messages=[{"role": "user", "content": "hi"}], top_p=1.5)
    assert e.value.param == "top_p"
