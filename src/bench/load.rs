//! A closed-loop echo load generator: many connections from one thread on
//! mio, each keeping `depth` requests in flight, every echoed byte checked.

use std::collections::VecDeque;
use std::io::{self, Read, Write};
use std::net::SocketAddr;
use std::time::{Duration, Instant};

use hdrhistogram::Histogram;
use mio::net::TcpStream;
use mio::{Events, Interest, Poll, Token};

/// What to run.
#[derive(Clone, Debug)]
pub struct LoadSpec {
    /// Echo server to drive.
    pub target: SocketAddr,
    /// Connections.
    pub conns: usize,
    /// Bytes per request.
    pub size: usize,
    /// Requests in flight per connection.
    pub depth: usize,
    /// Time to run before measuring.
    pub warmup: Duration,
    /// Time measured.
    pub duration: Duration,
}

/// What a run measured.
#[derive(Clone, Debug)]
pub struct LoadResult {
    /// Requests completed in the measured window.
    pub requests: u64,
    /// Length of the measured window.
    pub elapsed: Duration,
    /// Round-trip latency of each request, in nanoseconds.
    pub latency: Histogram<u64>,
}

impl LoadResult {
    /// Requests per second.
    pub fn rate(&self) -> f64 {
        self.requests as f64 / self.elapsed.as_secs_f64()
    }
}

struct Client {
    stream: TcpStream,
    /// When each request in flight was sent, oldest first.
    sent: VecDeque<Instant>,
    /// Bytes of the current reply received so far.
    got: usize,
    /// Bytes of queued requests not yet written.
    unsent: usize,
    writing: bool,
}

/// Runs the load, calling `tick` with the fraction done now and then.
pub fn run(spec: &LoadSpec, mut tick: impl FnMut(f64)) -> io::Result<LoadResult> {
    let mut poll = Poll::new()?;
    let mut events = Events::with_capacity(1024);
    let payload = payload(spec.size);
    let wire = payload.repeat(spec.depth.max(1));
    let mut clients = Vec::with_capacity(spec.conns);
    for i in 0..spec.conns {
        let std = std::net::TcpStream::connect(spec.target)?;
        std.set_nodelay(true)?;
        std.set_nonblocking(true)?;
        let mut stream = TcpStream::from_std(std);
        poll.registry()
            .register(&mut stream, Token(i), Interest::READABLE)?;
        clients.push(Client {
            stream,
            sent: VecDeque::new(),
            got: 0,
            unsent: 0,
            writing: false,
        });
    }
    let start = Instant::now();
    for (i, c) in clients.iter_mut().enumerate() {
        for _ in 0..spec.depth.max(1) {
            c.sent.push_back(start);
        }
        c.unsent = wire.len();
        flush(c, &wire, &poll, i)?;
    }

    let measure_from = start + spec.warmup;
    let end = measure_from + spec.duration;
    let mut latency = Histogram::<u64>::new_with_bounds(1_000, 60_000_000_000, 3)
        .map_err(|e| io::Error::other(e.to_string()))?;
    let mut requests = 0u64;
    let mut buf = vec![0u8; 64 * 1024];
    let mut last_tick = start;
    loop {
        let now = Instant::now();
        if now >= end {
            break;
        }
        if now.duration_since(last_tick) > Duration::from_millis(100) {
            last_tick = now;
            tick(now.duration_since(start).as_secs_f64() / (end - start).as_secs_f64());
        }
        match poll.poll(&mut events, Some(end - now)) {
            Ok(()) => {}
            Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
            Err(e) => return Err(e),
        }
        for event in events.iter() {
            let i = event.token().0;
            let c = &mut clients[i];
            if event.is_writable() {
                flush(c, &wire, &poll, i)?;
            }
            if !event.is_readable() {
                continue;
            }
            loop {
                let n = match c.stream.read(&mut buf) {
                    Ok(0) => return Err(io::Error::other("server closed a connection")),
                    Ok(n) => n,
                    Err(e) if e.kind() == io::ErrorKind::WouldBlock => break,
                    Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                    Err(e) => return Err(e),
                };
                let now = Instant::now();
                let mut data = &buf[..n];
                while !data.is_empty() {
                    let take = (spec.size - c.got).min(data.len());
                    if data[..take] != payload[c.got..c.got + take] {
                        return Err(io::Error::other("echoed bytes differ"));
                    }
                    c.got += take;
                    data = &data[take..];
                    if c.got == spec.size {
                        c.got = 0;
                        let sent = c.sent.pop_front().expect("reply without request");
                        if sent >= measure_from && now < end {
                            requests += 1;
                            latency.saturating_record(now.duration_since(sent).as_nanos() as u64);
                        }
                        c.sent.push_back(now);
                        c.unsent += spec.size;
                    }
                }
                if n < buf.len() {
                    break;
                }
            }
            flush(c, &wire, &poll, i)?;
        }
    }
    Ok(LoadResult {
        requests,
        elapsed: end - measure_from,
        latency,
    })
}

/// Writes queued requests; asks for WRITABLE only while some remain.
fn flush(c: &mut Client, wire: &[u8], poll: &Poll, i: usize) -> io::Result<()> {
    while c.unsent > 0 {
        // Requests are identical, so the bytes to send are any suffix of
        // `wire` of the right length (unsent never exceeds depth * size).
        let from = wire.len() - c.unsent;
        match c.stream.write(&wire[from..]) {
            Ok(n) => c.unsent -= n,
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => break,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
            Err(e) => return Err(e),
        }
    }
    let want = c.unsent > 0;
    if want != c.writing {
        c.writing = want;
        let interest = if want {
            Interest::READABLE | Interest::WRITABLE
        } else {
            Interest::READABLE
        };
        poll.registry()
            .reregister(&mut c.stream, Token(i), interest)?;
    }
    Ok(())
}

