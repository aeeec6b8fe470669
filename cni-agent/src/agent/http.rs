//! The agent's HTTP endpoint for Prometheus and for kubelet's probes:
//! `/metrics` (see [`super::metrics`]), `/healthz` (the process answers)
//! and `/readyz` (the datapath is loaded and the background worker healthy;
//! 503 with the reason otherwise). It runs on the agent's tokio runtime
//! next to the plugins' socket, and is bounded so that a slow or hostile
//! client cannot hold the agent: 16 KiB of request head, 5 s to send it,
//! 30 s per connection, one request per connection, 32 connections at once
//! (more are closed at once).
use std::{convert::Infallible, net::SocketAddr, sync::Arc, time::Duration};

use bytes::Bytes;
use http_body_util::Full;
use hyper::{
    body::Incoming, header, server::conn::http1, service::service_fn, Method, Request, Response,
    StatusCode,
};
use hyper_util::rt::{TokioIo, TokioTimer};
use tokio::{net::TcpListener, sync::Semaphore};

use super::{daemon::AgentError, health::Health, metrics, ops::Paths};

const MAX_CONNECTIONS: usize = 32;
const MAX_HEAD_BYTES: usize = 16 * 1024;
const HEAD_TIMEOUT: Duration = Duration::from_secs(5);
const CONNECTION_TIMEOUT: Duration = Duration::from_secs(30);
/// OpenMetrics text, which Prometheus negotiates and parses.
const METRICS_TYPE: &str = "application/openmetrics-text; version=1.0.0; charset=utf-8";

/// How often a failed bind is retried.
const BIND_RETRY: Duration = Duration::from_secs(5);

/// Binds `addr` and serves until the runtime stops. The datapath matters
/// more than its metrics: when the address cannot be bound (the port is
/// taken, or the loopback is not up yet), the agent keeps serving the
/// plugins, says so, and retries every few seconds; kubelet's liveness
/// probe on /healthz decides whether that is worth a restart.
pub async fn run(addr: SocketAddr, paths: Paths, health: Health) {
    let mut warned = false;
    let listener = loop {
        match TcpListener::bind(addr).await {
            Ok(l) => break l,
            Err(source) => {
                if !warned {
                    let e = AgentError::Metrics { addr, source };
                    log::warn!("{e}; retrying every {} s", BIND_RETRY.as_secs());
                    warned = true;
                }
                tokio::time::sleep(BIND_RETRY).await;
            }
        }
    };
    log::info!("metrics, health and readiness on http://{addr}/metrics, /healthz, /readyz");
    serve(listener, paths, health).await
}

async fn serve(listener: TcpListener, paths: Paths, health: Health) {
    let slots = Arc::new(Semaphore::new(MAX_CONNECTIONS));
    loop {
        let stream = match listener.accept().await {
            Ok((s, _)) => s,
            Err(e) => {
                // EMFILE and the like: back off instead of spinning.
                log::warn!("metrics endpoint: accept: {e}");
                tokio::time::sleep(Duration::from_millis(100)).await;
                continue;
            }
        };
        let Ok(permit) = slots.clone().try_acquire_owned() else {
            continue; // dropping the stream closes it
        };
        let (paths, health) = (paths.clone(), health.clone());
        tokio::spawn(async move {
            let _permit = permit;
            let svc = service_fn(move |req| {
                let (paths, health) = (paths.clone(), health.clone());
                async move { Ok::<_, Infallible>(respond(&req, paths, health).await) }
            });
            let mut b = http1::Builder::new();
            b.timer(TokioTimer::new())
                .header_read_timeout(HEAD_TIMEOUT)
                .max_buf_size(MAX_HEAD_BYTES)
                .keep_alive(false);
            let conn = b.serve_connection(TokioIo::new(stream), svc);
            match tokio::time::timeout(CONNECTION_TIMEOUT, conn).await {
                Ok(Ok(())) => {}
                Ok(Err(e)) => log::debug!("metrics endpoint: {e}"),
                Err(_) => log::debug!("metrics endpoint: connection timed out"),
            }
        });
    }
}

fn reply(status: StatusCode, content_type: &str, body: String) -> Response<Full<Bytes>> {
    let mut r = Response::new(Full::new(Bytes::from(body)));
    *r.status_mut() = status;
    if let Ok(v) = header::HeaderValue::from_str(content_type) {
        r.headers_mut().insert(header::CONTENT_TYPE, v);
    }
    r
}

const TEXT: &str = "text/plain; charset=utf-8";

async fn respond(req: &Request<Incoming>, paths: Paths, health: Health) -> Response<Full<Bytes>> {
    if req.method() != Method::GET && req.method() != Method::HEAD {
        return reply(
            StatusCode::METHOD_NOT_ALLOWED,
            TEXT,
            "GET or HEAD only\n".into(),
        );
    }
    match req.uri().path() {
        "/healthz" => reply(StatusCode::OK, TEXT, "ok\n".into()),
        "/readyz" => {
            // Map reads are syscalls: off the runtime's thread.
            let why = tokio::task::spawn_blocking(move || metrics::not_ready(&paths, &health))
                .await
                .unwrap_or_else(|e| Some(format!("readiness check failed: {e}")));
            match why {
                None => reply(StatusCode::OK, TEXT, "ok\n".into()),
                Some(why) => reply(StatusCode::SERVICE_UNAVAILABLE, TEXT, format!("{why}\n")),
            }
        }
        "/metrics" => {
            match tokio::task::spawn_blocking(move || metrics::render(&paths, &health)).await {
                Ok(Ok(text)) => reply(StatusCode::OK, METRICS_TYPE, text),
                Ok(Err(e)) => reply(
                    StatusCode::INTERNAL_SERVER_ERROR,
                    TEXT,
                    format!("encoding metrics: {e}\n"),
                ),
                Err(e) => reply(
                    StatusCode::INTERNAL_SERVER_ERROR,
                    TEXT,
                    format!("collecting metrics: {e}\n"),
                ),
            }
        }
        _ => reply(
            StatusCode::NOT_FOUND,
            TEXT,
            "/metrics, /healthz, /readyz\n".into(),
        ),
    }
}
