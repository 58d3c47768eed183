//! The console's script and stylesheet, inside the binary: served gzipped when the browser
//! takes it, with an ETag and a year's caching (their URLs carry the ETag, so a new agent's
//! assets are new URLs). HTML pages are gzipped the same way, but never cached.

use std::sync::OnceLock;

use axum::extract::Path;
use axum::http::{HeaderMap, HeaderValue, StatusCode, header};
use axum::response::{IntoResponse, Response};

pub const SCRIPT: &str = include_str!("assets/console.js");
pub const STYLE: &str = include_str!("assets/console.css");

/// What every console page may load and do: only what the agent serves, nothing inline
/// but the SVG charts, no framing.
pub const CONTENT_SECURITY_POLICY: &str = "default-src 'none'; script-src 'self'; \
     style-src 'self'; img-src 'self' data:; connect-src 'self'; form-action 'self'; \
     frame-ancestors 'none'; base-uri 'none'";

struct Asset {
    content_type: &'static str,
    plain: &'static [u8],
    gzipped: Vec<u8>,
    etag: String,
}

fn asset(name: &str) -> Option<&'static Asset> {
    static SCRIPT_ASSET: OnceLock<Asset> = OnceLock::new();
    static STYLE_ASSET: OnceLock<Asset> = OnceLock::new();
    let make = |content_type, text: &'static str| Asset {
        content_type,
        plain: text.as_bytes(),
        gzipped: gzip(text.as_bytes()),
        etag: format!("\"{}\"", etag_of(text.as_bytes())),
    };
    match name {
        "console.js" => {
            Some(SCRIPT_ASSET.get_or_init(|| make("text/javascript; charset=utf-8", SCRIPT)))
        }
        "console.css" => Some(STYLE_ASSET.get_or_init(|| make("text/css; charset=utf-8", STYLE))),
        _ => None,
    }
}

/// The first 8 bytes of the SHA-256 of `bytes`, hex.
pub fn etag_of(bytes: &[u8]) -> String {
    hex::encode(&ring::digest::digest(&ring::digest::SHA256, bytes).as_ref()[..8])
}

/// The URL of an asset, versioned by its content.
pub fn url(name: &str) -> String {
    let tag = asset(name)
        .map(|a| a.etag.trim_matches('"').to_string())
        .unwrap_or_default();
    format!("/console/assets/{name}?v={tag}")
}

pub fn gzip(bytes: &[u8]) -> Vec<u8> {
    use std::io::Write as _;
    let mut encoder = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::best());
    // Writing to a Vec cannot fail.
    let _ = encoder.write_all(bytes);
    encoder.finish().unwrap_or_default()
}

pub fn accepts_gzip(headers: &HeaderMap) -> bool {
    headers
        .get_all(header::ACCEPT_ENCODING)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(','))
        .any(|e| e.trim().split(';').next() == Some("gzip"))
}

pub(crate) async fn serve(Path(name): Path<String>, headers: HeaderMap) -> Response {
    let Some(asset) = asset(&name) else {
        return (StatusCode::NOT_FOUND, "no such asset").into_response();
    };
    let etag = HeaderValue::from_str(&asset.etag).unwrap_or(HeaderValue::from_static("\"\""));
    let mut response = if headers
        .get(header::IF_NONE_MATCH)
        .is_some_and(|v| v.as_bytes() == asset.etag.as_bytes())
    {
        StatusCode::NOT_MODIFIED.into_response()
    } else if accepts_gzip(&headers) {
        let mut r = asset.gzipped.clone().into_response();
        r.headers_mut()
            .insert(header::CONTENT_ENCODING, HeaderValue::from_static("gzip"));
        r
    } else {
        asset.plain.into_response()
    };
    let h = response.headers_mut();
    h.insert(header::ETAG, etag);
    h.insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static(asset.content_type),
    );
    h.insert(header::VARY, HeaderValue::from_static("Accept-Encoding"));
    h.insert(
        header::CACHE_CONTROL,
        HeaderValue::from_static("public, max-age=31536000, immutable"),
    );
    h.insert(
        header::X_CONTENT_TYPE_OPTIONS,
        HeaderValue::from_static("nosniff"),
    );
    response
}

/// An HTML page, gzipped when the browser takes it, never cached, under the console's CSP.
pub fn html(headers: &HeaderMap, status: StatusCode, page: String) -> Response {
    let mut response = if accepts_gzip(headers) {
        let mut r = (status, gzip(page.as_bytes())).into_response();
        r.headers_mut()
            .insert(header::CONTENT_ENCODING, HeaderValue::from_static("gzip"));
        r
    } else {
        (status, page).into_response()
    };
    let h = response.headers_mut();
    h.insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("text/html; charset=utf-8"),
    );
    h.insert(header::VARY, HeaderValue::from_static("Accept-Encoding"));
    h.insert(header::CACHE_CONTROL, HeaderValue::from_static("no-store"));
    h.insert(
        header::CONTENT_SECURITY_POLICY,
        HeaderValue::from_static(CONTENT_SECURITY_POLICY),
    );
    h.insert(
        header::X_CONTENT_TYPE_OPTIONS,
        HeaderValue::from_static("nosniff"),
    );
    h.insert(
        header::REFERRER_POLICY,
        HeaderValue::from_static("no-referrer"),
    );
    response
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The budget of decision 0019: script and stylesheet together, gzipped.
    const ASSETS_GZIP_BYTES_MAX: usize = 30 * 1024;

    #[test]
    fn the_assets_are_within_their_budget_and_gzip_round_trips() {
        let total = asset("console.js").unwrap().gzipped.len()
            + asset("console.css").unwrap().gzipped.len();
        assert!(total < ASSETS_GZIP_BYTES_MAX, "{total} bytes gzipped");
        let mut plain = Vec::new();
        use std::io::Read as _;
        flate2::read::GzDecoder::new(&asset("console.js").unwrap().gzipped[..])
            .read_to_end(&mut plain)
            .unwrap();
        assert_eq!(plain, SCRIPT.as_bytes());
        assert!(url("console.css").starts_with("/console/assets/console.css?v="));
    }

    #[test]
    fn gzip_is_taken_only_when_offered() {
        let mut h = HeaderMap::new();
        assert!(!accepts_gzip(&h));
        h.insert(
            header::ACCEPT_ENCODING,
            HeaderValue::from_static("br, gzip;q=0.8"),
        );
        assert!(accepts_gzip(&h));
        h.insert(header::ACCEPT_ENCODING, HeaderValue::from_static("gzipx"));
        assert!(!accepts_gzip(&h));
    }
}
