//! Test helpers: every integration test starts its servers through here,
//! on 127.0.0.1 port 0, and every client socket has timeouts, so a broken
//! server fails a test instead of hanging it.

#![allow(dead_code)] // each test binary uses its own subset

use std::io::{self, Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::sync::mpsc;
use std::thread::{self, JoinHandle};
use std::time::{Duration, Instant};

use muxserve::{Endpoint, Handle, Report, Server, Service};

/// The longest any single client read or write may block in a test.
pub const IO_TIMEOUT: Duration = Duration::from_secs(20);

/// Binds `service` on a fresh loopback port of `server`.
pub fn local<S: Service + 'static>(server: &mut Server, service: S) -> SocketAddr {
    match server
        .bind("127.0.0.1:0", service)
        .expect("bind on loopback")
    {
        Endpoint::Tcp(addr) => addr,
        other => panic!("bound {other}"),
    }
}

/// A server running on its own thread; stopped and joined when dropped.
pub struct TestServer {
    pub endpoints: Vec<Endpoint>,
    handle: Handle,
    thread: Option<JoinHandle<io::Result<Report>>>,
}

impl TestServer {
    /// The first TCP address.
    pub fn addr(&self) -> SocketAddr {
        self.first(|e| matches!(e, Endpoint::Tcp(_)))
    }

    /// The first UDP address.
    pub fn udp(&self) -> SocketAddr {
        self.first(|e| matches!(e, Endpoint::Udp(_)))
    }

    fn first(&self, kind: impl Fn(&Endpoint) -> bool) -> SocketAddr {
        self.endpoints
            .iter()
            .find(|e| kind(e))
            .and_then(Endpoint::socket_addr)
            .expect("no endpoint of that kind")
    }

    pub fn handle(&self) -> Handle {
        self.handle.clone()
    }

    /// Graceful shutdown; returns the server's report.
    pub fn shutdown(mut self) -> Report {
        self.handle.shutdown();
        self.join()
    }

    fn join(&mut self) -> Report {
        let thread = self.thread.take().expect("joined twice");
        thread
            .join()
            .expect("server thread panicked")
            .expect("server failed")
    }
}

impl Drop for TestServer {
    fn drop(&mut self) {
        if self.thread.is_some() {
            self.handle.stop();
            if !thread::panicking() {
                self.join();
            }
        }
    }
}

/// Starts a server on its own thread. `setup` builds it and binds its
/// services (through [`local`] or on [`LOOPBACK`]), returning where.
pub fn start<F>(setup: F) -> TestServer
where
    F: FnOnce() -> (Server, Vec<Endpoint>) + Send + 'static,
{
    spawn_server("server".into(), move |ready| {
        let (mut server, addrs) = setup();
        ready.send((server.handle(), addrs)).expect("test gone");
        server.run()
    })
}

/// Runs `body` on a server thread; `body` says where it listens through
/// `ready`, then serves until stopped.
fn spawn_server<B>(name: String, body: B) -> TestServer
where
    B: FnOnce(mpsc::Sender<(Handle, Vec<Endpoint>)>) -> io::Result<Report> + Send + 'static,
{
    let (tx, rx) = mpsc::channel();
    let thread = thread::Builder::new()
        .name(name)
        .spawn(move || body(tx))
        .expect("spawn server thread");
    let (handle, endpoints) = rx
        .recv_timeout(Duration::from_secs(10))
        .expect("server did not start");
    TestServer {
        endpoints,
        handle,
        thread: Some(thread),
    }
}

/// One service on the mio engine with the default configuration.
pub fn start_one<S: Service + Send + 'static>(service: S) -> TestServer {
    start(move || {
        let mut server = Server::new().expect("server");
        let addr = local(&mut server, service);
        (server, vec![addr.into()])
    })
}

/// A connected client with timeouts on both directions.
pub fn connect(addr: SocketAddr) -> TcpStream {
    let stream = TcpStream::connect(addr).expect("connect");
    stream.set_read_timeout(Some(IO_TIMEOUT)).unwrap();
    stream.set_write_timeout(Some(IO_TIMEOUT)).unwrap();
    stream
}

