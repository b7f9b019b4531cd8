//! Streams that start before their model is ready: the response goes out at once with its body
//! fed through a channel, and the caller gets keep-alives while a copy loads, so client timeouts
//! do not fire during a cold load.

use std::sync::Arc;

use axum::body::Body;
use axum::http::header;
use axum::response::{IntoResponse, Response};
use bytes::Bytes;
use futures::SinkExt;

use crate::error::Error;
use crate::fleet::Fleet;
use crate::fleet::catalogue::Placement;
use crate::metrics::Counted;

pub type Tx = futures::channel::mpsc::Sender<Result<Bytes, std::io::Error>>;

/// Waits until the placement has a ready replica, loading one if needed, and sends `keepalive`
/// down the stream every `[gateway] keepalive_secs` meanwhile. `Ok(false)` when the client went away.
pub async fn wait_ready(
    fleet: &Arc<Fleet>,
    p: &Placement,
    tx: &mut Tx,
    keepalive: &Bytes,
) -> Result<bool, Error> {
    if fleet.pick(p, &[]).is_some() {
        return Ok(true);
    }
    let load = fleet.load_copy(p);
    tokio::pin!(load);
    let mut tick = tokio::time::interval(fleet.keepalive);
    loop {
        tokio::select! {
            r = &mut load => return r.map(|_| true),
            _ = tick.tick() => {
                if tx.send(Ok(keepalive.clone())).await.is_err() {
                    return Ok(false);
                }
            }
        }
    }
}

/// A streamed response whose body is fed by `task` through a channel.
pub fn channel_stream<F>(task: impl FnOnce(Tx) -> F) -> Response
where
    F: std::future::Future<Output = ()> + Send + 'static,
{
    let (tx, rx) = futures::channel::mpsc::channel::<Result<Bytes, std::io::Error>>(16);
    tokio::spawn(task(tx));
    // The task counts the request: by its route, or where its cold load failed.
    (
        [
            (header::CONTENT_TYPE, "text/event-stream"),
            (header::CACHE_CONTROL, "no-cache"),
        ],
        axum::Extension(Counted),
        Body::from_stream(rx),
    )
        .into_response()
}
