//! What the gateway knows about one client request while it forwards it: its dialect (for the
//! metrics), when it arrived, whether the usage chunk is the gateway's own, and the model's name
//! as the client sent it.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, LazyLock};
use std::time::Instant;

use bytes::Bytes;
use memchr::memmem::Finder;

use crate::metrics::Dialect;

/// The id a request is known by in the gateway's log and in the neuron's, which gets it as
/// `x-request-id`: this process's random prefix and a count.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct RequestId(u64);

static NEXT_ID: AtomicU64 = AtomicU64::new(0);
static PREFIX: LazyLock<u32> = LazyLock::new(|| {
    use std::hash::{BuildHasher, Hasher};
    let mut h = std::collections::hash_map::RandomState::new().build_hasher();
    h.write_u32(std::process::id());
    h.finish() as u32
});

impl RequestId {
    pub fn next() -> Self {
        RequestId(NEXT_ID.fetch_add(1, Ordering::Relaxed))
    }
}

impl std::fmt::Display for RequestId {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{:08x}-{}", *PREFIX, self.0)
    }
}

/// What the gateway knows about one client request while it proxies it.
#[derive(Clone)]
pub struct Call {
    pub dialect: Dialect,
    /// Its id in the logs, here and on the neuron.
    pub id: RequestId,
    /// When the request reached the gateway (for the queue-time histogram).
    pub arrived: Instant,
    /// The gateway asked the neuron for a usage chunk the client did not ask for: drop it.
    pub strip_usage: bool,
    /// When the neuron knows the model by another id than the client sent, so answers carry the
    /// client's name.
    pub rename: Option<Arc<Rename>>,
}

impl Call {
    pub fn new(dialect: Dialect) -> Self {
        Call {
            dialect,
            id: RequestId::next(),
            arrived: Instant::now(),
            strip_usage: false,
            rename: None,
        }
    }

    /// Answers name the model `client` where the neuron says `neuron`.
    pub fn rename(&mut self, neuron: &str, client: &str) {
        self.rename = Some(Arc::new(Rename::new(neuron, client)));
    }
}

/// `"model":"<id>"` → `"model":"<client's name>"` (both as serde writes them) in the neuron's
/// answers, when the neuron knows the model by another id than the client sent.
pub struct Rename {
    from: Finder<'static>,
    to: Vec<u8>,
}

impl Rename {
    pub fn new(neuron: &str, client: &str) -> Self {
        let field = |name: &str| {
            format!("\"model\":{}", serde_json::Value::String(name.into())).into_bytes()
        };
        Rename {
            from: Finder::new(&field(neuron)).into_owned(),
            to: field(client),
        }
    }

    pub fn apply(&self, b: Bytes) -> Bytes {
        let from = self.from.needle();
        let Some(first) = self.from.find(&b) else {
            return b;
        };
        let mut out = Vec::with_capacity(b.len() + self.to.len());
        out.extend_from_slice(&b[..first]);
        out.extend_from_slice(&self.to);
        let mut rest = &b[first + from.len()..];
        while let Some(i) = self.from.find(rest) {
            out.extend_from_slice(&rest[..i]);
            out.extend_from_slice(&self.to);
            rest = &rest[i + from.len()..];
        }
        out.extend_from_slice(rest);
        Bytes::from(out)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_rename_replaces_every_model_field() {
        let r = Rename::new("smollm2", "smol");
        let out = r.apply(Bytes::from_static(
            b"data: {\"model\":\"smollm2\",\"x\":1}\n\ndata: {\"model\":\"smollm2\"}\n\n",
        ));
        assert_eq!(
            &out[..],
            b"data: {\"model\":\"smol\",\"x\":1}\n\ndata: {\"model\":\"smol\"}\n\n"
        );
    }
}
