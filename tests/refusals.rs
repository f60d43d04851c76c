//! Clients the server turns away, and connections it has closed: a refused
//! client is told why and gets a FIN even if it talked first; the
//! per-source cap; every descriptor the engine holds counts against the
//! cap; and a peer that floods a connection we closed is cut off within
//! the linger budget.

mod common;

use std::io::{self, Read, Write};
use std::net::TcpStream;
use std::sync::Arc;
use std::time::Duration;

use common::*;
use muxserve::services::{Builtin, Options};
use muxserve::{Config, Engine, Server};

const FULL: &[u8] = b"error: server full, try again later\r\n";
const PER_SOURCE: &[u8] = b"error: too many connections from your address\r\n";

/// Less than the default `linger_bytes`, so a refused client may send it
/// all and still be read out.
const TALK: usize = 128 * 1024;

/// A client that is served: it echoes one message.
fn served(stream: &mut TcpStream) {
    echo_in_steps(stream, b"hello\n", 6);
}

/// A client that sends [`TALK`] bytes at once, without waiting to be
/// accepted, then its FIN, and must then read exactly `notice` and a
/// clean EOF: no reset destroyed the notice, no write failed.
fn talks_first_then_reads(mut c: TcpStream, notice: &[u8]) {
    c.write_all(&pattern(TALK, 7))
        .expect("the refused client's input is read, not reset");
    c.shutdown(std::net::Shutdown::Write).unwrap();
    let mut got = Vec::new();
    let end = c.read_to_end(&mut got);
    assert!(end.is_ok(), "{end:?} after {got:?}");
    assert_eq!(got, notice, "{}", String::from_utf8_lossy(&got));
}

fn a_client_refused_at_the_cap_that_talked_first_reads_the_notice(engine: Engine) {
    let mut config = Config::default();
    config.max_connections = 1;
    let server = start_builtin_with(engine, config, Builtin::Echo);
    let mut first = connect(server.addr());
    served(&mut first);
    for _ in 0..3 {
        talks_first_then_reads(connect(server.addr()), FULL);
    }
    // The one served meanwhile is unharmed.
    served(&mut first);
    drop(first);
    let report = server.shutdown();
    assert_eq!(report.stats.rejected_limit, 3, "{}", report.stats);
    assert!(
        report.stats.linger_discarded >= 3 * TALK as u64,
        "{}",
        report.stats
    );
}

fn a_client_refused_by_the_admission_hook_gets_a_fin_not_a_reset(engine: Engine) {
    // The hook waits until the client's input is in the server's receive
    // queue, so the close is decided with unread input there: the case
    // that used to be a reset.
    let sent = Arc::new(Gate::new(2));
    let in_hook = Arc::clone(&sent);
    let server = start_host_with(engine, Config::default(), move |host| {
        // Only 127.0.0.1 may connect.
        host.admit(Box::new(move |peer| match peer {
            muxserve::PeerAddr::Inet(a) if a.ip() == std::net::Ipv4Addr::LOCALHOST => true,
            _ => {
                in_hook.wait();
                false
            }
        }));
        vec![host
            .bind_builtin(Builtin::Echo, LOOPBACK.parse().unwrap(), Options::default())
            .unwrap()]
    });
    let mut c = connect_from("127.0.0.2", server.addr());
    // Small enough for the server's receive buffer before it accepts.
    c.write_all(&pattern(16 * 1024, 3)).unwrap();
    sent.wait();
    c.shutdown(std::net::Shutdown::Write).unwrap();
    let mut got = Vec::new();
    let end = c.read_to_end(&mut got);
    assert!(end.is_ok() && got.is_empty(), "{end:?} after {got:?}");
    served(&mut connect_from("127.0.0.1", server.addr()));
    let report = server.shutdown();
    assert_eq!(report.stats.rejected_admission, 1, "{}", report.stats);
}

fn one_address_holds_at_most_max_per_source_and_others_still_get_in(engine: Engine) {
    let mut config = Config::default();
    config.max_per_source = 2;
    let server = start_builtin_with(engine, config, Builtin::Echo);
    let addr = server.addr();
    let mut mine: Vec<_> = (0..2).map(|_| connect_from("127.0.0.3", addr)).collect();
    for c in &mut mine {
        served(c);
    }
    talks_first_then_reads(connect_from("127.0.0.3", addr), PER_SOURCE);
    // Another address is not affected.
    let mut other = connect_from("127.0.0.4", addr);
    served(&mut other);
    // Once one of the first two has gone, that address gets a slot back.
    let mut gone = mine.pop().unwrap();
    gone.shutdown(std::net::Shutdown::Write).unwrap();
    assert_eq!(read_to_end(&mut gone), b"");
    let mut again = None;
    assert!(
        wait_until(Duration::from_secs(10), || {
            let mut c = connect_from("127.0.0.3", addr);
            c.write_all(b"again\n").unwrap();
            let mut line = [0; 6];
            match c.read_exact(&mut line) {
                Ok(()) if &line == b"again\n" => {
                    again = Some(c);
                    true
                }
                _ => false,
            }
        }),
        "the address never got its slot back"
    );
    drop((mine, other, again));
    let report = server.shutdown();
    assert!(report.stats.rejected_per_source >= 1, "{}", report.stats);
}

