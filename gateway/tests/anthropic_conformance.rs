//! Conformance of the Anthropic ⇄ OpenAI translation: a golden case for every mapping, and the
//! failures seen in other gateways (LiteLLM #29286, #25561, #37118, #25825, #31069).

use cortex_core::anthropic::{Block, MessagesRequest};
use cortex_core::openai::{ChatCompletion, ChatCompletionChunk};
use cortex_gateway::dialect::anthropic::translate::{self, StreamTranslator, from_openai};
use serde_json::{Value, json};

/// The translated request as the neuron receives it (JSON).
fn to_openai(r: &MessagesRequest) -> Result<Value, cortex_gateway::error::Error> {
    translate::to_openai(r).map(|oa| serde_json::to_value(oa).unwrap())
}

fn req(v: Value) -> MessagesRequest {
    serde_json::from_value(v).unwrap()
}

#[test]
fn request_fields_map_to_openai() {
    let out = to_openai(&req(json!({
        "model": "m", "max_tokens": 64,
        "system": [{"type": "text", "text": "You are "}, {"type": "text", "text": "terse."}],
        "messages": [{"role": "user", "content": "Hi"}],
        "stop_sequences": ["END", "\n\n"], "temperature": 0.2, "top_p": 0.9, "top_k": 40,
        "metadata": {"user_id": "u-1"}, "stream": true
    })))
    .unwrap();
    assert_eq!(
        out,
        json!({
            "model": "m", "max_tokens": 64,
            "messages": [{"role": "system", "content": "You are terse."}, {"role": "user", "content": "Hi"}],
            "stop": ["END", "\n\n"], "temperature": 0.2, "top_p": 0.9, "top_k": 40, "user": "u-1",
            "stream": true, "stream_options": {"include_usage": true, "continuous_usage_stats": true}
        })
    );
    let plain = to_openai(&req(json!({"model": "m", "max_tokens": 1, "system": "Be kind.", "messages": [{"role": "user", "content": "x"}]}))).unwrap();
    assert_eq!(
        plain["messages"][0],
        json!({"role": "system", "content": "Be kind."})
    );
    assert!(plain.get("stream").is_none());
}

#[test]
fn tools_tool_use_and_tool_results_carry_over_faithfully() {
    let out = to_openai(&req(json!({
        "model": "m", "max_tokens": 64,
        "tools": [{"name": "weather", "description": "Weather for a city", "input_schema": {"type": "object", "properties": {"city": {"type": "string"}}}}],
        "tool_choice": {"type": "tool", "name": "weather"},
        "messages": [
            {"role": "user", "content": "Weather in Paris?"},
            {"role": "assistant", "content": [{"type": "text", "text": "Let me check."}, {"type": "tool_use", "id": "toolu_1", "name": "weather", "input": {"city": "Paris", "units": ["C"]}}]},
            {"role": "user", "content": [{"type": "tool_result", "tool_use_id": "toolu_1", "content": [{"type": "text", "text": "18 C, sunny"}]}, {"type": "text", "text": "Thanks"}]},
            {"role": "user", "content": [{"type": "tool_result", "tool_use_id": "toolu_2", "content": "boom", "is_error": true}]}
        ]
    })))
    .unwrap();
    assert_eq!(
        out["tools"][0],
        json!({"type": "function", "function": {"name": "weather", "description": "Weather for a city", "parameters": {"type": "object", "properties": {"city": {"type": "string"}}}}})
    );
    assert_eq!(
        out["tool_choice"],
        json!({"type": "function", "function": {"name": "weather"}})
    );
    let msgs = out["messages"].as_array().unwrap();
    assert_eq!(msgs[1]["content"], "Let me check.");
    let call = &msgs[1]["tool_calls"][0];
    assert_eq!(call["id"], "toolu_1");
    assert_eq!(call["function"]["name"], "weather");
    let args: Value =
        serde_json::from_str(call["function"]["arguments"].as_str().unwrap()).unwrap();
    assert_eq!(
        args,
        json!({"city": "Paris", "units": ["C"]}),
        "tool arguments are never dropped"
    );
    assert_eq!(
        msgs[2],
        json!({"role": "tool", "tool_call_id": "toolu_1", "content": "18 C, sunny"})
    );
    assert_eq!(msgs[3], json!({"role": "user", "content": "Thanks"}));
    assert_eq!(
        msgs[4],
        json!({"role": "tool", "tool_call_id": "toolu_2", "content": "Error: boom"})
    );
    for (choice, want) in [
        (json!({"type": "auto"}), json!("auto")),
        (json!({"type": "any"}), json!("required")),
        (json!({"type": "none"}), json!("none")),
    ] {
        let out = to_openai(&req(json!({"model": "m", "max_tokens": 1, "tool_choice": choice, "messages": [{"role": "user", "content": "x"}]}))).unwrap();
        assert_eq!(out["tool_choice"], want);
    }
}

