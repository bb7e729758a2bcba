//! Stage 2: the route table. The longest prefix that matches on a path-segment boundary wins
//! (`/v1` matches `/v1` and `/v1/chat`, never `/v1beta`); among equal prefixes a route bound to
//! the request's host wins over one for any host.

use http::header::{HeaderMap, HOST};
use http::Uri;

use crate::config::Route;

/// The routes, most specific first, each with its index in the config.
pub struct RouteTable {
    ordered: Vec<(usize, Route)>,
}

impl RouteTable {
    /// Builds the table from the configured routes.
    pub fn new(routes: &[Route]) -> Self {
        let mut ordered: Vec<(usize, Route)> = routes.iter().cloned().enumerate().collect();
        ordered.sort_by_key(|(_, r)| (std::cmp::Reverse(r.prefix.len()), r.host.is_none()));
        RouteTable { ordered }
    }

    /// The route for a request to `host` (if known) and `path`, with its config index.
    pub fn select(&self, host: Option<&str>, path: &str) -> Option<(usize, &Route)> {
        self.ordered
            .iter()
            .find(|(_, r)| prefix_matches(&r.prefix, path) && host_matches(r.host.as_deref(), host))
            .map(|(i, r)| (*i, r))
    }
}

/// The host a request is for: the URI authority (HTTP/2, absolute form) or the `Host` header.
pub fn request_host<'a>(uri: &'a Uri, headers: &'a HeaderMap) -> Option<&'a str> {
    uri.authority()
        .map(|a| a.as_str())
        .or_else(|| headers.get(HOST).and_then(|h| h.to_str().ok()))
}

fn prefix_matches(prefix: &str, path: &str) -> bool {
    match path.strip_prefix(prefix) {
        Some(rest) => prefix.ends_with('/') || rest.is_empty() || rest.starts_with('/'),
        None => false,
    }
}

fn host_matches(route_host: Option<&str>, request_host: Option<&str>) -> bool {
    use http::uri::Authority;
    let Some(want) = route_host.and_then(|w| w.parse::<Authority>().ok()) else {
        return route_host.is_none();
    };
    let Some(got) = request_host.and_then(|g| g.parse::<Authority>().ok()) else {
        return false;
    };
    if want.port().is_some() {
        got.as_str().eq_ignore_ascii_case(want.as_str())
    } else {
        got.host().eq_ignore_ascii_case(want.host())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::Config;

    fn table(routes: &[(&str, Option<&str>)]) -> RouteTable {
        let text = routes
            .iter()
            .enumerate()
            .map(|(i, (p, h))| {
                let host = h.map(|h| format!("host = \"{h}\"\n")).unwrap_or_default();
                format!("[[route]]\nname = \"r{i}\"\nprefix = \"{p}\"\n{host}upstream = \"https://u\"\ninject = {{ ai_secret = \"S\" }}\n")
            })
            .collect::<String>();
        RouteTable::new(&Config::parse(&text, "t").unwrap().routes)
    }

    #[test]
    fn longest_prefix_on_segment_boundary() {
        let t = table(&[("/", None), ("/v1", None), ("/v1/chat/", None)]);
        assert_eq!(t.select(None, "/v1/chat/completions").unwrap().0, 2);
        assert_eq!(t.select(None, "/v1/models").unwrap().0, 1);
        assert_eq!(t.select(None, "/v1").unwrap().0, 1);
        assert_eq!(t.select(None, "/v1beta").unwrap().0, 0);
        assert_eq!(t.select(None, "/").unwrap().0, 0);
        let only_v1 = table(&[("/v1", None)]);
        assert!(only_v1.select(None, "/other").is_none());
        assert!(only_v1.select(None, "*").is_none());
    }

    #[test]
    fn host_bound_routes_win_for_their_host_only() {
        let t = table(&[
            ("/v1", None),
            ("/v1", Some("api.local")),
            ("/", Some("other.local:8443")),
        ]);
        assert_eq!(t.select(Some("api.local"), "/v1/x").unwrap().0, 1);
        assert_eq!(t.select(Some("API.local:8443"), "/v1/x").unwrap().0, 1);
        assert_eq!(t.select(Some("127.0.0.1:8443"), "/v1/x").unwrap().0, 0);
        assert_eq!(t.select(None, "/v1/x").unwrap().0, 0);
        assert_eq!(t.select(Some("other.local:8443"), "/z").unwrap().0, 2);
        assert!(t.select(Some("other.local:9999"), "/z").is_none());
    }
}