/// Connects from `source` (an address on the loopback network).
pub fn connect_from(source: &str, to: SocketAddr) -> TcpStream {
    let socket = socket2::Socket::new(socket2::Domain::IPV4, socket2::Type::STREAM, None).unwrap();
    let from: SocketAddr = format!("{source}:0").parse().unwrap();
    socket.bind(&from.into()).unwrap();
    socket.connect(&to.into()).unwrap();
    let stream: TcpStream = socket.into();
    stream
        .set_read_timeout(Some(Duration::from_secs(10)))
        .unwrap();
    stream
        .set_write_timeout(Some(Duration::from_secs(10)))
        .unwrap();
    stream
}

/// Reads until EOF (bounded by the socket's read timeout).
pub fn read_to_end(stream: &mut TcpStream) -> Vec<u8> {
    let mut out = Vec::new();
    stream.read_to_end(&mut out).expect("read to EOF");
    out
}

/// Reads exactly `n` bytes.
pub fn read_exact(stream: &mut TcpStream, n: usize) -> Vec<u8> {
    let mut out = vec![0; n];
    stream.read_exact(&mut out).expect("read exact");
    out
}

/// Asserts nothing more arrives within `wait` (a read that times out).
pub fn assert_silent(stream: &mut TcpStream, wait: Duration) {
    stream.set_read_timeout(Some(wait)).unwrap();
    let mut byte = [0u8; 1];
    match stream.read(&mut byte) {
        Err(e)
            if matches!(
                e.kind(),
                io::ErrorKind::WouldBlock | io::ErrorKind::TimedOut
            ) => {}
        other => panic!("expected silence, got {other:?} {byte:?}"),
    }
    stream.set_read_timeout(Some(IO_TIMEOUT)).unwrap();
}

/// Echoes `data` through `stream` in `chunk`-sized steps, checking every
/// byte, so client and server never both wait to write.
pub fn echo_in_steps(stream: &mut TcpStream, data: &[u8], chunk: usize) {
    let mut back = vec![0; chunk];
    for piece in data.chunks(chunk) {
        stream.write_all(piece).expect("write");
        stream
            .read_exact(&mut back[..piece.len()])
            .expect("read echo");
        assert!(back[..piece.len()] == *piece, "echo differs");
    }
}

/// Deterministic pseudo-random bytes (xorshift), so failures reproduce.
pub fn pattern(len: usize, seed: u64) -> Vec<u8> {
    let mut x = seed | 1;
    (0..len)
        .map(|_| {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            x as u8
        })
        .collect()
}

/// Calls `f` until it returns true or `limit` passes; returns whether it did.
pub fn wait_until(limit: Duration, mut f: impl FnMut() -> bool) -> bool {
    let end = Instant::now() + limit;
    while Instant::now() < end {
        if f() {
            return true;
        }
        thread::sleep(Duration::from_millis(5));
    }
    f()
}

/// A client for line protocols.
pub struct LineClient {
    pub stream: TcpStream,
    reader: std::io::BufReader<TcpStream>,
}

impl LineClient {
    pub fn connect(addr: SocketAddr) -> LineClient {
        LineClient::from_stream(connect(addr))
    }

    pub fn from_stream(stream: TcpStream) -> LineClient {
        stream.set_read_timeout(Some(IO_TIMEOUT)).unwrap();
        stream.set_write_timeout(Some(IO_TIMEOUT)).unwrap();
        let reader = std::io::BufReader::new(stream.try_clone().unwrap());
        LineClient { stream, reader }
    }

    pub fn send(&mut self, line: &str) {
        self.stream.write_all(line.as_bytes()).expect("send");
        self.stream.write_all(b"\n").expect("send");
    }

    /// The next line, with its "\r\n" (panics on EOF or timeout).
    pub fn line(&mut self) -> String {
        let mut line = String::new();
        let n = std::io::BufRead::read_line(&mut self.reader, &mut line).expect("read line");
        assert!(n > 0, "EOF while expecting a line");
        line
    }

