//! Timers through a real server: one-shot, periodic, cancelled, orphaned,
//! and the idle timeout.

mod common;

use std::cell::Cell;
use std::io::{Read, Write};
use std::rc::Rc;
use std::time::{Duration, Instant};

use common::*;
use muxserve::services::Echo;
use muxserve::{Config, Context, Input, Server, Service, TimerId};

/// Commands, one byte each: `o` one-shot in 50 ms, `p` every 20 ms (five
/// ticks, then it cancels itself), `c` arm-and-cancel, `s` a service timer.
struct Clock {
    fired: Rc<Cell<u32>>,
}

#[derive(Default)]
struct Ticks {
    periodic: Option<TimerId>,
    count: u32,
}

impl Service for Clock {
    type Session = Ticks;

    fn on_connect(&mut self, _cx: &mut Context<'_>) -> Ticks {
        Ticks::default()
    }

    fn on_data(&mut self, cx: &mut Context<'_>, t: &mut Ticks, input: &mut Input<'_>) {
        for &b in input.take() {
            match b {
                b'o' => {
                    cx.set_timer(Duration::from_millis(50));
                }
                b'p' => t.periodic = Some(cx.set_interval(Duration::from_millis(20))),
                b'c' => {
                    let id = cx.set_timer(Duration::from_millis(30));
                    let cancelled = cx.cancel_timer(id);
                    let again = cx.cancel_timer(id);
                    cx.write(format!("cancel {cancelled} {again}\n").as_bytes());
                }
                b's' => {
                    cx.set_service_timer(Duration::from_millis(30), false);
                }
                _ => {}
            }
        }
    }

    fn on_timer(&mut self, cx: &mut Context<'_>, t: &mut Ticks, timer: TimerId) {
        self.fired.set(self.fired.get() + 1);
        if Some(timer) == t.periodic {
            t.count += 1;
            cx.write(format!("tick {}\n", t.count).as_bytes());
            if t.count == 5 {
                assert!(cx.cancel_timer(timer));
            }
        } else {
            cx.write(b"once\n");
        }
    }

    fn on_service_timer(&mut self, cx: &mut Context<'_>, _timer: TimerId) {
        assert_eq!(cx.id(), muxserve::ConnId::NONE);
        self.fired.set(self.fired.get() + 100);
    }
}

/// Steps `server` for `time`.
fn step_for(server: &mut Server, time: Duration) {
    let end = Instant::now() + time;
    while Instant::now() < end {
        server.run_once(Some(Duration::from_millis(5))).unwrap();
    }
}

fn clock_server() -> (Server, std::net::SocketAddr, Rc<Cell<u32>>) {
    let fired = Rc::new(Cell::new(0));
    let mut server = Server::new().unwrap();
    let addr = local(
        &mut server,
        Clock {
            fired: Rc::clone(&fired),
        },
    );
    (server, addr, fired)
}

fn read_available(c: &mut std::net::TcpStream) -> String {
    c.set_nonblocking(true).unwrap();
    let mut out = Vec::new();
    let _ = c.read_to_end(&mut out);
    c.set_nonblocking(false).unwrap();
    String::from_utf8(out).unwrap()
}

#[test]
fn one_shot_fires_once() {
    let (mut server, addr, fired) = clock_server();
    let mut c = connect(addr);
    c.write_all(b"o").unwrap();
    step_until(&mut server, Duration::from_secs(5), |_| fired.get() == 1);
    step_for(&mut server, Duration::from_millis(150));
    assert_eq!(fired.get(), 1);
    assert_eq!(read_available(&mut c), "once\n");
}

#[test]
fn periodic_fires_repeatedly_until_cancelled() {
    let (mut server, addr, fired) = clock_server();
    let mut c = connect(addr);
    c.write_all(b"p").unwrap();
    step_until(&mut server, Duration::from_secs(5), |_| fired.get() == 5);
    step_for(&mut server, Duration::from_millis(100));
    assert_eq!(fired.get(), 5, "fired after cancel");
    assert_eq!(
        read_available(&mut c),
        "tick 1\ntick 2\ntick 3\ntick 4\ntick 5\n"
    );
}

#[test]
fn a_cancelled_timer_never_fires() {
    let (mut server, addr, fired) = clock_server();
    let mut c = connect(addr);
    c.write_all(b"c").unwrap();
    step_until(&mut server, Duration::from_secs(5), |s| {
        s.stats().bytes_out > 0
    });
    step_for(&mut server, Duration::from_millis(100));
    assert_eq!(fired.get(), 0);
    assert_eq!(read_available(&mut c), "cancel true false\n");
}

#[test]
fn timers_of_a_closed_connection_never_fire() {
    let (mut server, addr, fired) = clock_server();
    let mut c = connect(addr);
    c.write_all(b"op").unwrap();
    step_until(&mut server, Duration::from_secs(5), |s| {
        s.stats().bytes_in == 2
    });
    drop(c);
    step_until(&mut server, Duration::from_secs(5), |s| {
        s.connections() == 0
    });
    let before = fired.get();
    step_for(&mut server, Duration::from_millis(150));
    assert_eq!(fired.get(), before, "a timer of a closed connection fired");
}

#[test]
fn service_timers_fire_without_a_connection() {
    let (mut server, addr, fired) = clock_server();
    let mut c = connect(addr);
    c.write_all(b"s").unwrap();
    drop(c);
    step_until(&mut server, Duration::from_secs(5), |_| fired.get() == 100);
}

#[test]
fn idle_timeout_closes_idle_clients_in_time_and_spares_active_ones() {
    let idle = Duration::from_millis(1000);
    let server = start(move || {
        let mut config = Config::default();
        config.limits.idle_timeout = Some(idle);
        let mut server = Server::with_config(config).unwrap();
        let addr = local(&mut server, Echo);
        (server, vec![addr.into()])
    });
    let addr = server.addr();
    let active = std::thread::spawn(move || {
        let mut c = connect(addr);
        // Traffic every 300 ms for 2.5 s: never idle for a whole second.
        for i in 0..8u8 {
            c.write_all(&[i]).unwrap();
            assert_eq!(read_exact(&mut c, 1), [i]);
            std::thread::sleep(Duration::from_millis(300));
        }
        c.write_all(b"!").unwrap();
        assert_eq!(read_exact(&mut c, 1), b"!");
    });
    let start = Instant::now();
    let mut quiet = connect(addr);
    assert_eq!(read_to_end(&mut quiet), b"");
    let took = start.elapsed();
    assert!(
        took >= idle && took <= idle + Duration::from_secs(1),
        "closed after {took:?}"
    );
    active.join().expect("the active client was cut off");
    let report = server.shutdown();
    assert_eq!(report.stats.idle_timeouts, 1);
}
