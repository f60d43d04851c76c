//! The service scenarios every engine must pass. Each scenario is written
//! once against an address; the macro at the bottom runs all of them on
//! every engine, so a new engine gets every test by adding one line.

mod common;

use std::io::Write;
use std::net::Shutdown;
use std::thread;
use std::time::{SystemTime, UNIX_EPOCH};

use common::*;
use muxserve::services::{Builtin, Options, Zone};

const UTC: Options = Options { zone: Zone::Utc };

fn echo_bytes(engine: Engine) {
    let server = start_builtin(engine, Builtin::Echo, UTC);
    let mut c = connect(server.addr());
    // Odd chunk sizes, so reads and writes never line up.
    echo_in_steps(&mut c, &pattern(300 * 1024, 11), 1777);
    // Many small messages in one write come back in order.
    let burst: Vec<u8> = (0..1000u32).flat_map(|i| i.to_be_bytes()).collect();
    c.write_all(&burst).unwrap();
    assert_eq!(read_exact(&mut c, burst.len()), burst);
}

fn echo_half_close(engine: Engine) {
    let server = start_builtin(engine, Builtin::Echo, UTC);
    let mut c = connect(server.addr());
    let data = pattern(1024 * 1024, 12);
    let mut w = c.try_clone().unwrap();
    let sent = data.clone();
    let feeder = thread::spawn(move || {
        w.write_all(&sent).unwrap();
        w.shutdown(Shutdown::Write).unwrap();
    });
    let back = read_to_end(&mut c);
    feeder.join().unwrap();
    assert_eq!(back.len(), data.len());
    assert!(back == data, "echoed bytes differ");
}

/// Checks `text` is a ctime string within 2 s of now (UTC).
fn assert_ctime_now(text: &str) {
    let t = chrono::NaiveDateTime::parse_from_str(text, "%a %b %e %H:%M:%S %Y")
        .unwrap_or_else(|e| panic!("{text:?} is not ctime: {e}"));
    let now = chrono::Utc::now().naive_utc();
    let off = (now - t).num_seconds().abs();
    assert!(off <= 2, "{text:?} is {off} s off");
}

fn daytime_line_then_eof(engine: Engine) {
    let server = start_builtin(engine, Builtin::Daytime, UTC);
    let mut c = connect(server.addr());
    let all = String::from_utf8(read_to_end(&mut c)).unwrap();
    let line = all.strip_suffix("\r\n").expect("CRLF at the end");
    assert!(!line.contains('\n'), "one line: {all:?}");
    assert_ctime_now(line);
}

fn time_four_bytes_then_eof(engine: Engine) {
    let server = start_builtin(engine, Builtin::Time, UTC);
    let mut c = connect(server.addr());
    let got = read_to_end(&mut c);
    assert_eq!(got.len(), 4, "{got:?}");
    let value = u32::from_be_bytes(got.try_into().unwrap()) as i64;
    let unix = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap()
        .as_secs();
    let expected = ((unix + 2_208_988_800) % (1 << 32)) as i64;
    assert!((value - expected).abs() <= 2, "{value} vs {expected}");
}

fn stamp_lines_in_order(engine: Engine) {
    let server = start_builtin(engine, Builtin::Stamp, UTC);
    let mut c = LineClient::connect(server.addr());
    c.send("hello");
    let check = |line: String, msg: &str| {
        let rest = line.strip_prefix('[').expect("starts with [");
        let (stamp, tail) = rest.split_once("] ").expect("has ] ");
        assert_ctime_now(stamp);
        assert_eq!(tail, format!("{msg}\r\n"));
    };
    check(c.line(), "hello");
    // Pipelined lines, with both line ends, in one write.
    c.stream.write_all(b"one\r\ntwo\nthree\r\n").unwrap();
    for msg in ["one", "two", "three"] {
        check(c.line(), msg);
    }
    // A line arriving a byte at a time.
    for b in b"slow\n" {
        c.stream.write_all(&[*b]).unwrap();
    }
    check(c.line(), "slow");
}

fn chat_three_members(engine: Engine) {
    let server = start_builtin(engine, Builtin::Chat, UTC);
    let join = |nick: &str| {
        let mut c = LineClient::connect(server.addr());
        c.expect("* welcome to muxserve chat");
        c.expect("nickname?");
        c.send(nick);
        c
    };
    let mut alice = join("alice");
    alice.expect("* welcome, alice; you are the first one here. /help lists commands");
    let mut bob = join("bob");
    bob.expect("* welcome, bob; 1 other here: alice. /help lists commands");
    alice.expect("* bob joined");
    let mut carol = join("carol");
    carol.expect("* welcome, carol; 2 others here: alice, bob. /help lists commands");
    alice.expect("* carol joined");
    bob.expect("* carol joined");

    alice.send("hi all");
    bob.expect("<alice> hi all");
    carol.expect("<alice> hi all");
    carol.send("/msg bob psst");
    bob.expect("*carol* psst");
    carol.send("/quit bye now");
    carol.expect("* bye");
    carol.expect_eof();
    alice.expect("* carol left (bye now)");
    bob.expect("* carol left (bye now)");
    // Alice never saw the private message or her own line.
    alice.send("/who");
    alice.expect("* 2 members: alice, bob");
}

fn udp_echo_time_daytime(engine: Engine) {
    let server = start_bindings(
        engine,
        vec![
            (Builtin::Echo, "udp://127.0.0.1:0".into()),
            (Builtin::Time, "udp://127.0.0.1:0".into()),
            (Builtin::Daytime, "udp://127.0.0.1:0".into()),
        ],
        UTC,
    );
    let [echo, time, daytime] = [0, 1, 2].map(|i| server.endpoints[i].socket_addr().unwrap());
    let client = udp_client();
    let mut buf = vec![0; 70_000];
    for size in [0, 1, 1472, 65_507] {
        let data = pattern(size, size as u64 + 3);
        client.send_to(&data, echo).unwrap();
        let n = client.recv(&mut buf).unwrap();
        assert!(buf[..n] == data[..], "{size}-byte datagram");
    }
    client.send_to(b"", time).unwrap();
    assert_eq!(client.recv(&mut buf).unwrap(), 4);
    client.send_to(b"?", daytime).unwrap();
    let n = client.recv(&mut buf).unwrap();
    let line = std::str::from_utf8(&buf[..n]).unwrap();
    assert_ctime_now(line.strip_suffix("\r\n").expect("CRLF"));
}

on_every_engine!(
    echo_bytes,
    echo_half_close,
    daytime_line_then_eof,
    time_four_bytes_then_eof,
    stamp_lines_in_order,
    chat_three_members,
    udp_echo_time_daytime,
);
