//! A real headless Chromium, driven over the DevTools protocol: open a page,
//! evaluate JavaScript in it, save a screenshot. Debian's `chromium`
//! package; tests/run.sh installs it.

use std::path::Path;
use std::process::Stdio;
use std::time::Duration;

use base64::Engine;
use futures_util::{SinkExt, StreamExt};
use serde_json::{json, Value};
use tokio::io::{AsyncBufReadExt, BufReader};
use tokio::process::{Child, Command};
use tokio_tungstenite::tungstenite::Message;

type Socket =
    tokio_tungstenite::WebSocketStream<tokio_tungstenite::MaybeTlsStream<tokio::net::TcpStream>>;

pub const CHROMIUM: &str = "/usr/bin/chromium";

pub struct Browser {
    /// Killed when the browser is dropped (`kill_on_drop`).
    _child: Child,
    page: Socket,
    next_id: u64,
    _profile: tempfile::TempDir,
}

impl Browser {
    /// Chromium with a fresh profile, showing `url`.
    pub async fn open(url: &str) -> Browser {
        assert!(
            Path::new(CHROMIUM).exists(),
            "{CHROMIUM} is missing: install Debian's chromium (tests/run.sh does)"
        );
        let profile = tempfile::tempdir().expect("profile dir");
        let mut child = Command::new(CHROMIUM)
            .args([
                "--headless",
                "--no-sandbox",
                "--disable-gpu",
                "--disable-dev-shm-usage",
                "--disable-background-networking",
                "--disable-component-update",
                "--disable-extensions",
                "--no-first-run",
                "--window-size=1280,900",
                "--remote-debugging-address=127.0.0.1",
                "--remote-debugging-port=0",
            ])
            .arg(format!("--user-data-dir={}", profile.path().display()))
            .arg(url)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .kill_on_drop(true)
            .spawn()
            .expect("chromium starts");
        // Chromium names its DevTools port on stderr; the rest of stderr is
        // drained so that it never blocks on a full pipe.
        let mut lines = BufReader::new(child.stderr.take().unwrap()).lines();
        let (found, port) = tokio::sync::oneshot::channel();
        tokio::spawn(async move {
            let mut found = Some(found);
            let mut seen = Vec::new();
            while let Ok(Some(line)) = lines.next_line().await {
                if let Some(rest) = line.strip_prefix("DevTools listening on ws://127.0.0.1:") {
                    let port: u16 = rest.split('/').next().unwrap_or("").parse().unwrap_or(0);
                    if let Some(f) = found.take() {
                        let _ = f.send(Ok(port));
                    }
                } else if found.is_some() {
                    seen.push(line);
                }
            }
            if let Some(f) = found.take() {
                let _ = f.send(Err(seen.join("\n")));
            }
        });
        let port = match tokio::time::timeout(Duration::from_secs(30), port).await {
            Ok(Ok(Ok(port))) => port,
            Ok(Ok(Err(stderr))) => panic!("chromium ended before it served DevTools:\n{stderr}"),
            _ => panic!("chromium did not name its DevTools port within 30 s"),
        };
        let targets: Value = reqwest::get(format!("http://127.0.0.1:{port}/json/list"))
            .await
            .expect("DevTools target list")
            .json()
            .await
            .expect("DevTools target list is JSON");
        let ws = targets
            .as_array()
            .and_then(|t| t.iter().find(|t| t["type"] == "page"))
            .and_then(|t| t["webSocketDebuggerUrl"].as_str())
            .unwrap_or_else(|| panic!("no page among DevTools targets: {targets}"))
            .to_string();
        let (page, _) = tokio_tungstenite::connect_async(ws)
            .await
            .expect("DevTools page socket");
        Browser {
            _child: child,
            page,
            next_id: 0,
            _profile: profile,
        }
    }

    /// One DevTools call; the events that arrive meanwhile are passed over.
    pub async fn call(&mut self, method: &str, params: Value) -> Value {
        self.next_id += 1;
        let id = self.next_id;
        let msg = json!({"id": id, "method": method, "params": params}).to_string();
        self.page
            .send(Message::text(msg))
            .await
            .expect("DevTools send");
        loop {
            let reply = tokio::time::timeout(Duration::from_secs(30), self.page.next())
                .await
                .unwrap_or_else(|_| panic!("no answer to {method} within 30 s"))
                .unwrap_or_else(|| panic!("DevTools closed during {method}"))
                .expect("DevTools read");
            let Message::Text(text) = reply else { continue };
            let v: Value = serde_json::from_str(&text).expect("DevTools JSON");
            if v["id"] == id {
                if let Some(e) = v.get("error") {
                    panic!("{method} failed: {e}");
                }
                return v["result"].clone();
            }
        }
    }

    /// The value of a JavaScript expression in the page.
    pub async fn eval(&mut self, expression: &str) -> Value {
        let r = self
            .call(
                "Runtime.evaluate",
                json!({"expression": expression, "returnByValue": true, "awaitPromise": true}),
            )
            .await;
        if let Some(e) = r.get("exceptionDetails") {
            panic!("{expression} threw: {e}");
        }
        r["result"]["value"].clone()
    }

    /// Saves what the page shows now as a PNG.
    pub async fn screenshot(&mut self, path: &Path) {
        let r = self
            .call("Page.captureScreenshot", json!({"format": "png"}))
            .await;
        let png = base64::engine::general_purpose::STANDARD
            .decode(r["data"].as_str().expect("screenshot data"))
            .expect("screenshot is base64");
        if let Some(dir) = path.parent() {
            std::fs::create_dir_all(dir).expect("artifact dir");
        }
        std::fs::write(path, png).expect("screenshot written");
    }
}
