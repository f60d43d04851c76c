//! Addresses and sockets: what the engines listen on and talk through.
//!
//! Listeners are created with socket2 so the backlog and socket options are
//! ours to choose, then handed to mio. Every write goes through `send` with
//! `MSG_NOSIGNAL`: a write to a connection the peer reset must fail with
//! `EPIPE`, not kill the process with SIGPIPE, and a library cannot assume
//! its host ignored that signal.

use std::fmt;
use std::io;
use std::net::{Shutdown, SocketAddr, ToSocketAddrs};
use std::os::fd::{AsRawFd, RawFd};
use std::os::unix::fs::{FileTypeExt, MetadataExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::str::FromStr;
use std::time::Duration;

use socket2::{Domain, SockRef, Socket, Type};

use crate::service::PeerAddr;

/// Where a service listens.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub enum Endpoint {
    /// A TCP listener: `127.0.0.1:7007`, `tcp://[::1]:7007`.
    Tcp(SocketAddr),
    /// A UDP socket: `udp://127.0.0.1:7007`.
    Udp(SocketAddr),
    /// A Unix stream listener: `unix:///tmp/echo.sock`.
    Unix(PathBuf),
    /// A Unix datagram socket: `unix-dgram:///tmp/echo.dgram`.
    UnixDatagram(PathBuf),
}

/// Why an endpoint string did not parse.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ParseEndpointError(String);

impl fmt::Display for ParseEndpointError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

impl std::error::Error for ParseEndpointError {}

impl FromStr for Endpoint {
    type Err = ParseEndpointError;

    /// Parses `ADDR` (TCP), `tcp://ADDR`, `udp://ADDR`, `unix:///PATH` or
    /// `unix-dgram:///PATH`. `ADDR` is `HOST:PORT`, IPv6 hosts in brackets;
    /// a host name is resolved and its first address used.
    fn from_str(s: &str) -> Result<Endpoint, ParseEndpointError> {
        let (scheme, rest) = match s.split_once("://") {
            Some((scheme, rest)) => (scheme, rest),
            None => ("tcp", s),
        };
        let path = || {
            if rest.is_empty() {
                Err(ParseEndpointError(format!("missing socket path in {s:?}")))
            } else {
                Ok(PathBuf::from(rest))
            }
        };
        match scheme {
            "tcp" => inet(rest).map(Endpoint::Tcp),
            "udp" => inet(rest).map(Endpoint::Udp),
            "unix" => path().map(Endpoint::Unix),
            "unix-dgram" => path().map(Endpoint::UnixDatagram),
            other => Err(ParseEndpointError(format!(
                "unknown scheme {other:?} in {s:?} (expected tcp, udp, unix or unix-dgram)"
            ))),
        }
    }
}

fn inet(s: &str) -> Result<SocketAddr, ParseEndpointError> {
    if let Ok(addr) = s.parse() {
        return Ok(addr);
    }
    let bad = || ParseEndpointError(format!("bad address {s:?} (expected HOST:PORT)"));
    s.to_socket_addrs()
        .map_err(|_| bad())?
        .next()
        .ok_or_else(bad)
}

/// Anything [`Server::bind`](crate::Server::bind) accepts as an address:
/// an [`Endpoint`] or a string in its syntax.
pub trait ToEndpoint {
    /// The endpoint, or an `InvalidInput` error saying why not.
    fn to_endpoint(self) -> io::Result<Endpoint>;
}

impl ToEndpoint for Endpoint {
    fn to_endpoint(self) -> io::Result<Endpoint> {
        Ok(self)
    }
}

impl ToEndpoint for &str {
    fn to_endpoint(self) -> io::Result<Endpoint> {
        self.parse()
            .map_err(|e| io::Error::new(io::ErrorKind::InvalidInput, e))
    }
}

impl ToEndpoint for &String {
    fn to_endpoint(self) -> io::Result<Endpoint> {
        self.as_str().to_endpoint()
    }
}

