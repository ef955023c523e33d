//! The HTTP endpoint: /metrics, /healthz, /readyz, on its own thread with a
//! current-thread tokio runtime so the agent loop stays plain and synchronous.
//!
//! Nothing here may keep the agent from syncing: a port that is taken, a thread or runtime
//! that cannot start, a flood of connections or a process out of file descriptors degrade
//! the endpoint and are logged, but masquerading must not wait for a metrics port.

use std::convert::Infallible;
use std::fs::File;
use std::net::SocketAddr;
use std::os::fd::AsRawFd;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use http_body_util::Full;
use hyper::body::Bytes;
use hyper::{Request, Response, StatusCode};
use hyper_util::rt::{TokioIo, TokioTimer};
use tokio::task::AbortHandle;

use super::telemetry::Telemetry;

const OPENMETRICS: &str = "application/openmetrics-text; version=1.0.0; charset=utf-8";

/// Connections kept open at once. Every connection is accepted; past the cap, each new
/// one closes the open connection that has gone longest without a request (counting from
/// its accept until the first), so a process holding idle connections cannot keep
/// kubelet's probes out: they are never left waiting in the kernel's backlog.
const MAX_CONNECTIONS: usize = 64;
/// After running out of file descriptors the cap drops to the connections open then,
/// but never below this: kubelet's probes and a scrape must still fit side by side.
const MIN_CONNECTIONS_AFTER_FD_EXHAUSTION: usize = 4;
/// Connections the kernel may queue before accept() (capped by net.core.somaxconn).
const LISTEN_BACKLOG: libc::c_int = 1024;
/// Descriptors held (on /dev/null) and released when accept() hits the process limit, so
/// the sync still finds some for its iptables/nft pipes even though the connections
/// took the rest.
const FDS_RESERVED_FOR_SYNCING: usize = 16;
/// After running out of descriptors, how often the endpoint checks whether they are
/// back (the process limit leaves room for the reserve, the full cap and a margin); then
/// it takes its reserve back and serves up to [`MAX_CONNECTIONS`] again.
const FD_RECOVERY_CHECK: Duration = Duration::from_secs(15);
/// A client that sends no complete request head in this time is dropped (slowloris);
/// hyper also applies it to idle keep-alive connections. Probes and scrapes send their
/// request at once, so it is short.
const HEADER_READ_TIMEOUT: Duration = Duration::from_secs(5);
/// Bounds every connection, whatever the client does.
const CONNECTION_LIFETIME: Duration = Duration::from_secs(60);
/// Time a connection past its lifetime gets to finish the response in flight.
const CLOSE_GRACE: Duration = Duration::from_secs(5);
/// While connections keep being closed to make room, one warning per this interval.
const CLOSING_LOG_INTERVAL: Duration = Duration::from_secs(600);

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
    // std listens with a backlog of 128; a longer one keeps a probe's SYN from being
    // dropped (and sent again only a second later) while a burst of connections is
    // accepted. Linux takes a second listen() as a new backlog; on failure 128 stays.
    // SAFETY: listen() on a descriptor the listener owns.
    unsafe {
        libc::listen(listener.as_raw_fd(), LISTEN_BACKLOG);
    }
    listener.set_nonblocking(true)?;
    Ok(listener)
}

/// Serves the endpoint on a new thread and returns at once; never fails. The first bind
/// is tried here, so a free port is listening before the first sync; a taken one is
/// retried on the HTTP thread while the agent syncs.
/// Asked about once a second: Some(why) when another process should have the endpoint
/// (a newer agent of the node): the endpoint is then closed for good and left to it.
pub type HandOver = Box<dyn Fn() -> Option<String> + Send + Sync>;

/// The most a connection buffers of a request (hyper's minimum is 8 KiB).
const READ_BUFFER: usize = 16 * 1024;

/// How often the endpoint asks whether to hand itself over.
const HAND_OVER_CHECK: Duration = Duration::from_secs(1);

pub fn serve(address: SocketAddr, telemetry: Arc<Telemetry>, hand_over: Option<HandOver>) {
    let first_bind = bind(address);
    let spawned = std::thread::Builder::new()
        .name("http".into())
        .spawn(move || run(address, first_bind, telemetry, hand_over));
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
    hand_over: Option<HandOver>,
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
        accept_connections(listener, telemetry, hand_over).await;
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

/// The open connections, each with the time it was last used (its last request, or its
/// accept until the first) and the handle that closes it.
#[derive(Default)]
struct OpenConnections {
    entries: Vec<OpenConnection>,
    next_id: u64,
}

struct OpenConnection {
    id: u64,
    last_used: Instant,
    close: AbortHandle,
}

type SharedConnections = Arc<Mutex<OpenConnections>>;

fn lock(open: &SharedConnections) -> std::sync::MutexGuard<'_, OpenConnections> {
    // A poisoned lock only means a panic elsewhere; the list is still usable.
    open.lock().unwrap_or_else(|e| e.into_inner())
}

