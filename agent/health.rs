//! `/metrics`, `/healthz` and `/readyz` on one plain-HTTP listener, for the
//! aggregator and the agent alike. `/healthz`: the process answers;
//! `/readyz`: whether it can do its job now, as JSON with one line per
//! check, so that a person reading `curl` output and a probe parsing it both
//! get what failed. A listener may serve further pages beside them (the
//! aggregator's fleet page).

use std::convert::Infallible;
use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;

use http_body_util::combinators::BoxBody;
use http_body_util::{BodyExt, Full};
use hyper::body::Bytes;
use hyper::{Request, Response};
use hyper_util::rt::TokioIo;
use serde_json::json;
use tokio::net::TcpListener;

/// One readiness check: what it looked at, and what it found.
#[derive(Debug, Clone, PartialEq)]
pub struct Check {
    pub name: &'static str,
    pub ok: bool,
    pub detail: String,
}

impl Check {
    pub fn ok(name: &'static str, detail: impl Into<String>) -> Check {
        Check {
            name,
            ok: true,
            detail: detail.into(),
        }
    }

    pub fn failed(name: &'static str, detail: impl Into<String>) -> Check {
        Check {
            name,
            ok: false,
            detail: detail.into(),
        }
    }
}

/// `/healthz`: the process is alive, because it answered.
pub fn alive() -> (u16, String) {
    (200, "{\"alive\": true}\n".into())
}

/// `/readyz`: 200 when every check holds, 503 when one does not.
pub fn ready(checks: &[Check]) -> (u16, String) {
    let all = checks.iter().all(|c| c.ok);
    let lines: Vec<String> = checks
        .iter()
        .map(|c| json!({"check": c.name, "ok": c.ok, "detail": c.detail}).to_string())
        .collect();
    let body = format!(
        "{{\"ready\": {all}, \"checks\": [\n{}\n]}}\n",
        lines.join(",\n")
    );
    (if all { 200 } else { 503 }, body)
}

/// The Prometheus text `/metrics` answers, made at each scrape.
pub type MetricsText = Arc<dyn Fn() -> String + Send + Sync>;

/// The readiness checks `/readyz` runs, each time it is asked.
pub type ReadyChecks =
    Arc<dyn Fn() -> Pin<Box<dyn Future<Output = Vec<Check>> + Send>> + Send + Sync>;

/// A response body: whole, or streamed (server-sent events).
pub type Body = BoxBody<Bytes, Infallible>;

/// A whole body.
pub fn full(bytes: impl Into<Bytes>) -> Body {
    Full::new(bytes.into()).boxed()
}

/// Further pages: the response for a path, or `None` when it has none.
pub type Pages =
    Arc<dyn Fn(&str) -> Option<Pin<Box<dyn Future<Output = Response<Body>> + Send>>> + Send + Sync>;

/// Readiness checks that need no waiting.
pub fn ready_now(checks: impl Fn() -> Vec<Check> + Send + Sync + 'static) -> ReadyChecks {
    let checks = Arc::new(checks);
    Arc::new(move || {
        let found = checks();
        Box::pin(async move { found })
    })
}

/// Serves `GET /metrics`, `/healthz`, `/readyz` and `pages` until the
/// process ends.
pub async fn serve(
    listener: TcpListener,
    metrics: MetricsText,
    ready: ReadyChecks,
    pages: Option<Pages>,
) {
    loop {
        let Ok((stream, _)) = listener.accept().await else {
            continue;
        };
        let (metrics, ready, pages) = (metrics.clone(), ready.clone(), pages.clone());
        tokio::spawn(async move {
            let service = hyper::service::service_fn(move |req: Request<hyper::body::Incoming>| {
                let (metrics, ready, pages) = (metrics.clone(), ready.clone(), pages.clone());
                async move {
                    let health = |(code, body): (u16, String)| {
                        Response::builder()
                            .status(code)
                            .header("content-type", "application/json")
                            .body(full(body))
                    };
                    let path = req.uri().path();
                    let resp = match path {
                        "/metrics" => Response::builder()
                            .header(
                                "content-type",
                                "application/openmetrics-text; version=1.0.0; charset=utf-8",
                            )
                            .body(full(metrics())),
                        "/healthz" => health(alive()),
                        "/readyz" => health(self::ready(&ready().await)),
                        _ => match pages.as_ref().and_then(|p| p(path)) {
                            Some(page) => Ok(page.await),
                            None => {
                                Response::builder()
                                    .status(404)
                                    .body(full(if pages.is_some() {
                                        "see /, /metrics, /healthz or /readyz\n"
                                    } else {
                                        "see /metrics, /healthz or /readyz\n"
                                    }))
                            }
                        },
                    };
                    Ok::<_, Infallible>(resp.unwrap_or_else(|_| Response::new(full(""))))
                }
            });
            let _ = hyper::server::conn::http1::Builder::new()
                .serve_connection(TokioIo::new(stream), service)
                .await;
        });
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ready_only_when_every_check_holds_with_one_line_each() {
        let good = [
            Check::ok("store", "open"),
            Check::ok("listener", "accepting"),
        ];
        let (code, body) = ready(&good);
        assert_eq!(code, 200);
        let v: serde_json::Value = serde_json::from_str(&body).unwrap();
        assert_eq!(v["ready"], true);
        assert_eq!(v["checks"].as_array().unwrap().len(), 2);
        assert_eq!(body.lines().filter(|l| l.contains("\"check\"")).count(), 2);

        let bad = [
            Check::ok("store", "open"),
            Check::failed("listener", "accept fails: \"Too many open files\""),
        ];
        let (code, body) = ready(&bad);
        assert_eq!(code, 503);
        let v: serde_json::Value = serde_json::from_str(&body).unwrap();
        assert_eq!(v["ready"], false);
        assert_eq!(v["checks"][1]["ok"], false);
        assert_eq!(
            v["checks"][1]["detail"],
            "accept fails: \"Too many open files\""
        );
        assert_eq!(alive().0, 200);
    }
}
