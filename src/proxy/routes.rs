//! Stage 2: the route table. The longest prefix that matches on a path-segment boundary wins:
//! `/v1` matches `/v1` and `/v1/chat`, never `/v1beta`.

use crate::config::Route;

/// The routes, longest prefix first, each with its index in the config.
pub struct RouteTable {
    ordered: Vec<(usize, Route)>,
}

impl RouteTable {
    /// Builds the table from the configured routes.
    pub fn new(routes: &[Route]) -> Self {
        let mut ordered: Vec<(usize, Route)> = routes.iter().cloned().enumerate().collect();
        ordered.sort_by_key(|(_, r)| std::cmp::Reverse(r.prefix.len()));
        RouteTable { ordered }
    }

    /// The route for `path`, if any, with its config index.
    pub fn select(&self, path: &str) -> Option<(usize, &Route)> {
        self.ordered
            .iter()
            .find(|(_, r)| prefix_matches(&r.prefix, path))
            .map(|(i, r)| (*i, r))
    }
}

fn prefix_matches(prefix: &str, path: &str) -> bool {
    match path.strip_prefix(prefix) {
        Some(rest) => prefix.ends_with('/') || rest.is_empty() || rest.starts_with('/'),
        None => false,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::Config;

    #[test]
    fn longest_prefix_on_segment_boundary() {
        let text = ["/", "/v1", "/v1/chat/"]
            .iter()
            .map(|p| format!("[[route]]\nprefix = \"{p}\"\nupstream = \"https://u{}\"\ninject = {{ ai_secret = \"S\" }}\n", p.len()))
            .collect::<String>();
        let c = Config::parse(&text, "t").unwrap();
        let t = RouteTable::new(&c.routes);
        assert_eq!(t.select("/v1/chat/completions").unwrap().0, 2);
        assert_eq!(t.select("/v1/models").unwrap().0, 1);
        assert_eq!(t.select("/v1").unwrap().0, 1);
        assert_eq!(t.select("/v1beta").unwrap().0, 0);
        assert_eq!(t.select("/").unwrap().0, 0);
        let only_v1 = RouteTable::new(&c.routes[1..2]);
        assert!(only_v1.select("/other").is_none());
        assert!(only_v1.select("*").is_none());
    }
}