#[test]
fn unsupported_blocks_and_bad_values_are_named() {
    let e = to_openai(&req(json!({"model": "m", "max_tokens": 5, "messages": [{"role": "user", "content": [{"type": "image", "source": {"type": "base64", "media_type": "image/png", "data": ""}}]}]}))).unwrap_err();
    assert!(e.to_string().contains("image block"), "{e}");
    let e = to_openai(&req(
        json!({"model": "m", "max_tokens": 0, "messages": [{"role": "user", "content": "x"}]}),
    ))
    .unwrap_err();
    assert!(
        e.to_string().contains("max_tokens must be at least 1"),
        "{e}"
    );
    let e = to_openai(&req(
        json!({"model": "m", "max_tokens": 5, "messages": [{"role": "tool", "content": "x"}]}),
    ))
    .unwrap_err();
    assert!(
        e.to_string().contains("must be user, assistant or system"),
        "{e}"
    );
}

#[test]
fn system_messages_among_messages_join_the_system_prompt() {
    // What Claude Code sends: a system prompt in blocks (with cache_control), and a `system`
    // message after the user's turn carrying its context reminders.
    let out = to_openai(&req(json!({"model": "m", "max_tokens": 5,
        "system": [{"type": "text", "text": "You are terse.", "cache_control": {"type": "ephemeral"}}],
        "messages": [
            {"role": "user", "content": [{"type": "text", "text": "Hi", "cache_control": {"type": "ephemeral"}}]},
            {"role": "system", "content": [{"type": "text", "text": "Today is Monday."}]},
        ],
        "thinking": {"type": "adaptive"}, "output_config": {"effort": "high"}})))
    .unwrap();
    assert_eq!(
        out["messages"],
        json!([
            {"role": "system", "content": "You are terse.\n\nToday is Monday."},
            {"role": "user", "content": "Hi"},
        ])
    );
}

fn completion(
    finish: &str,
    stop_reason: Value,
    content: Value,
    tool_calls: Value,
) -> ChatCompletion {
    let mut msg = json!({"role": "assistant", "content": content});
    if !tool_calls.is_null() {
        msg["tool_calls"] = tool_calls;
    }
    serde_json::from_value(json!({
        "id": "c1", "object": "chat.completion", "created": 0, "model": "m",
        "choices": [{"index": 0, "message": msg, "finish_reason": finish, "logprobs": null, "stop_reason": stop_reason}],
        "usage": {"prompt_tokens": 12, "completion_tokens": 7, "total_tokens": 19}
    }))
    .unwrap()
}

