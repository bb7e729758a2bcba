//! Reading admin requests: query parameters (unknown ones refused, list values repeated or
//! comma-joined), JSON bodies (capped, unknown fields refused), ids and names.

use bytes::Bytes;
use http::HeaderMap;
use http_body_util::{BodyExt, Limited};
use hyper::body::Incoming;
use serde::de::DeserializeOwned;

use crate::error::AdminError;
use crate::store::{ListQuery, Page};

/// The largest admin request body accepted (secrets such as service-account JSON fit easily).
pub const MAX_BODY: usize = 256 * 1024;
/// The largest page; a client that wants more pages on by cursor.
pub const MAX_PAGE: u32 = 1000;

/// The query parameters of a request, checked against the names an endpoint accepts.
pub struct Params {
    pairs: Vec<(String, String)>,
}

impl Params {
    /// Parses the query string, refusing any parameter not in `allowed`.
    pub fn parse(query: Option<&str>, allowed: &[&str]) -> Result<Params, AdminError> {
        let pairs: Vec<(String, String)> = form_urlencoded::parse(query.unwrap_or("").as_bytes())
            .map(|(k, v)| (k.into_owned(), v.into_owned()))
            .collect();
        for (k, _) in &pairs {
            if !allowed.contains(&k.as_str()) {
                return Err(AdminError::BadRequest(format!(
                    "unknown query parameter `{k}`; this endpoint accepts: {}",
                    allowed.join(", ")
                )));
            }
        }
        Ok(Params { pairs })
    }

    /// A single-valued parameter; given twice is an error.
    pub fn one(&self, name: &str) -> Result<Option<&str>, AdminError> {
        let mut it = self.pairs.iter().filter(|(k, _)| k == name);
        let first = it.next().map(|(_, v)| v.as_str());
        if it.next().is_some() {
            return Err(AdminError::BadRequest(format!(
                "query parameter `{name}` given more than once"
            )));
        }
        Ok(first)
    }

    /// A list parameter: repeated (`ids=a&ids=b`) or comma-joined (`ids=a,b`), or both.
    pub fn many(&self, name: &str) -> Vec<String> {
        self.pairs
            .iter()
            .filter(|(k, _)| k == name)
            .flat_map(|(_, v)| v.split(','))
            .map(str::trim)
            .filter(|v| !v.is_empty())
            .map(str::to_owned)
            .collect()
    }

    /// The common list parameters (`limit`, cursors, `ids`, a name filter) for `org_id`.
    pub fn list_query(&self, org_id: &str, name_param: &str) -> Result<ListQuery, AdminError> {
        let (page, limit) = self.page()?;
        let ids = self
            .many("ids")
            .iter()
            .map(|v| uuid_param("ids", v))
            .collect::<Result<Vec<_>, _>>()?;
        let name = self.one(name_param)?.map(str::to_owned);
        Ok(ListQuery {
            org_id: org_id.to_owned(),
            ids,
            name,
            page,
            limit,
        })
    }

    /// Where a page starts (`starting_after`, `ending_before`) and how long it is (`limit`).
    pub fn page(&self) -> Result<(Page, u32), AdminError> {
        let limit = match self.one("limit")? {
            None => MAX_PAGE,
            Some(v) => v
                .trim()
                .parse::<u64>()
                .map_err(|_| {
                    AdminError::BadRequest(format!("`limit` must be an integer ≥ 0, not {v:?}"))
                })?
                .min(MAX_PAGE as u64) as u32,
        };
        let after = self
            .one("starting_after")?
            .map(|v| uuid_param("starting_after", v))
            .transpose()?;
        let before = self
            .one("ending_before")?
            .map(|v| uuid_param("ending_before", v))
            .transpose()?;
        let page = match (after, before) {
            (Some(_), Some(_)) => {
                return Err(AdminError::BadRequest(
                    "pass only one of `starting_after` and `ending_before`".into(),
                ))
            }
            (Some(a), None) => Page::After(a),
            (None, Some(b)) => Page::Before(b),
            (None, None) => Page::First,
        };
        Ok((page, limit))
    }
}

