//! The few fields of a completion request the gateway routes on, read without building the rest
//! of the request as a `serde_json::Value`: the other fields are only checked to be JSON and then
//! left to the neuron, which gets the client's bytes.

use std::fmt;

use serde::Deserialize;
use serde::de::{self, Deserializer, IgnoredAny, MapAccess, Visitor};
use serde_json::Value;

/// `model`, `stream` and `stream_options` as the client sent them (the last of each, as with a
/// `Value`), whatever their types: the caller says what is wrong with them.
#[derive(Debug, Default)]
pub struct RequestHead {
    pub model: Option<Value>,
    pub stream: Option<Value>,
    pub stream_options: Option<Value>,
}

enum Key {
    Model,
    Stream,
    StreamOptions,
    Other,
}

impl<'de> Deserialize<'de> for Key {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct KeyVisitor;
        impl Visitor<'_> for KeyVisitor {
            type Value = Key;

            fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
                f.write_str("a field name")
            }

            fn visit_str<E: de::Error>(self, k: &str) -> Result<Key, E> {
                Ok(match k {
                    "model" => Key::Model,
                    "stream" => Key::Stream,
                    "stream_options" => Key::StreamOptions,
                    _ => Key::Other,
                })
            }
        }
        d.deserialize_identifier(KeyVisitor)
    }
}

impl<'de> Deserialize<'de> for RequestHead {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct HeadVisitor;
        impl<'de> Visitor<'de> for HeadVisitor {
            type Value = RequestHead;

            fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
                f.write_str("a JSON object")
            }

            fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<RequestHead, A::Error> {
                let mut head = RequestHead::default();
                while let Some(key) = map.next_key::<Key>()? {
                    match key {
                        Key::Model => head.model = Some(map.next_value()?),
                        Key::Stream => head.stream = Some(map.next_value()?),
                        Key::StreamOptions => head.stream_options = Some(map.next_value()?),
                        Key::Other => {
                            map.next_value::<IgnoredAny>()?;
                        }
                    }
                }
                Ok(head)
            }
        }
        d.deserialize_map(HeadVisitor)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_routing_fields_are_read_and_the_rest_skipped() {
        let h: RequestHead = serde_json::from_str(
            r#"{"messages":[{"role":"user","content":"{\"model\":1}"}],"model":"a","stream":true,
               "stream_options":{"include_usage":false},"model":"b"}"#,
        )
        .unwrap();
        assert_eq!(h.model, Some(Value::from("b")), "the last model wins");
        assert_eq!(h.stream, Some(Value::Bool(true)));
        assert_eq!(h.stream_options.unwrap()["include_usage"], false);
    }

    #[test]
    fn a_body_that_is_not_json_or_not_an_object_is_refused() {
        assert!(serde_json::from_str::<RequestHead>(r#"{"model":"a""#).is_err());
        let e = serde_json::from_str::<RequestHead>(r#"["model"]"#).unwrap_err();
        assert_eq!(e.classify(), serde_json::error::Category::Data);
    }
}
