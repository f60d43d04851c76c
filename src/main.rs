//! The `muxserve` command: parses arguments and calls the library.

use std::process::ExitCode;
use std::time::Duration;

use clap::{Parser, Subcommand};
use muxserve::auth::Key;
use muxserve::engine::ThreadConfig;
use muxserve::services::{Binding, Zone};
use muxserve::{Config, Engine, Host, Server, ThreadedServer};

#[derive(Parser, Debug)]
#[command(
    name = "muxserve",
    version,
    about = "Single-threaded readiness-based servers"
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand, Debug)]
enum Command {
    /// Serve built-in services; with no bindings, the default set on 127.0.0.1.
    Serve(ServeArgs),
    /// Talk to a line service: stdin to the server, the server to stdout.
    Client(ClientArgs),
    /// Benchmark echo servers: each in its own process, driven by a
    /// one-thread load generator that checks every byte.
    Bench(BenchArgs),
}

/// Where an authentication key comes from: a file or an environment
/// variable, never the command line (where `ps` would show it).
#[derive(clap::Args, Debug, Clone)]
struct KeyArgs {
    /// Read the HMAC key from this file.
    #[arg(long, value_name = "PATH", conflicts_with = "auth_key_env")]
    auth_key_file: Option<std::path::PathBuf>,
    /// Read the HMAC key from this environment variable.
    #[arg(long, value_name = "VAR")]
    auth_key_env: Option<String>,
}

impl KeyArgs {
    fn load(&self) -> std::io::Result<Option<Key>> {
        match (&self.auth_key_file, &self.auth_key_env) {
            (Some(path), _) => Key::from_file(path).map(Some).map_err(|e| {
                std::io::Error::new(e.kind(), format!("auth key file {}: {e}", path.display()))
            }),
            (None, Some(var)) => Key::from_env(var).map(Some),
            (None, None) => Ok(None),
        }
    }
}

#[derive(clap::Args, Debug)]
struct ClientArgs {
    /// HOST:PORT of the server.
    addr: String,
    #[command(flatten)]
    key: KeyArgs,
}

#[derive(clap::Args, Debug)]
struct BenchArgs {
    /// Drive this external echo server instead of starting our own.
    #[arg(long, value_name = "ADDR")]
    target: Option<std::net::SocketAddr>,
    /// Servers to start: mio, poll, select, threads, and the peers tokio and
    /// bare (a minimal mio echo loop); comma separated.
    #[arg(long, value_delimiter = ',', default_value = "mio,poll,threads,tokio")]
    engines: Vec<EngineChoice>,
    /// Concurrent connections (a list makes a matrix).
    #[arg(long, value_delimiter = ',', default_value = "100", value_parser = at_least::<1>)]
    conns: Vec<usize>,
    /// Bytes per request (a list makes a matrix).
    #[arg(long, value_delimiter = ',', default_value = "64", value_parser = at_least::<1>)]
    sizes: Vec<usize>,
    /// Requests in flight per connection (a list makes a matrix).
    #[arg(long, value_delimiter = ',', default_value = "1", value_parser = at_least::<1>)]
    depth: Vec<usize>,
    /// Seconds of warm-up before each measured run.
    #[arg(long, default_value = "1", value_parser = seconds)]
    warmup: Duration,
    /// Seconds measured per run.
    #[arg(long, default_value = "5", value_parser = some_seconds)]
    duration: Duration,
    /// The engine the table's ratios compare with (default: tokio if it
    /// runs, else the first).
    #[arg(long, value_name = "ENGINE")]
    reference: Option<EngineChoice>,
    /// Runs per cell and engine, interleaved across engines; medians are
    /// reported.
    #[arg(long, default_value = "5", value_parser = at_least::<1>)]
    runs: usize,
    /// Also measure server memory per idle connection with this many
    /// connections, each having echoed once (0 = skip).
    #[arg(long, default_value_t = 0, value_name = "K")]
    idle: usize,
    /// Also measure connection churn for this many seconds per run (0 = skip).
    #[arg(long, default_value = "0", value_parser = seconds, value_name = "SECS")]
    churn: Duration,
    /// Also measure chat fan-out with these member counts (comma separated).
    /// One member sends, the others receive, so at least 2.
    #[arg(long, value_delimiter = ',', value_name = "M", value_parser = at_least::<2>)]
    chat: Vec<usize>,
    /// Messages one chat member sends in the fan-out test.
    #[arg(long, default_value = "2000", value_parser = at_least::<1>)]
    chat_messages: usize,
    /// Write results.json, samples.csv and SVG charts here.
    #[arg(long, value_name = "DIR")]
    out: Option<std::path::PathBuf>,
}