#[test]
fn stop_reasons_map_and_usage_is_carried() {
    let r = from_openai(
        &completion("length", Value::Null, json!("abc"), Value::Null),
        "claude-ish",
    );
    assert_eq!(
        r.stop_reason.as_deref(),
        Some("max_tokens"),
        "a length stop is max_tokens, never end_turn"
    );
    assert_eq!((r.usage.input_tokens, r.usage.output_tokens), (12, 7));
    assert_eq!(r.model, "claude-ish");
    assert_eq!(
        r.content,
        vec![Block::Text {
            text: "abc".into(),
            cache_control: None
        }]
    );
    let r = from_openai(
        &completion("stop", json!("END"), json!("abc"), Value::Null),
        "m",
    );
    assert_eq!(
        (r.stop_reason.as_deref(), r.stop_sequence.as_deref()),
        (Some("stop_sequence"), Some("END"))
    );
    let r = from_openai(
        &completion("stop", Value::Null, json!("abc"), Value::Null),
        "m",
    );
    assert_eq!(
        (r.stop_reason.as_deref(), r.stop_sequence),
        (Some("end_turn"), None)
    );
    let r = from_openai(
        &completion(
            "tool_calls",
            Value::Null,
            json!(""),
            json!([{"id": "call_1", "type": "function", "function": {"name": "weather", "arguments": "{\"city\":\"Paris\"}"}}]),
        ),
        "m",
    );
    assert_eq!(r.stop_reason.as_deref(), Some("tool_use"));
    assert_eq!(
        r.content,
        vec![Block::ToolUse {
            id: "call_1".into(),
            name: "weather".into(),
            input: json!({"city": "Paris"}),
            cache_control: None
        }]
    );
}

fn chunk(delta: Value, finish: Value, stop_reason: Value, usage: Value) -> ChatCompletionChunk {
    let mut c = json!({"id": "c1", "object": "chat.completion.chunk", "created": 0, "model": "m",
        "choices": [{"index": 0, "delta": delta, "finish_reason": finish, "logprobs": null, "stop_reason": stop_reason}]});
    if !usage.is_null() {
        c["choices"] = json!([]);
        c["usage"] = usage;
    }
    serde_json::from_value(c).unwrap()
}

/// `c` with usage on a chunk that also has choices (`continuous_usage_stats`).
fn with_usage(mut c: ChatCompletionChunk, usage: Value) -> ChatCompletionChunk {
    c.usage = Some(serde_json::from_value(usage).unwrap());
    c
}

fn run(chunks: &[ChatCompletionChunk]) -> Vec<(String, Value)> {
    let mut t = StreamTranslator::new("msg_1".into(), "m".into());
    let mut out: Vec<(String, Value)> = Vec::new();
    for c in chunks {
        out.extend(t.chunk(c).into_iter().map(|(n, v)| (n.to_string(), v)));
    }
    out.extend(t.finish().into_iter().map(|(n, v)| (n.to_string(), v)));
    out
}

#[test]
fn a_text_stream_has_anthropics_event_sequence_no_empty_deltas_and_real_usage() {
    let events = run(&[
        // The neuron's first chunk with `continuous_usage_stats`: the prompt's count.
        with_usage(
            chunk(
                json!({"role": "assistant", "content": ""}),
                Value::Null,
                Value::Null,
                Value::Null,
            ),
            json!({"prompt_tokens": 9, "completion_tokens": 0, "total_tokens": 9}),
        ),
        chunk(
            json!({"content": "Par"}),
            Value::Null,
            Value::Null,
            Value::Null,
        ),
        chunk(
            json!({"content": ""}),
            Value::Null,
            Value::Null,
            Value::Null,
        ),
        chunk(
            json!({"content": "is"}),
            Value::Null,
            Value::Null,
            Value::Null,
        ),
        chunk(json!({}), json!("stop"), json!("\n"), Value::Null),
        chunk(
            json!({}),
            Value::Null,
            Value::Null,
            json!({"prompt_tokens": 9, "completion_tokens": 3, "total_tokens": 12}),
        ),
    ]);
    let names: Vec<&str> = events.iter().map(|(n, _)| n.as_str()).collect();
    assert_eq!(
        names,
        [
            "message_start",
            "content_block_start",
            "content_block_delta",
            "content_block_delta",
            "content_block_stop",
            "message_delta",
            "message_stop"
        ]
    );
    let texts: Vec<&str> = events
        .iter()
        .filter_map(|(_, v)| v["delta"]["text"].as_str())
        .collect();
    assert_eq!(texts, ["Par", "is"], "no empty text deltas");
    assert_eq!(
        events[0].1["message"]["usage"]["input_tokens"], 9,
        "message_start carries the prompt's tokens"
    );
    let delta = &events[5].1;
    assert_eq!(
        delta["delta"],
        json!({"stop_reason": "stop_sequence", "stop_sequence": "\n"})
    );
    // As Anthropic's API sends it: the totals, the prefix cache's reads and writes included.
    assert_eq!(
        delta["usage"],
        json!({"input_tokens": 9, "output_tokens": 3,
               "cache_creation_input_tokens": 0, "cache_read_input_tokens": 0})
    );
    assert_eq!(
        events[1].1["content_block"],
        json!({"type": "text", "text": ""})
    );
}

