//! The HTTP endpoint: /metrics, /healthz, /readyz, on its own thread with a
//! current-thread tokio runtime so the agent loop stays plain and synchronous.
//!
//! Nothing here may keep the agent from syncing: a port that is taken, a thread or runtime
//! that cannot start, a flood of connections or a process out of file descriptors degrade
//! the endpoint and are logged, but masquerading must not wait for a metrics port.

use std::convert::Infallible;
use std::fs::File;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::{Duration, Instant};

use http_body_util::Full;
use hyper::body::Bytes;
use hyper::{Request, Response, StatusCode};
use hyper_util::rt::{TokioIo, TokioTimer};
use tokio::sync::{OwnedSemaphorePermit, Semaphore};

use super::telemetry::Telemetry;

const OPENMETRICS: &str = "application/openmetrics-text; version=1.0.0; charset=utf-8";

/// Connections served at once; further ones wait in the kernel's backlog.
const MAX_CONNECTIONS: usize = 64;
/// After running out of file descriptors the cap drops to the connections open then,
/// but never below this: kubelet's probes and a scrape must still fit side by side.
const MIN_CONNECTIONS_AFTER_FD_EXHAUSTION: usize = 4;
/// Descriptors held (on /dev/null) and released when accept() hits the process limit, so
/// the sync still finds some for its iptables/nft pipes even though the connections
/// took the rest.
const FDS_RESERVED_FOR_SYNCING: usize = 16;
/// A client that sends no complete request head in this time is dropped (slowloris);
/// hyper also applies it to idle keep-alive connections.
const HEADER_READ_TIMEOUT: Duration = Duration::from_secs(10);
/// Bounds every connection, whatever the client does, so held slots always come back.
const CONNECTION_LIFETIME: Duration = Duration::from_secs(60);
/// Time a connection past its lifetime gets to finish the response in flight.
const CLOSE_GRACE: Duration = Duration::from_secs(5);

const BIND_RETRY_FIRST: Duration = Duration::from_secs(1);
const BIND_RETRY_MAX: Duration = Duration::from_secs(30);
/// While the port stays taken, one warning per this interval; the counter has the rest.
const BIND_FAILURE_LOG_INTERVAL: Duration = Duration::from_secs(300);

const ACCEPT_BACKOFF_FIRST: Duration = Duration::from_millis(100);
const ACCEPT_BACKOFF_MAX: Duration = Duration::from_secs(1);
const ACCEPT_ERROR_LOG_INTERVAL: Duration = Duration::from_secs(10);

/// Linux errno values for "too many open files" (process and system limit); the agent
/// only runs on Linux, and std has no ErrorKind for them.
const EMFILE: i32 = 24;
const ENFILE: i32 = 23;

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

fn bind(address: SocketAddr) -> std::io::Result<std::net::TcpListener> {
    let listener = std::net::TcpListener::bind(address)?;
    listener.set_nonblocking(true)?;
    Ok(listener)
}

/// Serves the endpoint on a new thread and returns at once; never fails. The first bind
/// is tried here, so a free port is listening before the first sync; a taken one is
/// retried on the HTTP thread while the agent syncs.
pub fn serve(address: SocketAddr, telemetry: Arc<Telemetry>) {
    let first_bind = bind(address);
    let spawned = std::thread::Builder::new()
        .name("http".into())
        .spawn(move || run(address, first_bind, telemetry));
    if let Err(err) = spawned {
        tracing::error!(
            "cannot start the HTTP thread ({err}); syncing without /metrics, /healthz and /readyz"
        );
    }
}

fn run(
    address: SocketAddr,
    first_bind: std::io::Result<std::net::TcpListener>,
    telemetry: Arc<Telemetry>,
) {
    let runtime = match tokio::runtime::Builder::new_current_thread()
        .enable_io()
        .enable_time()
        .build()
    {
        Ok(runtime) => runtime,
        Err(err) => {
            tracing::error!(
                "cannot start the HTTP runtime ({err}); syncing without /metrics, /healthz and /readyz"
            );
            return;
        }
    };
    runtime.block_on(async move {
        let listener = listen(address, first_bind, &telemetry).await;
        accept_connections(listener, telemetry).await;
    });
}

