//! The built-in services, and the table of names the CLI binds them by.

pub mod chat;
pub mod clock;
mod daytime;
mod discard;
mod echo;
mod stamp;
mod time;

pub use self::chat::Chat;
pub use self::clock::Zone;
pub use self::daytime::Daytime;
pub use self::discard::Discard;
pub use self::echo::Echo;
pub use self::stamp::Stamp;
pub use self::time::Time;

use std::fmt;
use std::io;
use std::str::FromStr;

use crate::auth::Guard;
use crate::codec::{Delimited, MAX_LINE};
use crate::engine::Host;
use crate::net::Endpoint;
use crate::service::Service;

/// The encoder for lines the line services send: as long as a line in
/// may be, plus room for what a reply adds in front (a time stamp, a
/// nickname).
pub(crate) fn reply_lines() -> Delimited {
    Delimited::lines(MAX_LINE + 64)
}

/// A built-in service, by the name used in `SERVICE@ADDR`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Builtin {
    /// [`Echo`], RFC 862.
    Echo,
    /// [`Discard`], RFC 863.
    Discard,
    /// [`Daytime`], RFC 867.
    Daytime,
    /// [`Time`], RFC 868.
    Time,
    /// [`Stamp`], the time-stamping echo.
    Stamp,
    /// [`Chat`], a chat room.
    Chat,
}

/// Settings the built-in services take from the command line.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Options {
    /// Time zone of daytime and stamp.
    pub zone: Zone,
}

impl Builtin {
    /// Every built-in service.
    pub const ALL: &'static [Builtin] = &[
        Builtin::Echo,
        Builtin::Discard,
        Builtin::Daytime,
        Builtin::Time,
        Builtin::Stamp,
        Builtin::Chat,
    ];

    /// The name used on the command line.
    pub fn name(self) -> &'static str {
        match self {
            Builtin::Echo => "echo",
            Builtin::Discard => "discard",
            Builtin::Daytime => "daytime",
            Builtin::Time => "time",
            Builtin::Stamp => "stamp",
            Builtin::Chat => "chat",
        }
    }

    /// Where `muxserve serve` runs it when given no bindings.
    pub fn default_endpoints(self) -> &'static [&'static str] {
        match self {
            Builtin::Echo => &["127.0.0.1:7007", "udp://127.0.0.1:7007"],
            Builtin::Discard => &["127.0.0.1:7009"],
            Builtin::Daytime => &["127.0.0.1:1313", "udp://127.0.0.1:1313"],
            Builtin::Time => &["127.0.0.1:3737", "udp://127.0.0.1:3737"],
            Builtin::Stamp => &["127.0.0.1:2121"],
            Builtin::Chat => &["127.0.0.1:6667"],
        }
    }

    /// Binds this service on `endpoint` of `server`.
    pub fn bind<H: Host>(
        self,
        server: &mut H,
        endpoint: Endpoint,
        opts: Options,
    ) -> io::Result<Endpoint> {
        self.bind_behind(server, endpoint, opts, None)
    }

    /// Like [`bind`](Builtin::bind); with a key, the service is put behind
    /// [`Authenticated`](crate::auth::Authenticated) (stream endpoints
    /// only: a datagram has no connection to authenticate). Give every
    /// binding of a server the same guard, so one throttle counts them all.
    pub fn bind_behind<H: Host>(
        self,
        server: &mut H,
        endpoint: Endpoint,
        opts: Options,
        auth: Option<&Guard>,
    ) -> io::Result<Endpoint> {
        // A stream endpoint gets the stream version, a datagram endpoint the
        // datagram version.
        if !endpoint.is_stream() {
            if auth.is_some() {
                return Err(io::Error::new(
                    io::ErrorKind::InvalidInput,
                    format!("{endpoint}: authentication needs a stream endpoint"),
                ));
            }
            return match self {
                Builtin::Echo => server.bind_dgram(endpoint, Echo),
                Builtin::Discard => server.bind_dgram(endpoint, Discard),
                Builtin::Daytime => server.bind_dgram(endpoint, Daytime { zone: opts.zone }),
                Builtin::Time => server.bind_dgram(endpoint, Time),
                Builtin::Stamp => server.bind_dgram(endpoint, Stamp { zone: opts.zone }),
                Builtin::Chat => Err(io::Error::new(
                    io::ErrorKind::InvalidInput,
                    "chat needs a stream (tcp:// or unix://), not datagrams",
                )),
            };
        }
        let at = (endpoint, auth);
        match self {
            Builtin::Echo => stream(server, at, Echo),
            Builtin::Discard => stream(server, at, Discard),
            Builtin::Daytime => stream(server, at, Daytime { zone: opts.zone }),
            Builtin::Time => stream(server, at, Time),
            Builtin::Stamp => stream(server, at, Stamp::service(opts.zone)),
            Builtin::Chat => stream(server, at, Chat::new().service()),
        }
    }

    /// What a person sees when they connect.
    pub fn summary(self) -> &'static str {
        match self {
            Builtin::Echo => "every byte comes back",
            Builtin::Discard => "everything is read and dropped",
            Builtin::Daytime => "one line with the date and time",
            Builtin::Time => "4 bytes: seconds since 1900-01-01 UTC, big-endian",
            Builtin::Stamp => "each line comes back as [time] line",
            Builtin::Chat => "a chat room: send a nickname, then talk; /help",
        }
    }
}