    /// Asserts the next line is `expected` (given without "\r\n").
    pub fn expect(&mut self, expected: &str) {
        assert_eq!(self.line(), format!("{expected}\r\n"));
    }

    /// Asserts the next thing is EOF.
    pub fn expect_eof(&mut self) {
        let mut rest = String::new();
        std::io::BufRead::read_line(&mut self.reader, &mut rest).expect("read");
        assert_eq!(rest, "", "expected EOF");
    }
}

pub use muxserve::Engine;

/// Starts a built-in service on `engine`, on a fresh loopback TCP port.
pub fn start_builtin(
    engine: Engine,
    service: muxserve::services::Builtin,
    opts: muxserve::services::Options,
) -> TestServer {
    start_bindings(engine, vec![(service, LOOPBACK.to_string())], opts)
}

/// One built-in service on loopback, on `engine` with `config`.
pub fn start_builtin_with(
    engine: Engine,
    config: muxserve::Config,
    service: muxserve::services::Builtin,
) -> TestServer {
    start_host_with(engine, config, move |host| {
        vec![host
            .bind_builtin(service, LOOPBACK.parse().unwrap(), Default::default())
            .expect("bind")]
    })
}

/// Starts built-in services on `engine`, each on its endpoint (use
/// [`LOOPBACK`], `udp://127.0.0.1:0` or a path in a temporary directory).
pub fn start_bindings(
    engine: Engine,
    bindings: Vec<(muxserve::services::Builtin, String)>,
    opts: muxserve::services::Options,
) -> TestServer {
    start_host(engine, move |host| {
        bindings
            .into_iter()
            .map(|(service, at)| {
                host.bind_builtin(service, at.parse().expect("endpoint"), opts)
                    .expect("bind")
            })
            .collect()
    })
}

/// Starts a server of `engine` with the default configuration; `bind`
/// binds its services on any engine through the `Host` trait.
pub fn start_host<F>(engine: Engine, bind: F) -> TestServer
where
    F: FnOnce(&mut dyn HostBind) -> Vec<Endpoint> + Send + 'static,
{
    start_host_with(engine, muxserve::Config::default(), bind)
}

/// Like [`start_host`], with a configuration.
pub fn start_host_with<F>(engine: Engine, config: muxserve::Config, bind: F) -> TestServer
where
    F: FnOnce(&mut dyn HostBind) -> Vec<Endpoint> + Send + 'static,
{
    spawn_server(format!("{engine} server"), move |tx| {
        fn go<H: muxserve::Host + HostBind>(
            mut host: H,
            bind: impl FnOnce(&mut dyn HostBind) -> Vec<Endpoint>,
            tx: mpsc::Sender<(Handle, Vec<Endpoint>)>,
        ) -> io::Result<Report> {
            let endpoints = bind(&mut host);
            tx.send((host.handle(), endpoints)).expect("test gone");
            host.run()
        }
        match engine {
            Engine::Threads => go(
                muxserve::ThreadedServer::new(config, Default::default()).expect("server"),
                bind,
                tx,
            ),
            loop_engine => go(
                Server::with_engine(loop_engine, config).expect("server"),
                bind,
                tx,
            ),
        }
    })
}

/// Object-safe binding of the built-in services, so tests can bind on an
/// engine chosen at run time.
pub trait HostBind {
    fn bind_builtin(
        &mut self,
        service: muxserve::services::Builtin,
        at: Endpoint,
        opts: muxserve::services::Options,
    ) -> io::Result<Endpoint>;

    /// Binds authenticated echo on loopback and returns its counters too.
    fn bind_authenticated(
        &mut self,
        auth: muxserve::auth::Authenticated<muxserve::services::Echo>,
    ) -> (Endpoint, std::sync::Arc<muxserve::auth::AuthCounters>);

    /// Serves UDP on loopback with a datagram service that replies
    /// `reply(datagram)`.
    fn bind_dgram_fn(&mut self, reply: fn(&[u8]) -> Vec<u8>) -> Endpoint;