/// A request body whose bytes differ from their neighbours, so a reply
/// that is shifted or reordered is caught.
fn payload(size: usize) -> Vec<u8> {
    (0..size).map(|i| (i % 251) as u8).collect()
}

/// Opens `count` connections to `target` and echoes `size` bytes once on
/// each, then keeps them open (idle) until the returned vector is dropped.
pub fn idle_connections(
    target: SocketAddr,
    count: usize,
    size: usize,
) -> io::Result<Vec<std::net::TcpStream>> {
    let payload = payload(size);
    let mut back = vec![0; size];
    let mut conns = Vec::with_capacity(count);
    for _ in 0..count {
        let mut s = std::net::TcpStream::connect(target)?;
        s.set_read_timeout(Some(Duration::from_secs(10)))?;
        if size > 0 {
            s.write_all(&payload)?;
            s.read_exact(&mut back)?;
            if back != payload {
                return Err(io::Error::other("echoed bytes differ"));
            }
        }
        conns.push(s);
    }
    Ok(conns)
}

/// Opens, uses and closes connections one after another for `duration`:
/// connect, echo 64 bytes, close with a reset (SO_LINGER 0, as load
/// generators do to spare the client TIME_WAIT). Returns how many.
pub fn churn(target: SocketAddr, duration: Duration) -> io::Result<u64> {
    let payload = payload(64);
    let mut back = [0u8; 64];
    let end = Instant::now() + duration;
    let mut done = 0;
    while Instant::now() < end {
        let mut s = std::net::TcpStream::connect(target)?;
        s.set_nodelay(true)?;
        s.set_read_timeout(Some(Duration::from_secs(10)))?;
        s.write_all(&payload)?;
        s.read_exact(&mut back)?;
        if back[..] != payload[..] {
            return Err(io::Error::other("echoed bytes differ"));
        }
        socket2::SockRef::from(&s).set_linger(Some(Duration::ZERO))?;
        done += 1;
    }
    Ok(done)
}

/// What a chat fan-out run measured.
#[derive(Clone, Debug)]
pub struct FanOut {
    /// Messages received by members, all told.
    pub deliveries: u64,
    /// From the first message sent to the last one received.
    pub elapsed: Duration,
    /// Deliveries expected but not seen (members evicted or too slow).
    pub missing: u64,
}

/// Joins `members` members to a chat server, has the first send
/// `messages` lines of 64 bytes, and counts what the others receive.
pub fn chat_fanout(target: SocketAddr, members: usize, messages: usize) -> io::Result<FanOut> {
    use std::io::BufRead;
    let mut poll = Poll::new()?;
    let mut events = Events::with_capacity(1024);
    let mut sender = None;
    let mut readers = Vec::with_capacity(members);
    for i in 0..members {
        let s = std::net::TcpStream::connect(target)?;
        s.set_read_timeout(Some(Duration::from_secs(30)))?;
        let mut r = std::io::BufReader::new(s.try_clone()?);
        (&s).write_all(format!("m{i}\n").as_bytes())?;
        let welcome = format!("* welcome, m{i};");
        let mut line = String::new();
        while !line.starts_with(&welcome) {
            line.clear();
            if r.read_line(&mut line)? == 0 {
                return Err(io::Error::other("the chat server closed during join"));
            }
        }
        if i == 0 {
            sender = Some(s);
            continue;
        }
        // Bytes the BufReader read ahead are notices; dropping them is fine.
        s.set_nonblocking(true)?;
        let mut stream = TcpStream::from_std(s);
        poll.registry()
            .register(&mut stream, Token(readers.len()), Interest::READABLE)?;
        readers.push((stream, Vec::new(), 0usize));
    }
    let mut sender = sender.ok_or_else(|| io::Error::other("no members"))?;
    let text = "x".repeat(64 - "<m0> \r\n".len());
    let feeder = std::thread::spawn(move || {
        for _ in 0..messages {
            if sender.write_all(format!("{text}\n").as_bytes()).is_err() {
                break;
            }
        }
        sender
    });
    let start = Instant::now();
    let deadline = start + Duration::from_secs(120);
    let want = messages * readers.len();
    let mut got = 0;
    let mut last = start;
    let mut buf = vec![0u8; 64 * 1024];
    while got < want && Instant::now() < deadline {
        match poll.poll(&mut events, Some(Duration::from_millis(200))) {
            Ok(()) => {}
            Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
            Err(e) => return Err(e),
        }
        for event in events.iter() {
            let (stream, carry, count) = &mut readers[event.token().0];
            loop {
                let n = match stream.read(&mut buf) {
                    Ok(0) => break,
                    Ok(n) => n,
                    Err(e) if e.kind() == io::ErrorKind::WouldBlock => break,
                    Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                    Err(_) => break,
                };
                carry.extend_from_slice(&buf[..n]);
                let mut at = 0;
                while let Some(nl) = carry[at..].iter().position(|&b| b == b'\n') {
                    if carry[at..].starts_with(b"<m0> ") {
                        *count += 1;
                        got += 1;
                        last = Instant::now();
                    }
                    at += nl + 1;
                }
                carry.drain(..at);
            }
        }
    }
    let _sender = feeder
        .join()
        .map_err(|_| io::Error::other("sender panicked"))?;
    Ok(FanOut {
        deliveries: got as u64,
        elapsed: last.duration_since(start),
        missing: (want - got) as u64,
    })
}