impl OpenConnections {
    fn next_id(&mut self) -> u64 {
        self.next_id += 1;
        self.next_id
    }

    fn insert(&mut self, id: u64, close: AbortHandle) {
        self.entries.push(OpenConnection {
            id,
            last_used: Instant::now(),
            close,
        });
    }

    fn used(&mut self, id: u64) {
        if let Some(entry) = self.entries.iter_mut().find(|e| e.id == id) {
            entry.last_used = Instant::now();
        }
    }

    fn remove(&mut self, id: u64) {
        self.entries.retain(|e| e.id != id);
    }

    fn len(&self) -> usize {
        self.entries.len()
    }

    /// Closes the connections used least recently, never `keep` (the one just accepted),
    /// until at most `cap` are open; returns how many it closed.
    fn close_beyond(&mut self, cap: usize, keep: Option<u64>) -> usize {
        let mut closed = 0;
        while self.entries.len() > cap {
            let oldest = self
                .entries
                .iter()
                .enumerate()
                .filter(|(_, e)| Some(e.id) != keep)
                .min_by_key(|(_, e)| e.last_used)
                .map(|(index, _)| index);
            let Some(oldest) = oldest else { break };
            self.entries.swap_remove(oldest).close.abort();
            closed += 1;
        }
        closed
    }
}

/// A connection's place in [`OpenConnections`], given up when its task ends or is
/// aborted.
struct Registered {
    id: u64,
    open: SharedConnections,
}

impl Drop for Registered {
    fn drop(&mut self) {
        lock(&self.open).remove(self.id);
    }
}

/// Whether the process limit on descriptors leaves room for the reserve, a full cap of
/// connections and as much again as a margin, beside the `open_fds` open now.
fn fds_are_back(open_fds: usize, soft_limit: u64) -> bool {
    let needed = open_fds + FDS_RESERVED_FOR_SYNCING + 2 * MAX_CONNECTIONS;
    needed as u64 <= soft_limit
}

/// The descriptors this process has open, and its soft limit (None if unknown).
fn fd_usage() -> Option<(usize, u64)> {
    let open = std::fs::read_dir("/proc/self/fd").ok()?.count();
    let mut limit = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    // SAFETY: getrlimit writes into the struct we own.
    let status = unsafe { libc::getrlimit(libc::RLIMIT_NOFILE, &mut limit) };
    (status == 0).then_some((open, limit.rlim_cur))
}

/// Opens /dev/null until `reserve` holds [`FDS_RESERVED_FOR_SYNCING`] descriptors (fewer
/// if the limit is already that tight: they are a cushion, not a requirement).
fn fill_reserve(reserve: &mut Vec<File>) {
    while reserve.len() < FDS_RESERVED_FOR_SYNCING {
        match File::open("/dev/null") {
            Ok(file) => reserve.push(file),
            Err(_) => break,
        }
    }
}

/// The connection cap, lowered while the process is out of file descriptors and raised
/// again once they are back.
struct Capacity {
    cap: usize,
    fd_reserve: Vec<File>,
    /// When the cap was lowered; None while it is [`MAX_CONNECTIONS`].
    lowered_at: Option<Instant>,
}

impl Capacity {
    fn new() -> Capacity {
        let mut fd_reserve = Vec::new();
        fill_reserve(&mut fd_reserve);
        Capacity {
            cap: MAX_CONNECTIONS,
            fd_reserve,
            lowered_at: None,
        }
    }

    /// accept() ran out of descriptors with `in_use` connections open: release the
    /// reserve (for the sync's pipes) and serve no more connections than are open now
    /// (one fewer if the reserve was already gone), at least the floor. Returns the
    /// descriptors released and the new cap.
    fn out_of_descriptors(&mut self, in_use: usize) -> (usize, usize) {
        let released = self.fd_reserve.len();
        self.fd_reserve.clear();
        let target = if released > 0 {
            in_use
        } else {
            in_use.saturating_sub(1)
        };
        self.cap = target
            .min(self.cap)
            .max(MIN_CONNECTIONS_AFTER_FD_EXHAUSTION);
        self.lowered_at = Some(Instant::now());
        (released, self.cap)
    }

    /// When the cap is lowered, the next moment to check whether descriptors are back.
    fn next_check(&self) -> Option<Instant> {
        self.lowered_at.map(|at| at + FD_RECOVERY_CHECK)
    }

