//! The `muxserve` command: parses arguments and calls the library.

use std::process::ExitCode;
use std::time::Duration;

use clap::{Parser, Subcommand};
use muxserve::services::Binding;
use muxserve::{Config, Server};

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
}

#[derive(clap::Args, Debug)]
struct ServeArgs {
    /// SERVICE@ADDRESS, e.g. echo@127.0.0.1:7007 or discard@unix:///tmp/d.sock
    bindings: Vec<Binding>,
    /// Most connections open at once (clamped to the descriptor limit).
    #[arg(long, value_name = "N")]
    max_connections: Option<usize>,
    /// Close connections idle this long (seconds; 0 = never).
    #[arg(long, value_name = "SECS", value_parser = seconds)]
    idle_timeout: Option<Duration>,
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
    if let Some(t) = args.idle_timeout {
        config.limits.idle_timeout = (!t.is_zero()).then_some(t);
    }
    if let Some(g) = args.grace {
        config.grace = g;
    }
    let bindings = if args.bindings.is_empty() {
        Binding::defaults()
    } else {
        args.bindings
    };
    let mut server = match Server::with_config(config) {
        Ok(server) => server,
        Err(e) => {
            eprintln!("muxserve: cannot start the event loop: {e}");
            return ExitCode::FAILURE;
        }
    };
    let mut lines = Vec::new();
    for b in &bindings {
        match b.service.bind(&mut server, b.endpoint.clone()) {
            Ok(bound) => lines.push(format!(
                "  {:<8} {:<28} {}",
                b.service,
                bound.to_string(),
                bound.how_to_connect()
            )),
            Err(e) => {
                return usage_error(&format!(
                    "cannot serve {} on {}: {e}",
                    b.service, b.endpoint
                ))
            }
        }
    }
    println!("muxserve is serving (Ctrl-C to stop):");
    for line in lines {
        println!("{line}");
    }
    log::info!("at most {} connections", server.max_connections());
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