impl fmt::Display for Endpoint {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Endpoint::Tcp(a) => write!(f, "tcp://{a}"),
            Endpoint::Udp(a) => write!(f, "udp://{a}"),
            Endpoint::Unix(p) => write!(f, "unix://{}", p.display()),
            Endpoint::UnixDatagram(p) => write!(f, "unix-dgram://{}", p.display()),
        }
    }
}

impl From<SocketAddr> for Endpoint {
    /// A TCP endpoint.
    fn from(addr: SocketAddr) -> Endpoint {
        Endpoint::Tcp(addr)
    }
}

impl Endpoint {
    /// The path of a Unix endpoint.
    pub fn path(&self) -> Option<&Path> {
        match self {
            Endpoint::Unix(p) | Endpoint::UnixDatagram(p) => Some(p),
            Endpoint::Tcp(_) | Endpoint::Udp(_) => None,
        }
    }

    /// The socket address of a TCP or UDP endpoint.
    pub fn socket_addr(&self) -> Option<SocketAddr> {
        match self {
            Endpoint::Tcp(a) | Endpoint::Udp(a) => Some(*a),
            Endpoint::Unix(_) | Endpoint::UnixDatagram(_) => None,
        }
    }

    /// True for TCP and Unix stream endpoints.
    pub fn is_stream(&self) -> bool {
        matches!(self, Endpoint::Tcp(_) | Endpoint::Unix(_))
    }

    /// A command line a person can use to talk to this endpoint.
    pub fn how_to_connect(&self) -> String {
        match self {
            Endpoint::Tcp(a) => format!("nc {} {}", a.ip(), a.port()),
            Endpoint::Udp(a) => format!("nc -u {} {}", a.ip(), a.port()),
            Endpoint::Unix(p) => format!("nc -U {}", p.display()),
            Endpoint::UnixDatagram(p) => format!("nc -uU {}", p.display()),
        }
    }
}

/// A connected stream socket.
#[derive(Debug)]
pub(crate) enum Stream {
    Tcp(mio::net::TcpStream),
    Unix(mio::net::UnixStream),
}

impl Stream {
    #[inline]
    pub(crate) fn fd(&self) -> RawFd {
        match self {
            Stream::Tcp(s) => s.as_raw_fd(),
            Stream::Unix(s) => s.as_raw_fd(),
        }
    }

    fn sock(&self) -> SockRef<'_> {
        match self {
            Stream::Tcp(s) => SockRef::from(s),
            Stream::Unix(s) => SockRef::from(s),
        }
    }

    /// One `recv(2)`.
    ///
    /// Straight to the C library on the descriptor, for both kinds of
    /// stream: the hot path of every loop turn, where the std, mio and
    /// socket2 layers (enum dispatch, `Read` adapters) cost 15-20
    /// instructions per call on top of the C wrapper's 10 (callgrind).
    #[inline]
    pub(crate) fn read(&self, buf: &mut [u8]) -> io::Result<usize> {
        // SAFETY: `buf` is valid for writes of `buf.len()` bytes for the
        // whole call, and the descriptor is owned by `self`.
        let n = unsafe { libc::recv(self.fd(), buf.as_mut_ptr().cast(), buf.len(), 0) };
        if n < 0 {
            Err(io::Error::last_os_error())
        } else {
            Ok(n as usize)
        }
    }

    /// One `send(2)`; never raises SIGPIPE.
    #[inline]
    pub(crate) fn send(&self, buf: &[u8]) -> io::Result<usize> {
        // SAFETY: `buf` is valid for reads of `buf.len()` bytes for the
        // whole call, and the descriptor is owned by `self`.
        let n = unsafe { libc::send(self.fd(), buf.as_ptr().cast(), buf.len(), SEND_FLAGS) };
        if n < 0 {
            Err(io::Error::last_os_error())
        } else {
            Ok(n as usize)
        }
    }

    pub(crate) fn shutdown_write(&self) {
        // ENOTCONN here means the peer is already gone, which is fine.
        let _ = self.sock().shutdown(Shutdown::Write);
    }

    /// Makes the coming close send a reset and drop unsent data at once.
    pub(crate) fn set_reset_on_close(&self) {
        if let Stream::Tcp(_) = self {
            let _ = self.sock().set_linger(Some(Duration::ZERO));
        }
    }
}