/// Binds `address`, retrying with a capped backoff for as long as it takes.
async fn listen(
    address: SocketAddr,
    first_bind: std::io::Result<std::net::TcpListener>,
    telemetry: &Telemetry,
) -> tokio::net::TcpListener {
    let mut first_bind = Some(first_bind);
    let mut failed_attempts: u64 = 0;
    let mut retry_in = BIND_RETRY_FIRST;
    let mut last_warning: Option<Instant> = None;
    loop {
        let attempt = first_bind.take().unwrap_or_else(|| bind(address));
        match attempt.and_then(tokio::net::TcpListener::from_std) {
            Ok(listener) => {
                let bound = listener.local_addr().unwrap_or(address);
                telemetry.http_bound(failed_attempts);
                if failed_attempts == 0 {
                    tracing::info!("serving /metrics, /healthz and /readyz on http://{bound}");
                } else {
                    tracing::info!(
                        "serving /metrics, /healthz and /readyz on http://{bound} (bound after {failed_attempts} failed attempt(s))"
                    );
                }
                return listener;
            }
            Err(err) => {
                failed_attempts += 1;
                telemetry.http_bind_failed();
                let warning_due =
                    last_warning.is_none_or(|at| at.elapsed() >= BIND_FAILURE_LOG_INTERVAL);
                if !warning_due {
                    tracing::debug!("binding {address} failed again: {err}");
                } else if last_warning.is_none() {
                    tracing::warn!(
                        "cannot serve /metrics, /healthz and /readyz on {address}: {err}; syncing without them and retrying in the background"
                    );
                } else {
                    tracing::warn!(
                        "still cannot serve /metrics, /healthz and /readyz on {address} after {failed_attempts} attempts: {err}; retrying every {retry_in:?}"
                    );
                }
                if warning_due {
                    last_warning = Some(Instant::now());
                }
                tokio::time::sleep(retry_in).await;
                retry_in = (retry_in * 2).min(BIND_RETRY_MAX);
            }
        }
    }
}

/// The semaphore behind the connection cap, with the cap it currently stands for.
struct ConnectionLimit {
    permits: Arc<Semaphore>,
    cap: usize,
}

impl ConnectionLimit {
    fn new(cap: usize) -> ConnectionLimit {
        ConnectionLimit {
            permits: Arc::new(Semaphore::new(cap)),
            cap,
        }
    }

    fn in_flight(&self) -> usize {
        self.cap.saturating_sub(self.permits.available_permits())
    }

    /// Accepts no more connections than are open now (with a floor), so descriptors the
    /// connections give back stay free for the sync. Returns the new cap.
    fn shrink_to_in_flight(&mut self) -> usize {
        let target = self.in_flight().max(MIN_CONNECTIONS_AFTER_FD_EXHAUSTION);
        if target < self.cap {
            self.cap -= self.permits.forget_permits(self.cap - target);
        }
        self.cap
    }
}

/// Backoff and rate-limited logging for accept() errors: a listener whose accept fails
/// (EMFILE, ENFILE, ENOBUFS, ...) stays readable, so retrying at once would spin a core
/// and write a log line per spin.
struct AcceptErrors {
    next_delay: Duration,
    consecutive: u64,
    last_logged: Option<Instant>,
    suppressed: u64,
}

impl AcceptErrors {
    fn new() -> AcceptErrors {
        AcceptErrors {
            next_delay: ACCEPT_BACKOFF_FIRST,
            consecutive: 0,
            last_logged: None,
            suppressed: 0,
        }
    }

    /// Logs (or counts) the error and returns how long to wait before the next accept.
    fn failed(&mut self, err: &std::io::Error) -> Duration {
        self.consecutive += 1;
        match self.last_logged {
            None => tracing::warn!(
                "accepting an HTTP connection failed: {err}; backing off (such failures are logged at most every {ACCEPT_ERROR_LOG_INTERVAL:?})"
            ),
            Some(at) if at.elapsed() >= ACCEPT_ERROR_LOG_INTERVAL => tracing::warn!(
                "accepting HTTP connections still fails: {err} ({} more failure(s) since the last message)",
                self.suppressed
            ),
            Some(_) => {
                self.suppressed += 1;
                return self.back_off();
            }
        }
        self.last_logged = Some(Instant::now());
        self.suppressed = 0;
        self.back_off()
    }

    fn back_off(&mut self) -> Duration {
        let delay = self.next_delay;
        self.next_delay = (delay * 2).min(ACCEPT_BACKOFF_MAX);
        delay
    }

    fn succeeded(&mut self) {
        if self.consecutive > 0 {
            // Debug only: an endpoint flapping between errors and successes would
            // otherwise log on every recovery.
            tracing::debug!(
                "accepting HTTP connections again after {} failure(s)",
                self.consecutive
            );
            self.consecutive = 0;
            self.next_delay = ACCEPT_BACKOFF_FIRST;
        }
    }
}