/// Connections the server closed but that have not closed their side
/// yet still hold a descriptor each: they count against the cap, so the
/// next client is refused politely rather than served past the limit
/// (on the select engine, past FD_SETSIZE: a silent EOF).
fn lingering_connections_count_against_the_cap(engine: Engine) {
    let mut config = Config::default();
    config.max_connections = 4;
    config.linger = Duration::from_secs(30);
    let server = start_builtin_with(engine, config, Builtin::Daytime);
    // Each gets its line and the server's FIN, but keeps its side open,
    // so the server lingers on it.
    let lingering: Vec<_> = (0..4)
        .map(|_| {
            let mut c = connect(server.addr());
            let line = read_to_end(&mut c);
            assert!(line.ends_with(b"\r\n"), "{line:?}");
            c
        })
        .collect();
    let mut next = connect(server.addr());
    assert_eq!(read_to_end(&mut next), FULL);
    drop(lingering);
    let report = server.shutdown();
    assert_eq!(report.stats.rejected_limit, 1, "{}", report.stats);
}

/// A peer that keeps sending after the server closed its connection is
/// read for at most `linger_bytes` (plus one read), then reset.
fn a_peer_flooding_a_closed_connection_is_reset_within_the_linger_budget(engine: Engine) {
    const BUDGET: usize = 64 * 1024;
    let mut config = Config::default();
    config.linger_bytes = BUDGET;
    config.linger = Duration::from_secs(30);
    let server = start_builtin_with(engine, config, Builtin::Daytime);
    let mut c = connect(server.addr());
    let mut line = [0u8; 64];
    let n = c.read(&mut line).unwrap();
    assert!(line[..n].ends_with(b"\r\n"));
    // Flood: at most 64 MiB, in 64 KiB writes, until the reset.
    let chunk = vec![b'x'; 64 * 1024];
    let mut sent = 0usize;
    let error = loop {
        assert!(
            sent < 64 << 20,
            "sent {sent} B to a closed connection, no reset"
        );
        match c.write(&chunk) {
            Ok(n) => sent += n,
            Err(e) => break e,
        }
    };
    assert!(
        matches!(
            error.kind(),
            io::ErrorKind::ConnectionReset | io::ErrorKind::BrokenPipe
        ),
        "{error}"
    );
    let report = server.shutdown();
    assert_eq!(report.stats.linger_resets, 1, "{}", report.stats);
    let most_in_one_read = 64 * 1024;
    assert!(
        report.stats.linger_discarded <= (BUDGET + most_in_one_read) as u64,
        "{}",
        report.stats
    );
}

on_every_engine!(
    a_client_refused_at_the_cap_that_talked_first_reads_the_notice,
    a_client_refused_by_the_admission_hook_gets_a_fin_not_a_reset,
    one_address_holds_at_most_max_per_source_and_others_still_get_in,
    lingering_connections_count_against_the_cap,
    a_peer_flooding_a_closed_connection_is_reset_within_the_linger_budget,
);

/// On the loop engines a lingering connection is read at most one
/// `READ_CHUNK_ALONE` a turn, however fast its peer sends: a flood costs
/// the others one small read per turn.
fn a_lingering_connection_is_read_one_small_chunk_a_turn(engine: Engine) {
    let mut config = Config::default();
    config.linger = Duration::from_secs(30);
    config.linger_bytes = 16 << 20;
    let mut server = Server::with_engine(engine, config).unwrap();
    let addr = server
        .bind(LOOPBACK, muxserve::services::Daytime::default())
        .unwrap()
        .socket_addr()
        .unwrap();
    let flooder = std::thread::spawn(move || {
        let mut c = connect(addr);
        let mut line = [0u8; 64];
        let _ = c.read(&mut line);
        let chunk = vec![b'x'; 64 * 1024];
        // Until the server resets it, or 256 MiB.
        for _ in 0..4096 {
            if c.write_all(&chunk).is_err() {
                break;
            }
        }
    });
    let mut last = 0;
    let mut turns_reading = 0;
    while server.stats().linger_resets == 0 {
        assert!(turns_reading < 100_000, "never reset");
        server.run_once(Some(Duration::from_millis(100))).unwrap();
        let now = server.stats().linger_discarded;
        assert!(
            now - last <= muxserve::config::READ_CHUNK_ALONE as u64,
            "one turn read {} B of a lingering connection",
            now - last
        );
        if now > last {
            turns_reading += 1;
        }
        last = now;
    }
    flooder.join().unwrap();
    assert!(turns_reading >= (16 << 20) / muxserve::config::READ_CHUNK_ALONE);
}

on_engines!([mio_turns => Mio, poll_turns => Poll, select_turns => Select] (
    a_lingering_connection_is_read_one_small_chunk_a_turn,
));

/// The select engine cannot watch a descriptor numbered FD_SETSIZE or
/// more. Lingering connections hold descriptors too, so a server full of
/// them must still refuse the next client with the notice, never accept
/// it into a silent EOF. (The clients live in this process, so descriptor
/// numbers run out at about half as many connections.)
#[test]
fn on_select_past_fd_setsize_every_client_gets_its_line_or_the_notice() {
    let mut config = Config::default();
    config.linger = Duration::from_secs(60);
    let server = start_builtin_with(Engine::Select, config, Builtin::Daytime);
    let mut open = Vec::new();
    let mut refused = 0;
    for i in 0..1100 {
        let mut c = connect(server.addr());
        let got = read_to_end(&mut c);
        if got == FULL {
            refused += 1;
        } else {
            assert!(got.ends_with(b"\r\n"), "client {i} got {got:?}");
        }
        open.push(c);
    }
    assert!(refused > 0, "1100 served on select");
    drop(open);
    let report = server.shutdown();
    assert_eq!(report.stats.rejected_limit, refused, "{}", report.stats);
}
