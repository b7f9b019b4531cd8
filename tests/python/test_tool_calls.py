"""Tool calls from a real model: SmolLM2, shown the Hermes `<tool_call>` convention in earlier turns,
calls the tool for Paris; the neuron turns that into OpenAI `tool_calls`, and the gateway into
Anthropic `tool_use` blocks (streamed as `input_json_delta`), for the official SDKs."""

import json

import anthropic
import openai

WEATHER = {
    "name": "weather",
    "description": "Current weather for a city",
    "parameters": {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]},
}


def call(city):
    return '<tool_call>{"name": "weather", "arguments": {"city": "%s"}}</tool_call>' % city


def few_shot():
    msgs = [{"role": "system", "content": "You call the weather tool for every question."}]
    for city in ("Oslo", "Rome", "Lima"):
        msgs += [{"role": "user", "content": f"Weather in {city}?"}, {"role": "assistant", "content": call(city)}]
    return msgs + [{"role": "user", "content": "Weather in Paris?"}]


def test_openai_tool_calls_from_the_neuron(neuron):
    oa = openai.OpenAI(base_url=f"{neuron.url}/v1", api_key="unused", max_retries=0)
    tools = [{"type": "function", "function": WEATHER}]
    r = oa.chat.completions.create(model="smollm2", messages=few_shot(), tools=tools, temperature=0, max_tokens=40)
    choice = r.choices[0]
    assert choice.finish_reason == "tool_calls"
    (tc,) = choice.message.tool_calls
    assert tc.type == "function" and tc.id.startswith("call_")
    assert tc.function.name == "weather"
    assert json.loads(tc.function.arguments) == {"city": "Paris"}

    # Streamed: no markup leaks as text, the call arrives whole.
    stream = oa.chat.completions.create(model="smollm2", messages=few_shot(), tools=tools, temperature=0, max_tokens=40, stream=True)
    text, calls, finish = "", [], None
    for chunk in stream:
        for c in chunk.choices:
            text += c.delta.content or ""
            calls += c.delta.tool_calls or []
            finish = c.finish_reason or finish
    assert "<tool_call>" not in text
    assert finish == "tool_calls"
    assert [json.loads(c.function.arguments) for c in calls] == [{"city": "Paris"}]

    # Without tools offered (or with tool_choice "none") the text comes back as it is.
    r = oa.chat.completions.create(model="smollm2", messages=few_shot(), temperature=0, max_tokens=40)
    assert r.choices[0].finish_reason == "stop"
    assert "<tool_call>" in r.choices[0].message.content


def anthropic_history():
    msgs = []
    for i, city in enumerate(("Oslo", "Rome", "Lima")):
        msgs += [
            {"role": "user", "content": f"Weather in {city}?"},
            {"role": "assistant", "content": call(city)},
        ]
    return msgs + [{"role": "user", "content": "Weather in Paris?"}]


def test_anthropic_tool_use_through_the_gateway(gateway):
    an = anthropic.Anthropic(base_url=gateway.url, api_key="unused", max_retries=0)
    tools = [{"name": WEATHER["name"], "description": WEATHER["description"], "input_schema": WEATHER["parameters"]}]
    kw = dict(model="smollm2", max_tokens=40, extra_body={"temperature": 0}, tools=tools,
              system="You call the weather tool for every question.", messages=anthropic_history())
    r = an.messages.create(**kw)
    assert r.stop_reason == "tool_use"
    uses = [b for b in r.content if b.type == "tool_use"]
    assert len(uses) == 1 and uses[0].name == "weather" and uses[0].input == {"city": "Paris"}
    assert uses[0].id
    assert r.usage.output_tokens > 0

    with an.messages.stream(**kw) as s:
        events = list(s)
        final = s.get_final_message()
    deltas = [e for e in events if e.type == "content_block_delta" and e.delta.type == "input_json_delta"]
    assert deltas, "tool arguments must stream as input_json_delta"
    assert json.loads("".join(d.delta.partial_json for d in deltas)) == {"city": "Paris"}
    assert final.stop_reason == "tool_use"
    assert [b.input for b in final.content if b.type == "tool_use"] == [{"city": "Paris"}]
