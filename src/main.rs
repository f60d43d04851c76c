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
    /// Engines to start (comma separated).
    #[arg(long, value_delimiter = ',', default_value = "mio")]
    engines: Vec<String>,
    /// Concurrent connections.
    #[arg(long, default_value_t = 100)]
    conns: usize,
    /// Bytes per request.
    #[arg(long, default_value_t = 64)]
    size: usize,
    /// Requests in flight per connection.
    #[arg(long, default_value_t = 1)]
    depth: usize,
    /// Seconds of warm-up before each measured run.
    #[arg(long, default_value = "1", value_parser = seconds)]
    warmup: Duration,
    /// Seconds measured per run.
    #[arg(long, default_value = "5", value_parser = seconds)]
    duration: Duration,
    /// Runs per engine, interleaved across engines; medians are reported.
    #[arg(long, default_value_t = 5)]
    runs: usize,
    /// Also measure server memory per idle connection with this many
    /// connections, each having echoed once (0 = skip).
    #[arg(long, default_value_t = 0, value_name = "K")]
    idle: usize,
}

#[derive(clap::Args, Debug)]
struct ServeArgs {
    /// The engine that runs the services: mio, poll, select or threads.
    #[arg(long, default_value = "mio")]
    engine: Engine,
    /// SERVICE@ADDRESS, e.g. echo@127.0.0.1:7007 or discard@unix:///tmp/d.sock
    bindings: Vec<Binding>,
    /// Most connections open at once (clamped to the descriptor limit).
    #[arg(long, value_name = "N")]
    max_connections: Option<usize>,
    /// Descriptors kept free when clamping --max-connections to the
    /// descriptor limit (default 32).
    #[arg(long, value_name = "N")]
    fd_reserve: Option<usize>,
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
}

fn seconds(s: &str) -> Result<Duration, String> {
    let secs: f64 = s
        .parse()
        .map_err(|_| format!("{s:?} is not a number of seconds"))?;
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
    env_logger::Builder::from_env(env_logger::Env::default().default_filter_or("info")).init();
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
    let bindings = if args.bindings.is_empty() {
        let mut defaults = Binding::defaults();
        if args.engine == Engine::Threads || key.is_some() {
            // One thread per connection, and authentication, need streams.
            defaults.retain(|b| b.endpoint.is_stream());
        }
        defaults
    } else {
        args.bindings.clone()
    };
    let opts = muxserve::services::Options {
        zone: if args.utc { Zone::Utc } else { Zone::Local },
    };
    let started = match args.engine {
        Engine::Threads => ThreadedServer::new(config, ThreadConfig::default())
            .map(|server| serve_on(server, &bindings, opts, key.as_ref(), args.engine)),
        engine => Server::with_engine(engine, config)
            .map(|server| serve_on(server, &bindings, opts, key.as_ref(), engine)),
    };
    started.unwrap_or_else(|e| {
        eprintln!("muxserve: cannot start the {} engine: {e}", args.engine);
        ExitCode::FAILURE
    })
}

/// Binds every service on `server`, says how to connect, and runs.
fn serve_on<H: Host>(
    mut server: H,
    bindings: &[Binding],
    opts: muxserve::services::Options,
    key: Option<&Key>,
    engine: Engine,
) -> ExitCode {
    let mut lines = Vec::new();
    for b in bindings {
        match b
            .service
            .bind_behind(&mut server, b.endpoint.clone(), opts, key)
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
    let behind = if key.is_some() {
        ", behind authentication"
    } else {
        ""
    };
    println!("muxserve is serving on the {engine} engine{behind} (Ctrl-C to stop):");
    for line in lines {
        println!("{line}");
    }
    if let Err(e) = stop_on_signals(server.handle()) {
        log::warn!("cannot watch for signals, Ctrl-C will not stop gracefully: {e}");
    }
    match server.run() {
        Ok(_report) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("muxserve: event loop failed: {e}");
            ExitCode::FAILURE
        }
    }
}

/// First SIGINT/SIGTERM: graceful shutdown. Second: stop at once.
fn stop_on_signals(handle: muxserve::Handle) -> std::io::Result<()> {
    use signal_hook::consts::{SIGINT, SIGTERM};
    let mut signals = signal_hook::iterator::Signals::new([SIGINT, SIGTERM])?;
    std::thread::Builder::new()
        .name("signals".into())
        .spawn(move || {
            let mut seen = 0;
            for signal in signals.forever() {
                seen += 1;
                if seen == 1 {
                    log::info!("signal {signal}: shutting down gracefully (again to stop now)");
                    handle.shutdown();
                } else {
                    log::info!("signal {signal}: stopping now");
                    handle.stop();
                }
            }
        })?;
    Ok(())
}

fn bench(args: BenchArgs) -> ExitCode {
    match run_bench(&args) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("muxserve bench: {e}");
            ExitCode::FAILURE
        }
    }
}

fn run_bench(args: &BenchArgs) -> std::io::Result<()> {
    use muxserve::bench::{self, load::LoadSpec, ServerProcess};
    let spec = LoadSpec {
        target: args.target.unwrap_or(([127, 0, 0, 1], 0).into()),
        conns: args.conns,
        size: args.size,
        depth: args.depth,
        warmup: args.warmup,
        duration: args.duration,
    };
    let cores = std::thread::available_parallelism().map_or(1, |n| n.get());
    if cores >= 2 {
        let _ = bench::pin(0, 0);
    }
    println!(
        "echo, {} connections x {} B, depth {}, {} runs of {:?} after {:?} warm-up, {} cores",
        spec.conns, spec.size, spec.depth, args.runs, spec.duration, spec.warmup, cores
    );
    let start = |engine: &str| -> std::io::Result<ServerProcess> {
        let server = ServerProcess::spawn(&["--engine", engine, "echo@127.0.0.1:0"])?;
        if cores >= 2 {
            let _ = bench::pin(server.pid(), 1);
        }
        Ok(server)
    };
    if let Some(target) = args.target {
        for run in 0..args.runs {
            let result = bench::load::run(
                &LoadSpec {
                    target,
                    ..spec.clone()
                },
                |_| {},
            )?;
            println!("run {run}: {:.0} req/s", result.rate());
        }
        return Ok(());
    }
    let mut samples: Vec<Vec<bench::Sample>> = vec![Vec::new(); args.engines.len()];
    for run in 0..args.runs {
        for (e, engine) in args.engines.iter().enumerate() {
            let server = start(engine)?;
            let sample = bench::measure(engine, &server, &spec, |_| {})?;
            println!("run {run}: {sample}");
            samples[e].push(sample);
        }
    }
    println!("medians:");
    for (engine, runs) in args.engines.iter().zip(&samples) {
        let med = |f: &dyn Fn(&bench::Sample) -> f64| {
            bench::median(&mut runs.iter().map(f).collect::<Vec<_>>())
        };
        println!(
            "  {engine:<8} {:>10.0} req/s  p50 {:.1} µs  p99 {:.1} µs  cpu/req {:.3} µs user + {:.3} µs sys",
            med(&|s| s.rate),
            med(&|s| s.latency_us[0]),
            med(&|s| s.latency_us[1]),
            med(&|s| s.cpu_us.0),
            med(&|s| s.cpu_us.1),
        );
    }
    if args.idle > 0 {
        for engine in &args.engines {
            let server = start(engine)?;
            let per = bench::idle_bytes_per_conn(&server, args.idle, args.size)?;
            println!("  {engine:<8} {per:.0} B of server RSS per idle connection ({} connections, each echoed {} B once)", args.idle, args.size);
        }
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
