//! Network namespaces and temporary directories this process makes, deleted on drop.

use std::ffi::OsStr;
use std::fs::File;
use std::io::{Read, Write};
use std::net::{SocketAddr, TcpListener, TcpStream, UdpSocket};
use std::os::unix::process::CommandExt;
use std::path::PathBuf;
use std::process::{Command, Output};
use std::sync::atomic::{AtomicU32, Ordering};
use std::time::Duration;

use nix::sched::{CloneFlags, setns};

static COUNTER: AtomicU32 = AtomicU32::new(0);

/// A number no other call in this process gets.
pub(crate) fn next_id() -> u32 {
    COUNTER.fetch_add(1, Ordering::SeqCst)
}

/// `ima-<pid>-<n>-<tag>`: the names the namespace sweep recognises as the harness's.
fn unique(tag: &str) -> String {
    format!("ima-{}-{}-{tag}", std::process::id(), next_id())
}

/// A fresh name of the same `ima-<pid>-<n>-<tag>` form, for things other than namespaces
/// (containers, say) that a later run may sweep by the dead PID in the name.
pub fn unique_name(tag: &str) -> String {
    unique(tag)
}

/// A network namespace, deleted on drop.
pub struct Netns {
    pub name: String,
}

impl Netns {
    pub fn new(tag: &str) -> Netns {
        let name = unique(tag);
        let status = Command::new("ip")
            .args(["netns", "add", &name])
            .status()
            .expect("run ip");
        assert!(status.success(), "ip netns add {name}");
        crate::cleanup::track_namespace(&name);
        let ns = Netns { name };
        // Duplicate address detection would hold IPv6 back for a second or two on new links.
        ns.sh(&[
            "sysctl",
            "-q",
            "-w",
            "net.ipv6.conf.default.accept_dad=0",
            "net.ipv6.conf.all.accept_dad=0",
        ]);
        ns.sh(&["ip", "link", "set", "lo", "up"]);
        ns
    }

    fn handle(&self) -> File {
        File::open(format!("/run/netns/{}", self.name)).expect("open netns")
    }

    /// A command that runs inside this namespace.
    pub fn command(&self, program: impl AsRef<OsStr>) -> Command {
        let handle = self.handle();
        let mut command = Command::new(program);
        // SAFETY: setns is async-signal-safe; the closure touches nothing else.
        unsafe {
            command.pre_exec(move || {
                setns(&handle, CloneFlags::CLONE_NEWNET).map_err(std::io::Error::from)
            });
        }
        command
    }

    pub fn output(&self, args: &[&str]) -> Output {
        self.command(args[0])
            .args(&args[1..])
            .output()
            .expect("spawn in netns")
    }

    /// Runs a command in the namespace and returns stdout; panics on failure.
    pub fn sh(&self, args: &[&str]) -> String {
        let out = self.output(args);
        assert!(
            out.status.success(),
            "{} in {}: {}",
            args.join(" "),
            self.name,
            String::from_utf8_lossy(&out.stderr)
        );
        String::from_utf8_lossy(&out.stdout).into_owned()
    }

    /// [`Netns::sh`] of a command line split by [`crate::shell_words`], e.g.
    /// `iptables-nft -t nat -A POSTROUTING -m comment --comment "a b" -j X`.
    pub fn sh_line(&self, line: &str) -> String {
        let words = crate::shell_words(line);
        self.sh(&words.iter().map(String::as_str).collect::<Vec<_>>())
    }

