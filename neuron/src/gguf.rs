//! Typed access to GGUF metadata, with errors that name the missing key.

use std::collections::HashMap;

use candle_core::quantized::gguf_file::Value;

use crate::error::{Error, Result};

pub struct Meta<'a>(pub &'a HashMap<String, Value>);

impl<'a> Meta<'a> {
    pub fn get(&self, key: &str) -> Option<&'a Value> {
        self.0.get(key)
    }

    fn missing(key: &str) -> Error {
        Error::Load(format!("GGUF metadata has no '{key}'"))
    }

    pub fn str(&self, key: &str) -> Option<&'a str> {
        self.get(key)
            .and_then(|v| v.to_string().ok())
            .map(String::as_str)
    }

    pub fn u32(&self, key: &str) -> Option<u32> {
        self.get(key).and_then(|v| match v {
            Value::U8(x) => Some(*x as u32),
            Value::U16(x) => Some(*x as u32),
            Value::U32(x) => Some(*x),
            Value::U64(x) => u32::try_from(*x).ok(),
            Value::I32(x) => u32::try_from(*x).ok(),
            Value::I64(x) => u32::try_from(*x).ok(),
            _ => None,
        })
    }

    pub fn req_u32(&self, key: &str) -> Result<u32> {
        self.u32(key).ok_or_else(|| Self::missing(key))
    }

    pub fn f32(&self, key: &str) -> Option<f32> {
        self.get(key).and_then(|v| match v {
            Value::F32(x) => Some(*x),
            Value::F64(x) => Some(*x as f32),
            _ => None,
        })
    }

    pub fn bool(&self, key: &str) -> Option<bool> {
        self.get(key).and_then(|v| v.to_bool().ok())
    }

    pub fn array(&self, key: &str) -> Option<&'a [Value]> {
        self.get(key)
            .and_then(|v| v.to_vec().ok())
            .map(Vec::as_slice)
    }

    pub fn strings(&self, key: &str) -> Result<Vec<&'a str>> {
        let arr = self.array(key).ok_or_else(|| Self::missing(key))?;
        arr.iter()
            .map(|v| {
                v.to_string()
                    .map(String::as_str)
                    .map_err(|_| Error::Load(format!("GGUF '{key}' holds a non-string")))
            })
            .collect()
    }

    pub fn numbers_f32(&self, key: &str) -> Option<Vec<f32>> {
        self.array(key).map(|a| {
            a.iter()
                .map(|v| match v {
                    Value::F32(x) => *x,
                    Value::F64(x) => *x as f32,
                    _ => 0.0,
                })
                .collect()
        })
    }

    pub fn numbers_i32(&self, key: &str) -> Option<Vec<i32>> {
        self.array(key).map(|a| {
            a.iter()
                .map(|v| match v {
                    Value::I32(x) => *x,
                    Value::U32(x) => *x as i32,
                    Value::I8(x) => *x as i32,
                    Value::U8(x) => *x as i32,
                    _ => 0,
                })
                .collect()
        })
    }
}