fn is_out_of_file_descriptors(err: &std::io::Error) -> bool {
    matches!(err.raw_os_error(), Some(EMFILE) | Some(ENFILE))
}

async fn accept_connections(listener: tokio::net::TcpListener, telemetry: Arc<Telemetry>) {
    let mut limit = ConnectionLimit::new(MAX_CONNECTIONS);
    // Fewer if the limit is already that tight; they are a cushion, not a requirement.
    let mut fd_reserve: Vec<File> = (0..FDS_RESERVED_FOR_SYNCING)
        .map_while(|_| File::open("/dev/null").ok())
        .collect();
    let mut errors = AcceptErrors::new();
    loop {
        // Taken before accept(), so connections beyond the cap wait in the backlog
        // instead of holding descriptors here.
        let Ok(permit) = limit.permits.clone().acquire_owned().await else {
            tracing::error!("the HTTP connection limit was closed; no longer serving");
            return;
        };
        match listener.accept().await {
            Ok((stream, _)) => {
                errors.succeeded();
                tokio::task::spawn(serve_connection(stream, permit, telemetry.clone()));
            }
            Err(err) => {
                drop(permit);
                telemetry.http_accept_failed();
                if is_out_of_file_descriptors(&err) {
                    let released = fd_reserve.len();
                    fd_reserve.clear();
                    let cap_before = limit.cap;
                    let cap = limit.shrink_to_in_flight();
                    if released > 0 || cap < cap_before {
                        tracing::warn!(
                            "out of file descriptors with {} HTTP connection(s) open: released {released} descriptor(s) kept for syncing; serving at most {cap} connection(s) at once from now on",
                            limit.in_flight()
                        );
                    }
                }
                let delay = errors.failed(&err);
                tokio::time::sleep(delay).await;
            }
        }
    }
}

async fn serve_connection(
    stream: tokio::net::TcpStream,
    _permit: OwnedSemaphorePermit,
    telemetry: Arc<Telemetry>,
) {
    let service = hyper::service::service_fn(move |request: Request<hyper::body::Incoming>| {
        let response = respond(&telemetry, request.uri().path());
        async move { Ok::<_, Infallible>(response) }
    });
    let connection = hyper::server::conn::http1::Builder::new()
        .timer(TokioTimer::new())
        .header_read_timeout(HEADER_READ_TIMEOUT)
        .serve_connection(TokioIo::new(stream), service);
    let mut connection = std::pin::pin!(connection);
    match tokio::time::timeout(CONNECTION_LIFETIME, connection.as_mut()).await {
        Ok(Ok(())) => {}
        Ok(Err(err)) => tracing::debug!("HTTP connection: {err}"),
        Err(_) => {
            connection.as_mut().graceful_shutdown();
            if let Ok(Err(err)) = tokio::time::timeout(CLOSE_GRACE, connection).await {
                tracing::debug!("HTTP connection closed at its lifetime limit: {err}");
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn accept_backoff_doubles_to_a_cap_and_resets() {
        let mut errors = AcceptErrors::new();
        let err = std::io::Error::from_raw_os_error(EMFILE);
        let delays: Vec<Duration> = (0..6).map(|_| errors.failed(&err)).collect();
        assert_eq!(
            delays,
            [100, 200, 400, 800, 1000, 1000].map(Duration::from_millis)
        );
        assert_eq!(errors.suppressed, 5, "only the first one is logged");
        errors.succeeded();
        assert_eq!(errors.failed(&err), ACCEPT_BACKOFF_FIRST);
    }

    #[test]
    fn connection_cap_shrinks_to_what_is_open_with_a_floor() {
        let mut limit = ConnectionLimit::new(MAX_CONNECTIONS);
        let held: Vec<_> = (0..10)
            .map(|_| limit.permits.clone().try_acquire_owned().expect("permit"))
            .collect();
        assert_eq!(limit.shrink_to_in_flight(), 10);
        assert_eq!(limit.permits.available_permits(), 0);
        drop(held);
        assert_eq!(limit.permits.available_permits(), 10);
        assert_eq!(
            limit.shrink_to_in_flight(),
            MIN_CONNECTIONS_AFTER_FD_EXHAUSTION
        );
        assert_eq!(
            limit.permits.available_permits(),
            MIN_CONNECTIONS_AFTER_FD_EXHAUSTION
        );
    }
}