#[cfg(any(target_os = "linux", target_os = "android", target_os = "freebsd"))]
pub(crate) const SEND_FLAGS: libc::c_int = libc::MSG_NOSIGNAL;
#[cfg(not(any(target_os = "linux", target_os = "android", target_os = "freebsd")))]
pub(crate) const SEND_FLAGS: libc::c_int = 0; // SO_NOSIGPIPE is set on accept instead.

/// A listening stream socket.
#[derive(Debug)]
pub(crate) enum StreamListener {
    Tcp(mio::net::TcpListener),
    Unix(WithFile<mio::net::UnixListener>),
}

impl StreamListener {
    pub(crate) fn fd(&self) -> RawFd {
        match self {
            StreamListener::Tcp(l) => l.as_raw_fd(),
            StreamListener::Unix(l) => l.as_raw_fd(),
        }
    }

    /// One `accept4(2)`; the new socket is non-blocking and close-on-exec.
    pub(crate) fn accept(&self, nodelay: bool) -> io::Result<(Stream, PeerAddr)> {
        let (stream, peer) = match self {
            StreamListener::Tcp(l) => {
                let (s, peer) = l.accept()?;
                if nodelay {
                    // Best effort: a failure only costs latency.
                    let _ = s.set_nodelay(true);
                }
                (Stream::Tcp(s), PeerAddr::Inet(peer))
            }
            StreamListener::Unix(l) => {
                let (s, peer) = l.accept()?;
                (Stream::Unix(s), PeerAddr::from_unix(&peer))
            }
        };
        #[cfg(any(target_os = "macos", target_os = "ios"))]
        let _ = stream.sock().set_nosigpipe(true);
        Ok((stream, peer))
    }
}

/// A datagram socket.
#[derive(Debug)]
pub(crate) enum DgramSocket {
    Udp(mio::net::UdpSocket),
    Unix(WithFile<mio::net::UnixDatagram>),
}

impl DgramSocket {
    pub(crate) fn fd(&self) -> RawFd {
        match self {
            DgramSocket::Udp(s) => s.as_raw_fd(),
            DgramSocket::Unix(s) => s.as_raw_fd(),
        }
    }

    pub(crate) fn recv_from(&self, buf: &mut [u8]) -> io::Result<(usize, PeerAddr)> {
        match self {
            DgramSocket::Udp(s) => s.recv_from(buf).map(|(n, a)| (n, PeerAddr::Inet(a))),
            DgramSocket::Unix(s) => s.recv_from(buf).map(|(n, a)| (n, PeerAddr::from_unix(&a))),
        }
    }

    pub(crate) fn send_to(&self, buf: &[u8], to: &PeerAddr) -> io::Result<usize> {
        match (self, to) {
            (DgramSocket::Udp(s), PeerAddr::Inet(a)) => s.send_to(buf, *a),
            (DgramSocket::Unix(s), PeerAddr::Unix(Some(path))) => s.send_to(buf, path),
            (DgramSocket::Unix(_), PeerAddr::Unix(None)) => Err(io::Error::new(
                io::ErrorKind::AddrNotAvailable,
                "the sender has no address to reply to (an unbound Unix socket)",
            )),
            _ => Err(io::Error::new(
                io::ErrorKind::InvalidInput,
                "address family does not match the socket",
            )),
        }
    }
}

