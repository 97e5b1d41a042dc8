//! The live fleet page, on the aggregator's metrics listener: `/` is the
//! page, `/fleet.js` and `/fleet.css` its script and style (all three built
//! into the binary, nothing to install), `/fleet.json` the fleet view
//! (`{"networks": [...]}`, each as `query fleet --json` prints it), and
//! `/events` the same view as
//! server-sent events, sent again each time it changes.
//!
//! The view is made once a second, and only while someone watches; each
//! watcher holds one shared copy of the newest view, so a slow or stalled
//! browser costs one connection and never a queue. Watchers are capped, and
//! `/fleet.json` answers from the newest view when it is recent: no rate of
//! requests makes the view (a walk of the fleet under its lock) more than
//! twice a second.

use std::convert::Infallible;
use std::sync::Arc;
use std::time::{Duration, Instant};

use http_body_util::{BodyExt, StreamBody};
use hyper::body::{Bytes, Frame};
use hyper::Response;
use serde_json::{json, Value};
use tokio::sync::{watch, Mutex, Semaphore};
use tokio_stream::wrappers::{IntervalStream, WatchStream};
use tokio_stream::StreamExt;

use crate::aggregator::fleet::Fleet;
use crate::health::{full, Body, Pages};
use crate::operator::networks_json;
use crate::proto::NetworkView;

const PAGE: &str = include_str!("page/fleet.html");
const SCRIPT: &str = include_str!("page/fleet.js");
const STYLE: &str = include_str!("page/fleet.css");

/// How often the view is made while someone watches.
const REFRESH: Duration = Duration::from_secs(1);
/// A comment line on a quiet stream, so that proxies keep it open.
const KEEPALIVE: Duration = Duration::from_secs(15);
/// Browsers watching at once; one more is refused with 503.
pub const MAX_WATCHERS: usize = 64;

/// The fleet view as the page reads it.
pub fn view_json(networks: &[NetworkView]) -> Value {
    json!({ "networks": networks_json(networks) })
}

/// The newest view, shared by every watcher.
pub struct Feed {
    fleet: Arc<Fleet>,
    newest: watch::Sender<Arc<str>>,
    /// When `newest` was made; held while it is made again.
    made: Mutex<Option<Instant>>,
    watchers: Arc<Semaphore>,
}

impl Feed {
    /// Starts making the view for whoever watches.
    pub fn start(fleet: Arc<Fleet>) -> Arc<Feed> {
        let (newest, _) = watch::channel(Arc::from(""));
        let feed = Arc::new(Feed {
            fleet,
            newest,
            made: Mutex::new(None),
            watchers: Arc::new(Semaphore::new(MAX_WATCHERS)),
        });
        let keeper = feed.clone();
        tokio::spawn(async move {
            let mut tick = tokio::time::interval(REFRESH);
            tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
            loop {
                tick.tick().await;
                if keeper.newest.receiver_count() > 0 {
                    keeper.fresh().await;
                }
            }
        });
        feed
    }

    /// The newest view, made again when it is older than half of
    /// `REFRESH`; one making at a time.
    async fn fresh(self: &Arc<Self>) -> Arc<str> {
        let mut made = self.made.lock().await;
        if made.is_some_and(|at| at.elapsed() < REFRESH / 2) {
            return self.newest.borrow().clone();
        }
        let feed = self.clone();
        if let Ok(text) = tokio::task::spawn_blocking(move || feed.text()).await {
            self.newest.send_if_modified(|cur| {
                let changed = **cur != *text;
                if changed {
                    *cur = Arc::from(text);
                }
                changed
            });
            *made = Some(Instant::now());
        }
        self.newest.borrow().clone()
    }

    fn text(&self) -> String {
        view_json(&self.fleet.view("", crate::model::now_unix_ms())).to_string()
    }