    /// Sets the admission hook (`Host::set_admission`).
    fn admit(&mut self, admit: Box<dyn Fn(&muxserve::PeerAddr) -> bool + Send + Sync>);
}

/// A datagram service made of a function (see [`HostBind::bind_dgram_fn`]).
struct DgramFn(fn(&[u8]) -> Vec<u8>);

impl muxserve::service::DatagramService for DgramFn {
    fn on_datagram(
        &mut self,
        cx: &mut muxserve::service::DatagramContext<'_>,
        _from: &muxserve::PeerAddr,
        data: &[u8],
    ) {
        cx.reply(&(self.0)(data));
    }
}

impl<H: muxserve::Host> HostBind for H {
    fn bind_builtin(
        &mut self,
        service: muxserve::services::Builtin,
        at: Endpoint,
        opts: muxserve::services::Options,
    ) -> io::Result<Endpoint> {
        service.bind(self, at, opts)
    }

    fn bind_authenticated(
        &mut self,
        auth: muxserve::auth::Authenticated<muxserve::services::Echo>,
    ) -> (Endpoint, std::sync::Arc<muxserve::auth::AuthCounters>) {
        let counters = auth.counters();
        let limits = self.config().limits.clone();
        let bound = self
            .bind_stream(LOOPBACK.parse().unwrap(), auth, limits)
            .expect("bind");
        (bound, counters)
    }

    fn bind_dgram_fn(&mut self, reply: fn(&[u8]) -> Vec<u8>) -> Endpoint {
        self.bind_dgram("udp://127.0.0.1:0".parse().unwrap(), DgramFn(reply))
            .expect("bind")
    }

    fn admit(&mut self, admit: Box<dyn Fn(&muxserve::PeerAddr) -> bool + Send + Sync>) {
        self.set_admission(admit)
    }
}

/// A UDP client on loopback with a read timeout.
pub fn udp_client() -> std::net::UdpSocket {
    let socket = std::net::UdpSocket::bind("127.0.0.1:0").expect("bind UDP client");
    socket.set_read_timeout(Some(IO_TIMEOUT)).unwrap();
    socket
}

/// Where test servers listen: loopback, a port the kernel picks.
pub const LOOPBACK: &str = "127.0.0.1:0";

/// Steps `server` from the test thread until `done` (bounded by `limit`).
pub fn step_until(server: &mut Server, limit: Duration, mut done: impl FnMut(&Server) -> bool) {
    let end = Instant::now() + limit;
    while !done(server) {
        assert!(Instant::now() < end, "timed out");
        server.run_once(Some(Duration::from_millis(5))).unwrap();
    }
}

/// Runs `client` on its own thread while the test thread steps `server`,
/// and returns what the client returned.
pub fn with_clients<T: Send + 'static>(
    server: &mut Server,
    client: impl FnOnce() -> T + Send + 'static,
) -> T {
    let handle = thread::spawn(client);
    let end = Instant::now() + Duration::from_secs(60);
    while !handle.is_finished() {
        assert!(Instant::now() < end, "clients did not finish");
        server.run_once(Some(Duration::from_millis(5))).unwrap();
    }
    handle.join().expect("client thread failed")
}

/// Reads to EOF; a reset also counts as the end.
pub fn read_to_end_or_reset(c: &mut TcpStream) -> Vec<u8> {
    let mut out = Vec::new();
    match c.read_to_end(&mut out) {
        Ok(_) => out,
        Err(e) if e.kind() == io::ErrorKind::ConnectionReset => out,
        Err(e) => panic!("read: {e}"),
    }
}

/// A TCP client with a 4 KiB receive buffer, so the kernel absorbs little
/// of what is sent to it: the shape of a peer that stops reading.
pub fn small_window_client(addr: SocketAddr) -> TcpStream {
    let socket = socket2::Socket::new(socket2::Domain::IPV4, socket2::Type::STREAM, None).unwrap();
    socket.set_recv_buffer_size(4096).unwrap();
    socket.connect(&addr.into()).unwrap();
    socket.into()
}