/// Binds a stream service, behind authentication when a key is given.
fn stream<H, S>(
    server: &mut H,
    (endpoint, auth): (Endpoint, Option<&Guard>),
    service: S,
) -> io::Result<Endpoint>
where
    H: Host,
    S: Service + Send + 'static,
    S::Session: Send,
{
    let limits = server.config().limits.clone();
    match auth {
        Some(guard) => server.bind_stream(endpoint, guard.wrap(service), limits),
        None => server.bind_stream(endpoint, service, limits),
    }
}

impl fmt::Display for Builtin {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.pad(self.name())
    }
}

impl FromStr for Builtin {
    type Err = String;

    fn from_str(s: &str) -> Result<Builtin, String> {
        Builtin::ALL
            .iter()
            .copied()
            .find(|b| b.name() == s)
            .ok_or_else(|| {
                let names: Vec<_> = Builtin::ALL.iter().map(|b| b.name()).collect();
                format!("unknown service {s:?} (known: {})", names.join(", "))
            })
    }
}

/// One `SERVICE@ENDPOINT` argument of `muxserve serve`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Binding {
    /// The service.
    pub service: Builtin,
    /// Where it listens.
    pub endpoint: Endpoint,
}

impl Binding {
    /// The default set `muxserve serve` starts when given no bindings.
    pub fn defaults() -> Vec<Binding> {
        Builtin::ALL
            .iter()
            .flat_map(|&service| {
                service.default_endpoints().iter().map(move |e| Binding {
                    service,
                    endpoint: e.parse().expect("default endpoints parse"),
                })
            })
            .collect()
    }
}

impl FromStr for Binding {
    type Err = String;

    /// Parses `SERVICE@ENDPOINT`, e.g. `echo@127.0.0.1:7007` or
    /// `echo@unix:///tmp/echo.sock`.
    fn from_str(s: &str) -> Result<Binding, String> {
        let (service, endpoint) = s
            .split_once('@')
            .ok_or_else(|| format!("{s:?} is not SERVICE@ADDRESS (e.g. echo@127.0.0.1:7007)"))?;
        Ok(Binding {
            service: service.parse()?,
            endpoint: endpoint.parse().map_err(|e| format!("{e}"))?,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn bindings_parse_or_say_why_not() {
        let b: Binding = "echo@127.0.0.1:7".parse().unwrap();
        assert_eq!(b.service, Builtin::Echo);
        assert_eq!(b.endpoint, Endpoint::Tcp("127.0.0.1:7".parse().unwrap()));
        let err = "ecko@127.0.0.1:7".parse::<Binding>().unwrap_err();
        assert!(err.contains("unknown service \"ecko\""), "{err}");
        assert!("echo"
            .parse::<Binding>()
            .unwrap_err()
            .contains("SERVICE@ADDRESS"));
        assert!("echo@nowhere"
            .parse::<Binding>()
            .unwrap_err()
            .contains("bad address"));
    }

    #[test]
    fn defaults_cover_every_builtin() {
        let defaults = Binding::defaults();
        for b in Builtin::ALL {
            assert!(
                defaults.iter().any(|d| d.service == *b),
                "{b} has no default"
            );
        }
    }
}
