//! The built-in services, and the table of names the CLI binds them by.

mod discard;
mod echo;

pub use self::discard::Discard;
pub use self::echo::Echo;

use std::fmt;
use std::io;
use std::str::FromStr;

use crate::engine::Server;
use crate::net::Endpoint;

/// A built-in service, by the name used in `SERVICE@ADDR`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Builtin {
    /// [`Echo`], RFC 862.
    Echo,
    /// [`Discard`], RFC 863.
    Discard,
}

impl Builtin {
    /// Every built-in service.
    pub const ALL: &'static [Builtin] = &[Builtin::Echo, Builtin::Discard];

    /// The name used on the command line.
    pub fn name(self) -> &'static str {
        match self {
            Builtin::Echo => "echo",
            Builtin::Discard => "discard",
        }
    }

    /// Where `muxserve serve` runs it when given no bindings.
    pub fn default_endpoints(self) -> &'static [&'static str] {
        match self {
            Builtin::Echo => &["127.0.0.1:7007"],
            Builtin::Discard => &["127.0.0.1:7009"],
        }
    }

    /// Binds this service on `endpoint` of `server`.
    pub fn bind(self, server: &mut Server, endpoint: Endpoint) -> io::Result<Endpoint> {
        let limits = server_limits(server);
        match self {
            Builtin::Echo => server.bind_with(endpoint, Echo, limits),
            Builtin::Discard => server.bind_with(endpoint, Discard, limits),
        }
    }
}

fn server_limits(server: &Server) -> crate::config::Limits {
    server.config().limits.clone()
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