/// Binds a datagram endpoint (`udp://` or `unix-dgram://`); returns the
/// socket, non-blocking, and where it really is (the port the kernel chose
/// for port 0).
pub(crate) fn dgram_socket(endpoint: &Endpoint) -> io::Result<(DgramSocket, Endpoint)> {
    match endpoint {
        Endpoint::Udp(addr) => {
            let s = udp_socket(*addr)?;
            let local = s.local_addr()?;
            Ok((DgramSocket::Udp(s), Endpoint::Udp(local)))
        }
        Endpoint::UnixDatagram(path) => {
            let (socket, file) = unix_socket(path, Type::DGRAM, DEFAULT_SOCKET_MODE, 0)?;
            let std: std::os::unix::net::UnixDatagram = socket.into();
            Ok((
                DgramSocket::Unix(WithFile::new(mio::net::UnixDatagram::from_std(std), file)),
                endpoint.clone(),
            ))
        }
        Endpoint::Tcp(_) | Endpoint::Unix(_) => Err(io::Error::new(
            io::ErrorKind::InvalidInput,
            format!(
                "{endpoint} is a stream endpoint; a datagram service needs udp:// or unix-dgram://"
            ),
        )),
    }
}

/// A UDP socket. No `SO_REUSEADDR`: for UDP it would let a second server
/// bind the same port silently.
pub(crate) fn udp_socket(addr: SocketAddr) -> io::Result<mio::net::UdpSocket> {
    let socket = Socket::new(Domain::for_address(addr), Type::DGRAM, None)?;
    if addr.is_ipv6() {
        socket.set_only_v6(true)?;
    }
    socket.set_nonblocking(true)?;
    socket.bind(&addr.into())?;
    Ok(mio::net::UdpSocket::from_std(socket.into()))
}

/// A listening stream socket as std makes it, before an engine adopts it
/// (the loop engines hand it to mio; the thread engine uses it as it is).
#[derive(Debug)]
pub(crate) enum StdListener {
    Tcp(std::net::TcpListener),
    Unix(WithFile<std::os::unix::net::UnixListener>),
}

impl StdListener {
    pub(crate) fn fd(&self) -> RawFd {
        match self {
            StdListener::Tcp(l) => l.as_raw_fd(),
            StdListener::Unix(l) => l.as_raw_fd(),
        }
    }

    /// The same listener for a mio poller (the socket file goes with it).
    pub(crate) fn into_mio(self) -> StreamListener {
        match self {
            StdListener::Tcp(l) => StreamListener::Tcp(mio::net::TcpListener::from_std(l)),
            StdListener::Unix(WithFile { socket, file }) => StreamListener::Unix(WithFile::new(
                mio::net::UnixListener::from_std(socket),
                file,
            )),
        }
    }
}

/// Creates the listener for a stream endpoint: TCP with our backlog and
/// send buffer, Unix with mode 0700 (replacing a stale socket file).
/// Returns it and where it really listens (the port the kernel chose).
pub(crate) fn stream_listener(
    endpoint: &Endpoint,
    backlog: i32,
    send_buffer: Option<usize>,
) -> io::Result<(StdListener, Endpoint)> {
    match endpoint {
        Endpoint::Tcp(addr) => {
            let l = tcp_listener(*addr, backlog, send_buffer)?;
            let local = l.local_addr()?;
            Ok((StdListener::Tcp(l), Endpoint::Tcp(local)))
        }
        Endpoint::Unix(path) => {
            let (socket, file) = unix_socket(path, Type::STREAM, DEFAULT_SOCKET_MODE, backlog)?;
            Ok((
                StdListener::Unix(WithFile::new(socket.into(), file)),
                endpoint.clone(),
            ))
        }
        Endpoint::Udp(_) | Endpoint::UnixDatagram(_) => Err(io::Error::new(
            io::ErrorKind::InvalidInput,
            format!("{endpoint} is a datagram endpoint; a stream service needs tcp:// or unix://"),
        )),
    }
}