    /// The paths this feed serves.
    pub fn pages(self: &Arc<Self>) -> Pages {
        let feed = self.clone();
        Arc::new(move |path: &str| {
            let resp = match path {
                "/" | "/index.html" => asset("text/html; charset=utf-8", PAGE),
                "/fleet.js" => asset("text/javascript; charset=utf-8", SCRIPT),
                "/fleet.css" => asset("text/css; charset=utf-8", STYLE),
                "/fleet.json" => {
                    let feed = feed.clone();
                    return Some(Box::pin(async move {
                        let text = feed.fresh().await;
                        response("application/json", full(text.to_string()))
                    }));
                }
                "/events" => feed.events(),
                _ => return None,
            };
            Some(Box::pin(async move { resp }))
        })
    }

    /// `text/event-stream`: the newest view now, then each change.
    fn events(&self) -> Response<Body> {
        let Ok(permit) = self.watchers.clone().try_acquire_owned() else {
            let mut r = response(
                "text/plain; charset=utf-8",
                full(format!(
                    "{MAX_WATCHERS} browsers watch the fleet already; try again later\n"
                )),
            );
            *r.status_mut() = hyper::StatusCode::SERVICE_UNAVAILABLE;
            return r;
        };
        // Until the clock has made a first view, there is nothing to send.
        let views = WatchStream::new(self.newest.subscribe())
            .filter(|text: &Arc<str>| !text.is_empty())
            .map(|text| Bytes::from(format!("event: fleet\ndata: {text}\n\n")));
        let mut quiet = tokio::time::interval(KEEPALIVE);
        quiet.reset();
        let keepalive = IntervalStream::new(quiet).map(|_| Bytes::from_static(b": quiet\n\n"));
        let stream = views.merge(keepalive).map(move |b| {
            // The permit goes when the browser does.
            let _held = &permit;
            Ok::<_, Infallible>(Frame::data(b))
        });
        let mut r = response("text/event-stream", StreamBody::new(stream).boxed());
        r.headers_mut().insert(
            "cache-control",
            hyper::header::HeaderValue::from_static("no-cache"),
        );
        r
    }
}

fn asset(kind: &'static str, text: &'static str) -> Response<Body> {
    response(kind, full(text))
}

/// A response with the page's headers: nothing runs but its own script.
fn response(kind: &'static str, body: Body) -> Response<Body> {
    let mut r = Response::new(body);
    let h = r.headers_mut();
    use hyper::header::{HeaderValue, CONTENT_TYPE};
    h.insert(CONTENT_TYPE, HeaderValue::from_static(kind));
    h.insert(
        "content-security-policy",
        HeaderValue::from_static("default-src 'self'; frame-ancestors 'none'"),
    );
    h.insert(
        "x-content-type-options",
        HeaderValue::from_static("nosniff"),
    );
    r
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn requests_in_a_burst_share_one_view_and_a_later_one_sees_the_change() {
        let dir = tempfile::tempdir().unwrap();
        let store =
            crate::store::central::CentralStore::open(dir.path(), 1 << 20, Default::default())
                .unwrap();
        let fleet = Fleet::load(
            store,
            Default::default(),
            Arc::default(),
            crate::aggregator::alert::Alerts::start(&[]),
            Arc::default(),
        )
        .unwrap();
        let feed = Feed::start(fleet.clone());
        fleet.know("node-1", "devnet", "ethereum");
        assert!(feed.fresh().await.contains("node-1"));
        fleet.know("node-2", "devnet", "ethereum");
        for _ in 0..100 {
            assert!(
                !feed.fresh().await.contains("node-2"),
                "a burst is answered from the view just made"
            );
        }
        tokio::time::sleep(REFRESH / 2).await;
        assert!(feed.fresh().await.contains("node-2"));
    }

    #[test]
    fn the_page_loads_only_its_own_script_and_style() {
        assert!(PAGE.contains("src=\"fleet.js\""));
        assert!(PAGE.contains("href=\"fleet.css\""));
        assert!(
            !PAGE.contains("<script>"),
            "no inline script: the policy forbids it"
        );
        // The script writes what agents said as text, never as markup.
        assert!(!SCRIPT.contains("innerHTML"));
    }
}
