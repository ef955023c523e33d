//! The HTTP endpoint: /metrics, /healthz, /readyz, on its own thread with a
//! current-thread tokio runtime so the agent loop stays plain and synchronous.

use std::convert::Infallible;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use anyhow::Context;
use http_body_util::Full;
use hyper::body::Bytes;
use hyper::{Request, Response, StatusCode};
use hyper_util::rt::{TokioIo, TokioTimer};

use crate::telemetry::Telemetry;

const OPENMETRICS: &str = "application/openmetrics-text; version=1.0.0; charset=utf-8";

fn respond(telemetry: &Telemetry, path: &str) -> Response<Full<Bytes>> {
    let (status, content_type, body) = match path {
        "/metrics" => (StatusCode::OK, OPENMETRICS, telemetry.encode()),
        "/healthz" => match telemetry.liveness() {
            Ok(body) => (StatusCode::OK, "text/plain; charset=utf-8", body),
            Err(body) => (
                StatusCode::SERVICE_UNAVAILABLE,
                "text/plain; charset=utf-8",
                body,
            ),
        },
        "/readyz" => match telemetry.readiness() {
            Ok(body) => (StatusCode::OK, "text/plain; charset=utf-8", body),
            Err(body) => (
                StatusCode::SERVICE_UNAVAILABLE,
                "text/plain; charset=utf-8",
                body,
            ),
        },
        _ => (
            StatusCode::NOT_FOUND,
            "text/plain; charset=utf-8",
            "not found: try /metrics, /healthz or /readyz\n".to_string(),
        ),
    };
    let mut response = Response::new(Full::new(Bytes::from(body)));
    *response.status_mut() = status;
    if let Ok(value) = content_type.parse() {
        response
            .headers_mut()
            .insert(hyper::header::CONTENT_TYPE, value);
    }
    response
}

/// Binds now (so a taken port fails start-up loudly) and serves on a new thread.
pub fn serve(address: SocketAddr, telemetry: Arc<Telemetry>) -> anyhow::Result<SocketAddr> {
    let listener = std::net::TcpListener::bind(address)
        .with_context(|| format!("binding the metrics endpoint to {address}"))?;
    listener.set_nonblocking(true)?;
    let bound = listener.local_addr()?;
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_io()
        .enable_time()
        .build()
        .context("starting the HTTP runtime")?;
    std::thread::Builder::new()
        .name("http".into())
        .spawn(move || {
            runtime.block_on(async move {
                let listener = match tokio::net::TcpListener::from_std(listener) {
                    Ok(listener) => listener,
                    Err(err) => {
                        tracing::error!("metrics endpoint stopped: {err}");
                        return;
                    }
                };
                loop {
                    let stream = match listener.accept().await {
                        Ok((stream, _)) => stream,
                        Err(err) => {
                            tracing::debug!("accept failed: {err}");
                            continue;
                        }
                    };
                    let telemetry = telemetry.clone();
                    tokio::task::spawn(async move {
                        let service = hyper::service::service_fn(
                            move |request: Request<hyper::body::Incoming>| {
                                let response = respond(&telemetry, request.uri().path());
                                async move { Ok::<_, Infallible>(response) }
                            },
                        );
                        let connection = hyper::server::conn::http1::Builder::new()
                            .timer(TokioTimer::new())
                            .header_read_timeout(Duration::from_secs(10))
                            .serve_connection(TokioIo::new(stream), service);
                        if let Err(err) = connection.await {
                            tracing::debug!("HTTP connection: {err}");
                        }
                    });
                }
            });
        })
        .context("starting the HTTP thread")?;
    Ok(bound)
}