#[derive(clap::Args, Debug)]
struct ServeArgs {
    /// The engine that runs the services: mio, poll, select or threads
    /// (or an echo peer for `muxserve bench`: tokio, bare).
    #[arg(long, default_value = "mio")]
    engine: EngineChoice,
    /// SERVICE@ADDRESS, e.g. echo@127.0.0.1:7007 or discard@unix:///tmp/d.sock
    bindings: Vec<Binding>,
    /// Most connections open at once (clamped to the descriptor limit).
    #[arg(long, value_name = "N")]
    max_connections: Option<usize>,
    /// Descriptors kept free when clamping --max-connections to the
    /// descriptor limit (default 32).
    #[arg(long, value_name = "N")]
    fd_reserve: Option<usize>,
    /// Most connections one client address may hold at once (default: no
    /// cap; loopback benchmarks come from one address).
    #[arg(long, value_name = "N", value_parser = at_least::<1>)]
    max_per_source: Option<usize>,
    /// Close connections idle this long (seconds; 0 = never).
    #[arg(long, value_name = "SECS", value_parser = seconds)]
    idle_timeout: Option<Duration>,
    /// Daytime and stamp tell UTC instead of local time.
    #[arg(long)]
    utc: bool,
    /// Close connections that leave a line or frame unfinished this long
    /// (seconds; 0 = never).
    #[arg(long, value_name = "SECS", value_parser = seconds)]
    frame_timeout: Option<Duration>,
    /// Drop connections whose output makes no progress this long (seconds;
    /// 0 = never).
    #[arg(long, value_name = "SECS", value_parser = seconds)]
    write_timeout: Option<Duration>,
    /// Log the counters this often (seconds).
    #[arg(long, value_name = "SECS", value_parser = seconds)]
    stats_interval: Option<Duration>,
    /// Put every stream service behind HMAC challenge-response
    /// authentication (see `muxserve client`).
    #[command(flatten)]
    key: KeyArgs,
    /// On Ctrl-C, let open connections finish for this long (seconds).
    #[arg(long, value_name = "SECS", value_parser = seconds)]
    grace: Option<Duration>,
    /// Print what each turn of the event loop saw and did: the wait, every
    /// event, read, send, accept, timer and close (loop engines only; the
    /// same as RUST_LOG=muxserve::trace=trace).
    #[arg(long)]
    trace: bool,
}

/// A muxserve engine, or one of the echo peers `muxserve bench` compares
/// against.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum EngineChoice {
    Muxserve(Engine),
    Peer(Peer),
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Peer {
    /// tokio's current-thread runtime (the `tokio-peer` feature).
    Tokio,
    /// An echo loop written straight on mio: the floor.
    Bare,
}

impl EngineChoice {
    fn name(self) -> &'static str {
        match self {
            EngineChoice::Muxserve(engine) => engine.name(),
            EngineChoice::Peer(Peer::Tokio) => "tokio",
            EngineChoice::Peer(Peer::Bare) => "bare",
        }
    }
}

impl std::str::FromStr for EngineChoice {
    type Err = String;

    fn from_str(s: &str) -> Result<EngineChoice, String> {
        match s {
            "tokio" if cfg!(feature = "tokio-peer") => Ok(EngineChoice::Peer(Peer::Tokio)),
            "bare" => Ok(EngineChoice::Peer(Peer::Bare)),
            _ => s.parse().map(EngineChoice::Muxserve).map_err(|_| {
                format!("unknown engine {s:?} (mio, poll, select, threads; peers: tokio, bare)")
            }),
        }
    }
}

/// A whole number no smaller than `MIN`.
fn at_least<const MIN: usize>(s: &str) -> Result<usize, String> {
    match s.parse::<usize>() {
        Ok(n) if n >= MIN => Ok(n),
        Ok(_) => Err(format!("must be at least {MIN}")),
        Err(_) => Err(format!("{s:?} is not a whole number")),
    }
}

/// A number of seconds greater than zero.
fn some_seconds(s: &str) -> Result<Duration, String> {
    match seconds(s)? {
        d if d.is_zero() => Err("must be more than 0 seconds".to_string()),
        d => Ok(d),
    }
}

