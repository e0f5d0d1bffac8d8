//! A route, as given on the command line: `LISTEN=APP[+CLAIM]`.

use core::net::SocketAddr;

pub const USAGE: &str = "\
usage: devloop-forward LISTEN=APP[+CLAIM]...

For each route, listens on LISTEN (ip:port) and hands each connection to
CLAIM (devloop's agent, on loopback) when something listens there, else to
APP (the app's own port; `-` for none: the connection is closed). Example:
  devloop-forward 0.0.0.0:40080=127.0.0.1:8080+127.0.0.1:40081
";

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Route {
    pub listen: SocketAddr,
    pub app: Option<SocketAddr>,
    pub claim: Option<SocketAddr>,
}

/// Why an argument is not a route.
#[derive(Debug, PartialEq, Eq)]
pub enum BadRoute<'a> {
    Shape(&'a str),
    Address(&'a str),
}

impl core::fmt::Display for BadRoute<'_> {
    fn fmt(&self, f: &mut core::fmt::Formatter<'_>) -> core::fmt::Result {
        match self {
            BadRoute::Shape(a) => write!(f, "`{a}`: expected LISTEN=APP[+CLAIM]"),
            BadRoute::Address(a) => write!(f, "`{a}` is not an ip:port"),
        }
    }
}

pub fn parse(arg: &str) -> Result<Route, BadRoute<'_>> {
    let (listen, rest) = arg.split_once('=').ok_or(BadRoute::Shape(arg))?;
    let (app, claim) = match rest.split_once('+') {
        Some((a, c)) => (a, Some(c)),
        None => (rest, None),
    };
    fn addr(s: &str) -> Result<SocketAddr, BadRoute<'_>> {
        s.parse().map_err(|_| BadRoute::Address(s))
    }
    let app = if app == "-" { None } else { Some(addr(app)?) };
    let claim = match claim {
        Some(c) => Some(addr(c)?),
        None => None,
    };
    Ok(Route { listen: addr(listen)?, app, claim })
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::string::ToString;

    #[test]
    fn routes_parse_and_bad_ones_say_why() {
        let r = parse("0.0.0.0:40080=127.0.0.1:8080+127.0.0.1:40081").unwrap();
        assert_eq!(r.listen.port(), 40080);
        assert_eq!(r.app.unwrap().port(), 8080);
        assert_eq!(r.claim.unwrap().port(), 40081);
        assert!(parse("0.0.0.0:1=127.0.0.1:2").unwrap().claim.is_none());
        assert!(parse("[::]:1=-+[::1]:3").unwrap().app.is_none());
        assert!(parse("nonsense").unwrap_err().to_string().contains("LISTEN=APP"));
        assert!(parse("0.0.0.0:1=localhost").unwrap_err().to_string().contains("not an ip:port"));
    }
}