fn uuid_param(name: &str, v: &str) -> Result<String, AdminError> {
    parse_id(v).map_err(|_| AdminError::BadRequest(format!("`{name}`: {v:?} is not a UUID")))
}

/// A path or query id: must be a UUID; returned in canonical lower-case form.
pub fn parse_id(v: &str) -> Result<String, AdminError> {
    uuid::Uuid::parse_str(v)
        .map(|u| u.to_string())
        .map_err(|_| AdminError::BadRequest(format!("{v:?} is not a valid id (expected a UUID)")))
}

/// Checks a name (of a key, secret, env var) or an object id: [`crate::actions::check_name`].
pub fn check_name(field: &str, v: &str) -> Result<(), AdminError> {
    Ok(crate::actions::check_name(field, v)?)
}

/// Reads the body (at most [`MAX_BODY`] bytes) and parses it as `T`. An empty body is `None`.
pub async fn json_body<T: DeserializeOwned>(
    headers: &HeaderMap,
    body: Incoming,
) -> Result<Option<T>, AdminError> {
    let declared = headers
        .get(http::header::CONTENT_LENGTH)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.parse::<u64>().ok());
    if declared.is_some_and(|n| n > MAX_BODY as u64) {
        return Err(AdminError::PayloadTooLarge(MAX_BODY));
    }
    let bytes: Bytes = match Limited::new(body, MAX_BODY).collect().await {
        Ok(c) => c.to_bytes(),
        Err(e) if e.is::<http_body_util::LengthLimitError>() => {
            return Err(AdminError::PayloadTooLarge(MAX_BODY))
        }
        Err(_) => {
            return Err(AdminError::BadRequest(
                "the request body could not be read".into(),
            ))
        }
    };
    if bytes.iter().all(u8::is_ascii_whitespace) {
        return Ok(None);
    }
    serde_json::from_slice(&bytes)
        .map(Some)
        .map_err(|e| AdminError::BadRequest(format!("invalid JSON body: {e}")))
}

/// Like [`json_body`], for endpoints whose body is required.
pub async fn required_body<T: DeserializeOwned>(
    headers: &HeaderMap,
    body: Incoming,
) -> Result<T, AdminError> {
    json_body(headers, body)
        .await?
        .ok_or_else(|| AdminError::BadRequest("a JSON object body is required".into()))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn lists_come_repeated_or_comma_joined() {
        let p = Params::parse(Some("ids=a%2Cb&ids=c&x=1"), &["ids", "x"]).unwrap();
        assert_eq!(p.many("ids"), vec!["a", "b", "c"]);
        assert!(Params::parse(Some("nope=1"), &["ids"]).is_err());
    }

    #[test]
    fn list_query_rules() {
        let id = uuid::Uuid::new_v4().to_string();
        let ok = |q: &str| {
            Params::parse(
                Some(q),
                &["limit", "starting_after", "ending_before", "ids", "n"],
            )
            .unwrap()
            .list_query("o", "n")
        };
        assert!(matches!(
            ok(&format!("starting_after={id}")).unwrap().page,
            Page::After(_)
        ));
        assert!(ok(&format!("starting_after={id}&ending_before={id}")).is_err());
        assert!(ok("starting_after=nope").is_err());
        assert!(ok("limit=-1").is_err());
        assert!(ok("limit=x").is_err());
        assert_eq!(ok("limit=0").unwrap().limit, 0);
        assert_eq!(ok("limit=99999").unwrap().limit, MAX_PAGE);
        assert_eq!(ok("n=abc").unwrap().name.as_deref(), Some("abc"));
        assert!(ok("ids=not-a-uuid").is_err());
        assert!(ok("limit=1&limit=2").is_err());
        assert_eq!(
            ok(&format!("ids={}", id.to_uppercase())).unwrap().ids,
            vec![id]
        );
    }
}