/// The longest duration any flag takes: one year. Nobody means a timeout or
/// a grace period longer than that, so a bigger number is a typo (or an
/// attack on the arithmetic) and is refused with a usage error; use 0 where
/// a flag allows it to turn the timeout off. The library itself takes any
/// `Duration`, up to `Duration::MAX`.
const MAX_SECONDS: f64 = 365.0 * 24.0 * 60.0 * 60.0;

/// A number of seconds from 0 to [`MAX_SECONDS`], fractions allowed.
fn seconds(s: &str) -> Result<Duration, String> {
    let secs: f64 = s
        .parse()
        .map_err(|_| format!("{s:?} is not a number of seconds"))?;
    if !secs.is_finite() || secs < 0.0 {
        return Err(format!("{s:?} is not a usable number of seconds"));
    }
    if secs > MAX_SECONDS {
        return Err(format!(
            "more than a year ({MAX_SECONDS} seconds), the longest duration accepted"
        ));
    }
    Duration::try_from_secs_f64(secs)
        .map_err(|_| format!("{s:?} is not a usable number of seconds"))
}

fn main() -> ExitCode {
    let cli = match Cli::try_parse() {
        Ok(cli) => cli,
        Err(e) if !e.use_stderr() => {
            // --help and --version.
            let _ = e.print();
            return ExitCode::SUCCESS;
        }
        Err(e) => return usage_error(&e.to_string()),
    };
    let mut logger =
        env_logger::Builder::from_env(env_logger::Env::default().default_filter_or("info"));
    if matches!(&cli.command, Command::Serve(args) if args.trace) {
        logger.filter_module(muxserve::engine::TRACE_TARGET, log::LevelFilter::Trace);
    }
    logger.init();
    match cli.command {
        Command::Serve(args) => serve(args),
        Command::Bench(args) => bench(args),
        Command::Client(args) => client(args),
    }
}

/// One line on stderr and exit code 2, for anything the user got wrong.
fn usage_error(message: &str) -> ExitCode {
    let first = message.lines().next().unwrap_or(message);
    let first = first.strip_prefix("error: ").unwrap_or(first);
    eprintln!("muxserve: {first}");
    ExitCode::from(2)
}

fn serve(args: ServeArgs) -> ExitCode {
    let mut config = Config::default();
    if let Some(n) = args.max_connections {
        config.max_connections = n;
    }
    if let Some(n) = args.fd_reserve {
        config.fd_reserve = n;
    }
    if let Some(n) = args.max_per_source {
        config.max_per_source = n;
    }
    if let Some(t) = args.idle_timeout {
        config.limits.idle_timeout = (!t.is_zero()).then_some(t);
    }
    if let Some(t) = args.frame_timeout {
        config.limits.frame_timeout = (!t.is_zero()).then_some(t);
    }
    if let Some(t) = args.write_timeout {
        config.limits.write_timeout = (!t.is_zero()).then_some(t);
    }
    if let Some(t) = args.stats_interval {
        config.stats_interval = (!t.is_zero()).then_some(t);
    }
    if let Some(g) = args.grace {
        config.grace = g;
    }
    let key = match args.key.load() {
        Ok(key) => key,
        Err(e) => return usage_error(&e.to_string()),
    };
    let engine = match args.engine {
        EngineChoice::Muxserve(engine) => engine,
        EngineChoice::Peer(peer) => return serve_peer(peer, &args.bindings),
    };
    if args.trace && !matches!(engine, Engine::Mio | Engine::Poll | Engine::Select) {
        log::warn!("--trace: the {engine} engine has no loop turns to trace");
    }
    let bindings = if args.bindings.is_empty() {
        let mut defaults = Binding::defaults();
        if key.is_some() {
            // Authentication needs a connection to hold the handshake.
            defaults.retain(|b| b.endpoint.is_stream());
        }
        defaults
    } else {
        args.bindings.clone()
    };
    let opts = muxserve::services::Options {
        zone: if args.utc { Zone::Utc } else { Zone::Local },
    };
    // One guard for every binding: one throttle counts an address's
    // attempts on all of them.
    let guard = key.map(muxserve::auth::Guard::new);
    let started = match engine {
        Engine::Threads => ThreadedServer::new(config, ThreadConfig::default())
            .map(|server| serve_on(server, &bindings, opts, guard.as_ref(), engine)),
        engine => Server::with_engine(engine, config)
            .map(|server| serve_on(server, &bindings, opts, guard.as_ref(), engine)),
    };
    started.unwrap_or_else(|e| {
        eprintln!("muxserve: cannot start the {engine} engine: {e}");
        ExitCode::FAILURE
    })
}

