//! A connection closed for breaking the protocol is reported as such:
//! to `on_close`, in the counters and in the report, on every engine.

mod common;

use std::io::Write;
use std::sync::{mpsc, Arc, Mutex};

use common::*;
use muxserve::codec::Delimited;
use muxserve::framed::{FrameService, Framed};
use muxserve::{CloseReason, Context, Host, Report, Server, ThreadedServer};

/// Lines of at most 8 bytes, echoed; remembers why each connection closed.
#[derive(Clone, Default)]
struct Short {
    closed: Arc<Mutex<Vec<CloseReason>>>,
}

impl FrameService for Short {
    type Session = ();
    fn on_connect(&mut self, _cx: &mut Context<'_>) {}
    fn on_frame(&mut self, cx: &mut Context<'_>, _: &mut (), line: &[u8]) {
        cx.write(line);
        cx.write(b"\n");
    }
    fn on_close(&mut self, _cx: &mut Context<'_>, _: (), why: CloseReason) {
        self.closed.lock().unwrap().push(why);
    }
}

/// Serves `service` on `engine` until `client` is done; returns the report.
fn serve_until<S>(engine: Engine, service: S, client: impl FnOnce(std::net::SocketAddr)) -> Report
where
    S: muxserve::Service + Send + 'static,
    S::Session: Send,
{
    fn run<H: Host>(
        mut host: H,
        service: impl muxserve::Service<Session = impl Send> + Send + 'static,
        tx: mpsc::Sender<(muxserve::Handle, std::net::SocketAddr)>,
    ) -> Report {
        let limits = host.config().limits.clone();
        let at = host
            .bind_stream(LOOPBACK.parse().unwrap(), service, limits)
            .unwrap()
            .socket_addr()
            .unwrap();
        tx.send((host.handle(), at)).unwrap();
        host.run().unwrap()
    }
    let (tx, rx) = mpsc::channel();
    let server = std::thread::spawn(move || match engine {
        Engine::Threads => run(
            ThreadedServer::new(Default::default(), Default::default()).unwrap(),
            service,
            tx,
        ),
        e => run(
            Server::with_engine(e, Default::default()).unwrap(),
            service,
            tx,
        ),
    });
    let (handle, at) = rx.recv_timeout(IO_TIMEOUT).expect("server did not start");
    client(at);
    handle.shutdown();
    server.join().unwrap()
}

fn a_line_too_long_closes_with_a_protocol_error(engine: Engine) {
    let short = Short::default();
    let closed = Arc::clone(&short.closed);
    let report = serve_until(engine, Framed::new(Delimited::lines(8), short), |at| {
        let mut c = connect(at);
        c.write_all(b"ok\nthis line is far too long\n").unwrap();
        assert_eq!(read_to_end_or_reset(&mut c), b"ok\n");
    });
    assert_eq!(*closed.lock().unwrap(), [CloseReason::ProtocolError]);
    assert_eq!(report.stats.protocol_closes, 1, "{}", report.stats);
    assert_eq!(report.stats.protocol_errors, 1, "{}", report.stats);
}

on_every_engine!(a_line_too_long_closes_with_a_protocol_error);