    /// Raises the cap back to [`MAX_CONNECTIONS`] and refills the reserve if the check is
    /// due and `usage()` (open descriptors, soft limit) leaves room; true if it did.
    fn recover(&mut self, usage: impl FnOnce() -> Option<(usize, u64)>) -> bool {
        let Some(at) = self.lowered_at else {
            return false;
        };
        if at.elapsed() < FD_RECOVERY_CHECK {
            return false;
        }
        let room = usage().is_some_and(|(open, limit)| fds_are_back(open, limit));
        if room {
            fill_reserve(&mut self.fd_reserve);
        }
        if room && self.fd_reserve.len() == FDS_RESERVED_FOR_SYNCING {
            self.cap = MAX_CONNECTIONS;
            self.lowered_at = None;
            return true;
        }
        self.lowered_at = Some(Instant::now());
        false
    }
}

/// Rate-limited logging of connections closed to make room for new ones.
struct Closings {
    last_logged: Option<Instant>,
    since_logged: u64,
}

impl Closings {
    fn closed(&mut self, count: usize, cap: usize) {
        self.since_logged += count as u64;
        if self
            .last_logged
            .is_some_and(|at| at.elapsed() < CLOSING_LOG_INTERVAL)
        {
            return;
        }
        tracing::warn!(
            "more than {cap} HTTP connections open: closed {} that went longest without a request to make room (a local process holding idle connections?); logged at most every {CLOSING_LOG_INTERVAL:?}",
            self.since_logged
        );
        self.last_logged = Some(Instant::now());
        self.since_logged = 0;
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

async fn accept_connections(
    listener: tokio::net::TcpListener,
    telemetry: Arc<Telemetry>,
    hand_over: Option<HandOver>,
) {
    let open = SharedConnections::default();
    let mut capacity = Capacity::new();
    let mut errors = AcceptErrors::new();
    let mut closings = Closings {
        last_logged: None,
        since_logged: 0,
    };
    let mut next_hand_over_check = Instant::now() + HAND_OVER_CHECK;
    loop {
        // Two agents on one node (a rolling update with maxSurge) cannot both hold the
        // port: the older lets the newer have it, so kubelet's probes reach the pod they
        // are for instead of the one going away.
        if let Some(hand_over) = &hand_over
            && Instant::now() >= next_hand_over_check
        {
            next_hand_over_check = Instant::now() + HAND_OVER_CHECK;
            if let Some(why) = hand_over() {
                tracing::info!(
                    "{why}: closing /metrics, /healthz and /readyz here so it can serve them"
                );
                lock(&open).close_beyond(0, None);
                telemetry.http_unbound();
                return;
            }
        }
        // While the cap is lowered, wake up to check on the descriptors even if nobody
        // connects; with a hand-over to ask about, at least every second.
        let wake = match (capacity.next_check(), hand_over.is_some()) {
            (Some(at), true) => Some(at.min(next_hand_over_check)),
            (Some(at), false) => Some(at),
            (None, true) => Some(next_hand_over_check),
            (None, false) => None,
        };
        let accepted = match wake {
            Some(at) => tokio::time::timeout_at(at.into(), listener.accept())
                .await
                .ok(),
            None => Some(listener.accept().await),
        };
        if capacity.recover(fd_usage) {
            tracing::info!(
                "file descriptors are available again: serving up to {MAX_CONNECTIONS} connections again"
            );
        }
        match accepted {
            None => {}
            Some(Ok((stream, _))) => {
                errors.succeeded();
                let id = lock(&open).next_id();
                let registered = Registered {
                    id,
                    open: open.clone(),
                };
                let task =
                    tokio::task::spawn(serve_connection(stream, registered, telemetry.clone()));
                let closed = {
                    let mut open = lock(&open);
                    if !task.is_finished() {
                        open.insert(id, task.abort_handle());
                    }
                    open.close_beyond(capacity.cap, Some(id))
                };
                if closed > 0 {
                    telemetry.http_connections_closed(closed);
                    closings.closed(closed, capacity.cap);
                }
                // Lets the new connection read its request before the next accept, so a
                // flood of connections cannot close it before it is used.
                tokio::task::yield_now().await;
            }
            Some(Err(err)) => {
                telemetry.http_accept_failed();
                if is_out_of_file_descriptors(&err) {
                    let in_use = lock(&open).len();
                    let cap_before = capacity.cap;
                    let (released, cap) = capacity.out_of_descriptors(in_use);
                    let closed = lock(&open).close_beyond(cap, None);
                    if closed > 0 {
                        telemetry.http_connections_closed(closed);
                    }
                    if released > 0 || cap < cap_before {
                        tracing::warn!(
                            "out of file descriptors with {in_use} HTTP connection(s) open: released {released} descriptor(s) kept for syncing; serving at most {cap} connection(s) at once (closing the longest idle) until descriptors are back (checked every {FD_RECOVERY_CHECK:?})"
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
    registered: Registered,
    telemetry: Arc<Telemetry>,
) {
    let (open, id) = (registered.open.clone(), registered.id);
    let service = hyper::service::service_fn(move |request: Request<hyper::body::Incoming>| {
        lock(&open).used(id);
        let response = respond(&telemetry, request.uri().path());
        async move { Ok::<_, Infallible>(response) }
    });
    let connection = hyper::server::conn::http1::Builder::new()
        .timer(TokioTimer::new())
        .header_read_timeout(HEADER_READ_TIMEOUT)
        // A request here is a GET line and a few headers: a small read buffer keeps a
        // local process sending endless heads on 64 connections from costing ~400 KB
        // each (hyper's default) under the pod's memory limit.
        .max_buf_size(READ_BUFFER)
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
    drop(registered);
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

    /// Pending tasks to stand in for connections, on a runtime the test keeps.
    fn handles(runtime: &tokio::runtime::Runtime, count: usize) -> Vec<AbortHandle> {
        runtime.block_on(async {
            (0..count)
                .map(|_| tokio::task::spawn(std::future::pending::<()>()).abort_handle())
                .collect()
        })
    }

    #[test]
    fn past_the_cap_the_least_recently_used_connections_close_never_the_new_one() {
        let runtime = tokio::runtime::Builder::new_current_thread()
            .build()
            .unwrap();
        let mut open = OpenConnections::default();
        let handles = handles(&runtime, 5);
        let mut ids = Vec::new();
        for handle in &handles {
            let id = open.next_id();
            open.insert(id, handle.clone());
            ids.push(id);
            std::thread::sleep(Duration::from_millis(2));
        }
        // The first one made a request after the others were accepted.
        open.used(ids[0]);
        // The newest is kept even though it is the only one that may go.
        assert_eq!(open.close_beyond(0, Some(ids[4])), 4);
        assert_eq!(open.len(), 1);
        assert_eq!(open.entries[0].id, ids[4]);
        runtime.block_on(tokio::task::yield_now());
        assert!(handles[..4].iter().all(AbortHandle::is_finished));
        assert!(!handles[4].is_finished());

        let mut open = OpenConnections::default();
        let handles = self::handles(&runtime, 4);
        for handle in &handles {
            let id = open.next_id();
            open.insert(id, handle.clone());
            std::thread::sleep(Duration::from_millis(2));
        }
        open.used(1);
        assert_eq!(open.close_beyond(2, None), 2);
        let left: Vec<u64> = open.entries.iter().map(|e| e.id).collect();
        assert!(left.contains(&1) && left.contains(&4), "{left:?}");
        assert_eq!(open.close_beyond(2, None), 0);
    }

    #[test]
    fn the_cap_drops_when_descriptors_run_out_and_comes_back_with_them() {
        let mut capacity = Capacity::new();
        assert_eq!(capacity.fd_reserve.len(), FDS_RESERVED_FOR_SYNCING);
        assert_eq!(capacity.next_check(), None);
        assert_eq!(
            capacity.out_of_descriptors(10),
            (FDS_RESERVED_FOR_SYNCING, 10)
        );
        // Out again with the reserve gone: one fewer, never below the floor.
        assert_eq!(capacity.out_of_descriptors(10), (0, 9));
        assert_eq!(
            capacity.out_of_descriptors(1),
            (0, MIN_CONNECTIONS_AFTER_FD_EXHAUSTION)
        );
        assert!(capacity.next_check().is_some());
        // Not due yet.
        assert!(!capacity.recover(|| Some((10, 1 << 20))));
        capacity.lowered_at = Some(Instant::now() - FD_RECOVERY_CHECK);
        // Due, but the limit still leaves no room: checked again later.
        assert!(!capacity.recover(|| Some((100, 120))));
        assert_eq!(capacity.cap, MIN_CONNECTIONS_AFTER_FD_EXHAUSTION);
        assert!(capacity.next_check().is_some());
        capacity.lowered_at = Some(Instant::now() - FD_RECOVERY_CHECK);
        assert!(!capacity.recover(|| None), "unknown usage is no room");
        capacity.lowered_at = Some(Instant::now() - FD_RECOVERY_CHECK);
        assert!(capacity.recover(|| Some((100, 1 << 20))));
        assert_eq!(capacity.cap, MAX_CONNECTIONS);
        assert_eq!(capacity.fd_reserve.len(), FDS_RESERVED_FOR_SYNCING);
        assert_eq!(capacity.next_check(), None);
    }

    #[test]
    fn room_for_descriptors_counts_the_reserve_the_cap_and_a_margin() {
        let needed = 50 + FDS_RESERVED_FOR_SYNCING + 2 * MAX_CONNECTIONS;
        assert!(fds_are_back(50, needed as u64));
        assert!(!fds_are_back(50, needed as u64 - 1));
        let (open, limit) = fd_usage().expect("/proc/self/fd and getrlimit");
        assert!(open > 2 && limit >= open as u64);
    }
}