/// Defines one test per engine for each scenario `fn(Engine)`:
/// `on_engines!([mio => Mio, poll => Poll] (scenario_a, scenario_b));`
#[macro_export]
macro_rules! on_engines {
    ([$($module:ident => $engine:ident),* $(,)?] $scenarios:tt) => {
        $( $crate::engine_module!($module, $engine, $scenarios); )*
    };
}

/// One module of tests for one engine (used by `on_engines!`).
#[macro_export]
macro_rules! engine_module {
    ($module:ident, $engine:ident, ($($scenario:ident),* $(,)?)) => {
        mod $module {
            $(
                #[test]
                fn $scenario() {
                    super::$scenario(muxserve::Engine::$engine)
                }
            )*
        }
    };
}

/// Every scenario on all four engines.
#[macro_export]
macro_rules! on_every_engine {
    ($($scenario:ident),* $(,)?) => {
        $crate::on_engines!([mio => Mio, poll => Poll, select => Select, threads => Threads] ($($scenario),*));
    };
}

/// Echoes, but panics on input that starts with "boom".
pub struct Fragile;

impl Service for Fragile {
    type Session = ();
    fn on_connect(&mut self, _cx: &mut muxserve::Context<'_>) {}
    fn on_data(
        &mut self,
        cx: &mut muxserve::Context<'_>,
        _: &mut (),
        input: &mut muxserve::Input<'_>,
    ) {
        let data = input.take();
        assert!(!data.starts_with(b"boom"), "boom requested");
        cx.write(data);
    }
}

/// A barrier that gives up: if a party dies before arriving, the others
/// fail after `GATE_TIMEOUT` instead of waiting for ever.
pub struct Gate {
    arrived: std::sync::Mutex<usize>,
    all_in: std::sync::Condvar,
    parties: usize,
}

/// How long a `Gate` waits for everyone.
pub const GATE_TIMEOUT: Duration = Duration::from_secs(30);

impl Gate {
    pub fn new(parties: usize) -> Gate {
        Gate {
            arrived: std::sync::Mutex::new(0),
            all_in: std::sync::Condvar::new(),
            parties,
        }
    }

    /// Arrives and waits for the others (panics after `GATE_TIMEOUT`).
    pub fn wait(&self) {
        let mut arrived = self.arrived.lock().unwrap();
        *arrived += 1;
        self.all_in.notify_all();
        let (arrived, timeout) = self
            .all_in
            .wait_timeout_while(arrived, GATE_TIMEOUT, |n| *n < self.parties)
            .unwrap();
        assert!(
            !timeout.timed_out(),
            "only {} of {} arrived",
            *arrived,
            self.parties
        );
    }
}

/// Turns `server` takes in `span` (its `Stats::turns`), stepping it for
/// that long: how often a loop with nothing to do wakes up.
pub fn turns_in(server: &mut Server, span: Duration) -> u64 {
    let before = server.stats().turns;
    let start = Instant::now();
    while let Some(left) = span.checked_sub(start.elapsed()) {
        server.run_once(Some(left)).unwrap();
    }
    server.stats().turns - before
}

/// Joins a chat room as `nick`, reading the greeting and the welcome line.
pub fn join(addr: SocketAddr, nick: &str) -> LineClient {
    let mut c = LineClient::connect(addr);
    c.expect("* welcome to muxserve chat");
    c.expect("nickname?");
    c.send(nick);
    let welcome = c.line();
    assert!(
        welcome.starts_with(&format!("* welcome, {nick};")),
        "{welcome:?}"
    );
    c
}

/// Joins a chat member, "hog", that will never read, with a small receive
/// window.
pub fn join_hog(addr: SocketAddr) -> LineClient {
    let mut hog = LineClient::from_stream(small_window_client(addr));
    hog.expect("* welcome to muxserve chat");
    hog.expect("nickname?");
    hog.send("hog");
    hog.line();
    hog
}