#[test]
fn streamed_tool_arguments_arrive_as_input_json_deltas_and_none_are_dropped() {
    let events = run(&[
        chunk(
            json!({"content": "Checking."}),
            Value::Null,
            Value::Null,
            Value::Null,
        ),
        chunk(
            json!({"tool_calls": [{"index": 0, "id": "call_9", "type": "function", "function": {"name": "weather", "arguments": ""}}]}),
            Value::Null,
            Value::Null,
            Value::Null,
        ),
        chunk(
            json!({"tool_calls": [{"index": 0, "function": {"arguments": "{\"ci"}}]}),
            Value::Null,
            Value::Null,
            Value::Null,
        ),
        chunk(
            json!({"tool_calls": [{"index": 0, "function": {"arguments": "ty\": \"Paris\"}"}}]}),
            Value::Null,
            Value::Null,
            Value::Null,
        ),
        chunk(json!({}), json!("tool_calls"), Value::Null, Value::Null),
        chunk(
            json!({}),
            Value::Null,
            Value::Null,
            json!({"prompt_tokens": 20, "completion_tokens": 11, "total_tokens": 31}),
        ),
    ]);
    let starts: Vec<&Value> = events
        .iter()
        .filter(|(n, _)| n == "content_block_start")
        .map(|(_, v)| &v["content_block"])
        .collect();
    assert_eq!(
        starts[1],
        &json!({"type": "tool_use", "id": "call_9", "name": "weather", "input": {}})
    );
    let json_parts: Vec<&str> = events
        .iter()
        .filter_map(|(_, v)| v["delta"]["partial_json"].as_str())
        .collect();
    assert_eq!(
        json_parts,
        ["{\"ci", "ty\": \"Paris\"}"],
        "no empty input_json_delta"
    );
    let args: Value = serde_json::from_str(&json_parts.concat()).unwrap();
    assert_eq!(args, json!({"city": "Paris"}));
    let stops: Vec<i64> = events
        .iter()
        .filter(|(n, _)| n == "content_block_stop")
        .map(|(_, v)| v["index"].as_i64().unwrap())
        .collect();
    assert_eq!(
        stops,
        [0, 1],
        "the text block closes before the tool block opens"
    );
    let delta = events.iter().find(|(n, _)| n == "message_delta").unwrap();
    assert_eq!(delta.1["delta"]["stop_reason"], "tool_use");
    assert_eq!(delta.1["usage"]["output_tokens"], 11);
}

#[test]
fn a_length_stop_streams_as_max_tokens() {
    let events = run(&[
        chunk(
            json!({"content": "a"}),
            Value::Null,
            Value::Null,
            Value::Null,
        ),
        chunk(json!({}), json!("length"), Value::Null, Value::Null),
        chunk(
            json!({}),
            Value::Null,
            Value::Null,
            json!({"prompt_tokens": 5, "completion_tokens": 1, "total_tokens": 6}),
        ),
    ]);
    let delta = events.iter().find(|(n, _)| n == "message_delta").unwrap();
    assert_eq!(delta.1["delta"]["stop_reason"], "max_tokens");
}