/// A TCP listener with our backlog and `SO_REUSEADDR` (so a restarted
/// server can bind while old connections sit in TIME_WAIT).
pub(crate) fn tcp_listener(
    addr: SocketAddr,
    backlog: i32,
    send_buffer: Option<usize>,
) -> io::Result<std::net::TcpListener> {
    let socket = Socket::new(Domain::for_address(addr), Type::STREAM, None)?;
    if let Some(size) = send_buffer {
        socket.set_send_buffer_size(size)?;
    }
    if addr.is_ipv6() {
        // Keep [::]:PORT from also taking the IPv4 port, so both can be bound.
        socket.set_only_v6(true)?;
    }
    socket.set_reuse_address(true)?;
    socket.set_nonblocking(true)?;
    socket.bind(&addr.into())?;
    socket.listen(backlog)?;
    Ok(socket.into())
}

/// Default mode of the socket files muxserve creates: only the owner may
/// connect.
pub const DEFAULT_SOCKET_MODE: u32 = 0o700;

/// Creates a Unix socket of `ty` bound to `path` with file mode `mode`,
/// and the guard that removes the socket file it created.
///
/// A socket file left behind by a dead server is replaced; one that still
/// answers is not (`AddrInUse`), and a path that is not a socket is never
/// removed. If anything fails after `bind` created the file, the guard
/// removes it again before the error is returned.
pub(crate) fn unix_socket(
    path: &Path,
    ty: Type,
    mode: u32,
    backlog: i32,
) -> io::Result<(Socket, SocketFile)> {
    remove_if_stale(path, ty)?;
    let socket = Socket::new(Domain::UNIX, ty, None)?;
    socket.set_nonblocking(true)?;
    // On Linux the file bind(2) creates takes the socket inode's mode, so
    // setting it first leaves no window in which others could connect.
    let _ = SockRef::from(&socket).set_cloexec(true);
    fchmod(&socket, mode);
    socket.bind(&socket2::SockAddr::unix(path)?)?;
    let file = SocketFile::created(path)?;
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(mode))?;
    if ty == Type::STREAM {
        socket.listen(backlog)?;
    }
    Ok((socket, file))
}

/// The socket file a listener (or datagram socket) of ours created, removed
/// when the guard is dropped: at shutdown, when a server that never ran is
/// dropped, and on every error path between `bind` and serving, on every
/// engine, with no code of the engines' own.
///
/// It is removed only if the path still names the very file `bind` made
/// (same device and inode). Another server may have replaced it since:
/// someone deleted ours and started a new one on the same path, which is
/// how a restart is often done. Unlinking by name alone would cut that
/// server off from every new client while it keeps running. (A replacement
/// between our check and the unlink cannot be ruled out from user space;
/// that window is a few microseconds at shutdown.)
/// A Unix socket together with the socket file it created: derefs to the
/// socket, and removes the file (see [`SocketFile`]) when dropped.
#[derive(Debug)]
pub(crate) struct WithFile<T> {
    socket: T,
    file: SocketFile,
}

impl<T> WithFile<T> {
    fn new(socket: T, file: SocketFile) -> WithFile<T> {
        WithFile { socket, file }
    }
}

impl<T> std::ops::Deref for WithFile<T> {
    type Target = T;
    fn deref(&self) -> &T {
        &self.socket
    }
}

#[derive(Debug)]
pub(crate) struct SocketFile {
    path: PathBuf,
    dev: u64,
    ino: u64,
}

impl SocketFile {
    /// Remembers the file `bind` has just created at `path`. If even that
    /// fails, the file is removed by name: nobody else can have replaced it
    /// in between, for practical purposes.
    fn created(path: &Path) -> io::Result<SocketFile> {
        match std::fs::symlink_metadata(path) {
            Ok(meta) => Ok(SocketFile {
                path: path.to_path_buf(),
                dev: meta.dev(),
                ino: meta.ino(),
            }),
            Err(e) => {
                let _ = std::fs::remove_file(path);
                Err(e)
            }
        }
    }
}