/// Prints what a server is serving. A server must not die because no one
/// reads its banner (stdout closed, or piped into `head -1`), so a failed
/// write is ignored, where `println!` would panic.
fn announce(text: &str) {
    use std::io::Write;
    let mut out = std::io::stdout().lock();
    let _ = out.write_all(text.as_bytes()).and_then(|()| out.flush());
}

/// Binds every service on `server`, says how to connect, and runs.
fn serve_on<H: Host>(
    mut server: H,
    bindings: &[Binding],
    opts: muxserve::services::Options,
    guard: Option<&muxserve::auth::Guard>,
    engine: Engine,
) -> ExitCode {
    let mut lines = Vec::new();
    for b in bindings {
        match b
            .service
            .bind_behind(&mut server, b.endpoint.clone(), opts, guard)
        {
            Ok(bound) => lines.push(format!(
                "  {:<8} {:<24} {:<22} {}",
                b.service,
                bound.to_string(),
                bound.how_to_connect(),
                b.service.summary()
            )),
            Err(e) => {
                return usage_error(&format!(
                    "cannot serve {} on {}: {e}",
                    b.service, b.endpoint
                ))
            }
        }
    }
    let behind = if guard.is_some() {
        ", behind authentication"
    } else {
        ""
    };
    // Watch the signals before saying we are up: whoever reads the list
    // may signal at once, and must find the server ready for it.
    if let Err(e) = server.stop_on_signals() {
        log::warn!("cannot watch for signals, Ctrl-C will not stop gracefully: {e}");
    }
    let mut banner =
        format!("muxserve is serving on the {engine} engine{behind} (Ctrl-C to stop):\n");
    for line in lines {
        banner.push_str(&line);
        banner.push('\n');
    }
    announce(&banner);
    match server.run() {
        Ok(report) => {
            // However it stopped (a signal, a service), say what happened.
            log::info!("report: {report}");
            ExitCode::SUCCESS
        }
        Err(e) => {
            eprintln!("muxserve: event loop failed: {e}");
            ExitCode::FAILURE
        }
    }
}

fn bench(args: BenchArgs) -> ExitCode {
    if let Some(r) = args.reference.filter(|r| !args.engines.contains(r)) {
        return usage_error(&format!(
            "--reference {} is not one of the --engines",
            r.name()
        ));
    }
    match run_bench(&args) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("muxserve bench: {e}");
            ExitCode::FAILURE
        }
    }
}

/// The engine the table's ratios compare with: the one asked for, else
/// tokio if it runs, else the first (`--engines` is never empty).
fn reference(args: &BenchArgs) -> EngineChoice {
    const TOKIO: EngineChoice = EngineChoice::Peer(Peer::Tokio);
    args.reference
        .or(args.engines.contains(&TOKIO).then_some(TOKIO))
        .unwrap_or(args.engines[0])
}