    /// Runs `work` on a thread inside this namespace: sockets it creates stay there.
    pub fn run_inside<T: Send + 'static>(&self, work: impl FnOnce() -> T + Send + 'static) -> T {
        let handle = self.handle();
        std::thread::spawn(move || {
            setns(&handle, CloneFlags::CLONE_NEWNET).expect("setns");
            work()
        })
        .join()
        .expect("thread inside the namespace")
    }

    /// A UDP socket created inside this namespace (it stays there after the thread ends).
    pub fn udp_socket(&self, bind: SocketAddr) -> UdpSocket {
        self.run_inside(move || UdpSocket::bind(bind).expect("bind udp"))
    }

    /// A TCP listener bound inside this namespace, e.g. to hold a port.
    pub fn tcp_listener(&self, bind: SocketAddr) -> TcpListener {
        self.run_inside(move || TcpListener::bind(bind).expect("bind tcp"))
    }

    /// Up to `count` TCP connections to `address` opened from inside this namespace that
    /// never send a byte (a client holding a server's connections); a connect that fails
    /// within 2 s is left out.
    pub fn idle_tcp_connections(&self, address: SocketAddr, count: usize) -> Vec<TcpStream> {
        self.run_inside(move || {
            (0..count)
                .filter_map(|_| TcpStream::connect_timeout(&address, Duration::from_secs(2)).ok())
                .collect()
        })
    }

    /// A plain HTTP/1.1 GET from inside this namespace; returns status (0 when the
    /// answer has none) and body. Panics when there is no answer.
    pub fn http_get(&self, address: &str, path: &str) -> (u16, String) {
        let address: SocketAddr = address.parse().expect("address");
        let path = path.to_string();
        let response = self
            .run_inside(move || {
                http_get(
                    address,
                    &path,
                    Duration::from_secs(2),
                    Duration::from_secs(5),
                )
            })
            .expect("HTTP GET");
        (
            response.status.unwrap_or(0),
            response.body.unwrap_or_default(),
        )
    }

    /// A GET like [`Netns::http_get`] that reports a down or busy endpoint, or an answer
    /// without a status, as None; `timeout` bounds the connect and each read.
    pub fn try_http_get(
        &self,
        address: &str,
        path: &str,
        timeout: Duration,
    ) -> Option<(u16, String)> {
        let address: SocketAddr = address.parse().ok()?;
        let path = path.to_string();
        let response = self
            .run_inside(move || http_get(address, &path, timeout, timeout))
            .ok()?;
        Some((response.status?, response.body.unwrap_or_default()))
    }

    /// `iptables-save -t nat` (or another save tool), without its timestamp comments.
    pub fn save(&self, tool: &str) -> String {
        self.sh(&[tool, "-t", "nat"])
            .lines()
            .filter(|l| !l.starts_with('#'))
            .map(|l| format!("{l}\n"))
            .collect()
    }
}

impl Drop for Netns {
    fn drop(&mut self) {
        let _ = Command::new("ip")
            .args(["netns", "delete", &self.name])
            .status();
        crate::cleanup::untrack_namespace(&self.name);
    }
}

/// An HTTP answer: the status when the status line has one, the body when there is one.
struct Response {
    status: Option<u16>,
    body: Option<String>,
}

fn http_get(
    address: SocketAddr,
    path: &str,
    connect_timeout: Duration,
    read_timeout: Duration,
) -> std::io::Result<Response> {
    let mut stream = TcpStream::connect_timeout(&address, connect_timeout)?;
    stream.set_read_timeout(Some(read_timeout))?;
    write!(
        stream,
        "GET {path} HTTP/1.1\r\nHost: {address}\r\nConnection: close\r\n\r\n"
    )?;
    let mut response = String::new();
    stream.read_to_string(&mut response)?;
    Ok(Response {
        status: response
            .split(' ')
            .nth(1)
            .and_then(|code| code.parse().ok()),
        body: response.split_once("\r\n\r\n").map(|(_, b)| b.to_string()),
    })
}

/// A temporary directory removed on drop.
pub struct TempDir {
    pub path: PathBuf,
}

impl TempDir {
    pub fn new(tag: &str) -> TempDir {
        let path = std::env::temp_dir().join(unique(tag));
        std::fs::create_dir_all(&path).expect("mkdir");
        crate::cleanup::track_dir(&path);
        TempDir { path }
    }
}

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.path);
        crate::cleanup::untrack_dir(&self.path);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn temp_dirs_are_unique_and_removed_on_drop() {
        let (a, b) = (TempDir::new("t"), TempDir::new("t"));
        assert_ne!(a.path, b.path);
        let path = a.path.clone();
        std::fs::write(path.join("file"), "x").unwrap();
        drop(a);
        assert!(!path.exists());
    }
}