impl Drop for SocketFile {
    fn drop(&mut self) {
        let path = self.path.display();
        match std::fs::symlink_metadata(&self.path) {
            Ok(meta) if meta.dev() == self.dev && meta.ino() == self.ino => {
                if let Err(e) = std::fs::remove_file(&self.path) {
                    if e.kind() != io::ErrorKind::NotFound {
                        log::warn!("cannot remove {path}: {e}");
                    }
                }
            }
            Ok(_) => log::info!("{path} is no longer the socket file we made; left as it is"),
            // Someone removed it already.
            Err(e) if e.kind() == io::ErrorKind::NotFound => {}
            Err(e) => log::warn!("cannot check {path} before removing it: {e}"),
        }
    }
}

fn fchmod(socket: &Socket, mode: u32) {
    // SAFETY: fchmod only reads the descriptor, which `socket` keeps open.
    unsafe {
        libc::fchmod(socket.as_raw_fd(), mode as libc::mode_t);
    }
}

fn remove_if_stale(path: &Path, ty: Type) -> io::Result<()> {
    let meta = match std::fs::symlink_metadata(path) {
        Ok(meta) => meta,
        Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(()),
        Err(e) => return Err(e),
    };
    if !meta.file_type().is_socket() {
        return Err(io::Error::new(
            io::ErrorKind::AlreadyExists,
            format!("{} exists and is not a socket", path.display()),
        ));
    }
    // Does anything answer there? Non-blocking, so a live server with a
    // full backlog (EAGAIN) counts as live instead of hanging the start.
    let probe = Socket::new(Domain::UNIX, ty, None)?;
    probe.set_nonblocking(true)?;
    let in_use = || {
        io::Error::new(
            io::ErrorKind::AddrInUse,
            format!("{} is in use by a running server", path.display()),
        )
    };
    match probe.connect(&socket2::SockAddr::unix(path)?) {
        Ok(()) => Err(in_use()),
        Err(e) if e.kind() == io::ErrorKind::WouldBlock => Err(in_use()),
        Err(e) if e.raw_os_error() == Some(libc::ECONNREFUSED) => {
            log::info!("replacing stale socket file {}", path.display());
            std::fs::remove_file(path)
        }
        Err(e) => Err(e),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_every_scheme() {
        let tcp: SocketAddr = "127.0.0.1:7007".parse().unwrap();
        assert_eq!("127.0.0.1:7007".parse(), Ok(Endpoint::Tcp(tcp)));
        assert_eq!("tcp://127.0.0.1:7007".parse(), Ok(Endpoint::Tcp(tcp)));
        assert_eq!("udp://127.0.0.1:7007".parse(), Ok(Endpoint::Udp(tcp)));
        assert_eq!(
            "tcp://[::1]:9".parse(),
            Ok(Endpoint::Tcp("[::1]:9".parse().unwrap()))
        );
        assert_eq!(
            "unix:///tmp/a.sock".parse(),
            Ok(Endpoint::Unix("/tmp/a.sock".into()))
        );
        assert_eq!(
            "unix-dgram:///tmp/a".parse(),
            Ok(Endpoint::UnixDatagram("/tmp/a".into()))
        );
    }

    #[test]
    fn rejects_nonsense() {
        for bad in ["", "7007", "sctp://1.2.3.4:5", "unix://", "127.0.0.1:99999"] {
            assert!(bad.parse::<Endpoint>().is_err(), "{bad:?} parsed");
        }
    }

    #[test]
    fn display_round_trips() {
        for s in [
            "tcp://127.0.0.1:1",
            "udp://[::1]:2",
            "unix:///x",
            "unix-dgram:///y",
        ] {
            assert_eq!(s.parse::<Endpoint>().unwrap().to_string(), s);
        }
    }
}