fn run_bench(args: &BenchArgs) -> std::io::Result<()> {
    use muxserve::bench::{self, load::LoadSpec, report, runner};
    runner::pin_self();
    if let Some(target) = args.target {
        // An external server: load only (its CPU and memory are not ours
        // to read).
        for &conns in &args.conns {
            for &size in &args.sizes {
                for &depth in &args.depth {
                    for run in 0..args.runs {
                        let spec = LoadSpec {
                            target,
                            conns,
                            size,
                            depth,
                            warmup: args.warmup,
                            duration: args.duration,
                        };
                        let r = bench::load::run(&spec, |_| {})?;
                        let h = &r.latency;
                        println!(
                            "{target} {conns}x{size}B depth {depth} run {run}: {:.0} req/s, p50 {:.1} µs, p99 {:.1} µs",
                            r.rate(),
                            h.value_at_quantile(0.5) as f64 / 1e3,
                            h.value_at_quantile(0.99) as f64 / 1e3
                        );
                    }
                }
            }
        }
        return Ok(());
    }
    let plan = runner::Plan {
        engines: args.engines.iter().map(|e| e.name().to_string()).collect(),
        conns: args.conns.clone(),
        sizes: args.sizes.clone(),
        depths: args.depth.clone(),
        warmup: args.warmup,
        duration: args.duration,
        runs: args.runs,
    };
    println!(
        "echo on {} engines: conns {:?}, sizes {:?}, depth {:?}; {} runs of {:?} after {:?} warm-up; {} cores",
        plan.engines.len(),
        plan.conns,
        plan.sizes,
        plan.depths,
        plan.runs,
        plan.duration,
        plan.warmup,
        runner::cores()
    );
    let bar = indicatif::ProgressBar::new(0).with_style(
        indicatif::ProgressStyle::with_template("{bar:30} {pos}/{len} {elapsed_precise} {msg}")
            .expect("valid template"),
    );
    let load_at_start = runner::load_average();
    let mut results = report::Results {
        cells: runner::matrix(&plan, &bar)?,
        reference: reference(args).name().to_string(),
        cores: runner::cores(),
        ..Default::default()
    };
    if args.idle > 0 {
        bar.inc_length(plan.engines.len() as u64);
        results.idle = runner::idle(&plan.engines, args.idle, args.sizes[0], &bar)?;
    }
    if !args.churn.is_zero() {
        bar.inc_length((plan.engines.len() * args.runs) as u64);
        results.churn = runner::churn(&plan.engines, args.churn, args.runs, &bar)?;
    }
    if !args.chat.is_empty() {
        let chatty = plan.engines.iter().filter(|e| runner::serves_chat(e));
        bar.inc_length((chatty.count() * args.chat.len()) as u64);
        results.fanout = runner::fanout(&plan.engines, &args.chat, args.chat_messages, &bar)?;
    }
    bar.finish_and_clear();
    results.load = [load_at_start, runner::load_average()];
    print!("{}", report::table(&results));
    if let Some(dir) = &args.out {
        report::write(dir, &results)?;
        println!("wrote {}", dir.display());
    }
    Ok(())
}

fn client(args: ClientArgs) -> ExitCode {
    let key = match args.key.load() {
        Ok(key) => key,
        Err(e) => return usage_error(&e.to_string()),
    };
    let result = muxserve::client::connect(&args.addr, key.as_ref())
        .and_then(|stream| muxserve::client::interact(stream, std::io::stdin(), std::io::stdout()));
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("muxserve client: {}: {e}", args.addr);
            ExitCode::FAILURE
        }
    }
}

/// `serve --engine tokio|bare echo@ADDR`: an echo peer for the benchmark.
fn serve_peer(peer: Peer, bindings: &[Binding]) -> ExitCode {
    let name = EngineChoice::Peer(peer).name();
    let [Binding {
        service: muxserve::services::Builtin::Echo,
        endpoint: muxserve::Endpoint::Tcp(addr),
    }] = bindings
    else {
        return usage_error(&format!(
            "the {name} peer serves exactly one echo@HOST:PORT binding"
        ));
    };
    let ready = |bound| announce(&format!("{name} echo peer:\n  echo     tcp://{bound}\n"));
    let result = match peer {
        Peer::Bare => muxserve::bench::peer::bare_echo(*addr, ready),
        #[cfg(feature = "tokio-peer")]
        Peer::Tokio => muxserve::bench::peer::tokio_echo(*addr, ready),
        #[cfg(not(feature = "tokio-peer"))]
        Peer::Tokio => return usage_error("built without the tokio-peer feature"),
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => usage_error(&format!("{name} peer on {addr}: {e}")),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn reference_of(flags: &[&str]) -> &'static str {
        let cli = Cli::try_parse_from(["muxserve", "bench"].iter().chain(flags)).unwrap();
        let Command::Bench(args) = cli.command else {
            unreachable!("parsed as bench")
        };
        reference(&args).name()
    }

    #[test]
    fn ratios_compare_with_the_engine_asked_for_else_tokio_else_the_first() {
        assert_eq!(
            reference_of(&["--engines", "mio,bare", "--reference", "bare"]),
            "bare"
        );
        assert_eq!(reference_of(&["--engines", "poll,mio"]), "poll");
        if cfg!(feature = "tokio-peer") {
            assert_eq!(reference_of(&["--engines", "mio,tokio,bare"]), "tokio");
            assert_eq!(reference_of(&[]), "tokio");
        }
    }
}
