//! JSON-RPC 2.0 over HTTP, with a per-call timeout, a reply size cap and
//! latency recording. Errors say what went wrong; nothing here panics on
//! what a node sends.

use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use serde_json::{json, Value};

use super::SourceError;
use crate::latency::RpcTimings;

/// How the node wants callers to prove who they are. Secrets stay in files
/// and are read at each call; errors name the file, never its contents.
#[derive(Debug, Clone, Default, PartialEq)]
pub enum Auth {
    #[default]
    None,
    /// A `user:password` cookie file (Bitcoin Core's `.cookie`).
    Cookie(std::path::PathBuf),
    User {
        user: String,
        password_file: std::path::PathBuf,
    },
    /// A token sent in a header (`X-API-Key`, `X-Algo-API-Token`).
    Header {
        name: &'static str,
        value_file: std::path::PathBuf,
    },
}

enum Credentials {
    Basic(String, String),
    Header(&'static str, String),
}

impl Auth {
    fn credentials(&self) -> Result<Option<Credentials>, SourceError> {
        let read = |path: &std::path::Path| {
            std::fs::read_to_string(path).map_err(|e| {
                SourceError::Unreachable(format!("cannot read {}: {e}", path.display()))
            })
        };
        match self {
            Auth::None => Ok(None),
            Auth::Cookie(path) => {
                let text = read(path)?;
                let (user, pass) = text.trim().split_once(':').ok_or_else(|| {
                    SourceError::Unreachable(format!(
                        "{}: not a user:password cookie",
                        path.display()
                    ))
                })?;
                Ok(Some(Credentials::Basic(user.to_string(), pass.to_string())))
            }
            Auth::User {
                user,
                password_file,
            } => Ok(Some(Credentials::Basic(
                user.clone(),
                read(password_file)?.trim().to_string(),
            ))),
            Auth::Header { name, value_file } => Ok(Some(Credentials::Header(
                name,
                read(value_file)?.trim().to_string(),
            ))),
        }
    }
}

pub struct JsonRpcClient {
    auth: Auth,
    http: reqwest::Client,
    url: String,
    /// `url`, parsed once rather than at every call.
    parsed: Option<reqwest::Url>,
    timeout: Duration,
    max_reply_bytes: usize,
    next_id: AtomicU64,
    timings: RpcTimings,
}

impl JsonRpcClient {
    pub fn new(url: &str, timeout: Duration, max_reply_bytes: usize, timings: RpcTimings) -> Self {
        let http = reqwest::Client::builder()
            .connect_timeout(timeout)
            // A redirect would carry the token headers to wherever it points.
            .redirect(reqwest::redirect::Policy::none())
            .pool_max_idle_per_host(2)
            .build()
            .unwrap_or_default();
        JsonRpcClient {
            auth: Auth::None,
            http,
            url: url.to_string(),
            parsed: reqwest::Url::parse(url).ok(),
            timeout,
            max_reply_bytes,
            next_id: AtomicU64::new(1),
            timings,
        }
    }

    /// Sends these credentials with every call.
    pub fn with_auth(mut self, auth: Auth) -> Self {
        self.auth = auth;
        self
    }

    /// Calls `method` and returns its `result`. Every call is timed; a
    /// failed one counts as an error, except a node saying it lacks the
    /// method (sources ask for optional ones).
    pub async fn call(&self, method: &str, params: Value) -> Result<Value, SourceError> {
        let started = Instant::now();
        let result = match tokio::time::timeout(self.timeout, self.call_inner(method, params)).await
        {
            Ok(r) => r,
            Err(_) => Err(SourceError::Timeout(self.timeout)),
        };
        let failed = result.as_ref().is_err_and(|e| !e.is_method_not_found());
        self.timings.record(method, started.elapsed(), failed);
        result
    }

    /// GETs `path` (with its query string) below the base URL and returns
    /// the JSON reply, for REST APIs (TON's HTTP API, Algorand's algod).
    /// Timed per path, without the query.
    pub async fn get(&self, path: &str) -> Result<Value, SourceError> {
        let name = path.split('?').next().unwrap_or(path);
        self.timed_get(path, name, |status, buf| {
            match serde_json::from_slice::<Value>(&buf) {
                Ok(v) if status.is_success() => Ok(v),
                // An error reply with a body says why.
                Ok(v) => Err(SourceError::Rpc {
                    code: i64::from(status.as_u16()),
                    message: v.to_string().chars().take(200).collect(),
                }),
                Err(e) if status.is_success() => {
                    Err(SourceError::Malformed(format!("{name}: {e}")))
                }
                Err(_) => Err(SourceError::Http(status.as_u16())),
            }
        })
        .await
    }

    /// GETs the base URL itself and returns the reply as text (a Prometheus
    /// scrape). Timed as `name`.
    pub async fn get_text(&self, name: &str) -> Result<String, SourceError> {
        self.timed_get("", name, |status, buf| {
            if !status.is_success() {
                return Err(SourceError::Http(status.as_u16()));
            }
            String::from_utf8(buf)
                .map_err(|e| SourceError::Malformed(format!("{name}: not UTF-8 text: {e}")))
        })
        .await
    }

    async fn timed_get<T>(
        &self,
        path: &str,
        name: &str,
        decode: impl FnOnce(reqwest::StatusCode, Vec<u8>) -> Result<T, SourceError>,
    ) -> Result<T, SourceError> {
        let started = Instant::now();
        let url = format!("{}{path}", self.url.trim_end_matches('/'));
        let result = match tokio::time::timeout(self.timeout, async {
            let (status, buf) = self.send(self.http.get(&url)).await?;
            decode(status, buf)
        })
        .await
        {
            Ok(r) => r,
            Err(_) => Err(SourceError::Timeout(self.timeout)),
        };
        self.timings
            .record(name, started.elapsed(), result.is_err());
        result
    }

    /// Sends with the credentials and reads the body up to the size cap.
    async fn send(
        &self,
        mut req: reqwest::RequestBuilder,
    ) -> Result<(reqwest::StatusCode, Vec<u8>), SourceError> {
        match self.auth.credentials()? {
            Some(Credentials::Basic(user, pass)) => req = req.basic_auth(user, Some(pass)),
            Some(Credentials::Header(name, value)) => req = req.header(name, value),
            None => {}
        }
        let mut resp = req.send().await.map_err(|e| {
            if refused(&e) {
                SourceError::Refused(crate::error_chain(&e))
            } else {
                SourceError::Unreachable(crate::error_chain(&e))
            }
        })?;
        let status = resp.status();
        if status.is_redirection() {
            let to = resp
                .headers()
                .get(reqwest::header::LOCATION)
                .and_then(|l| l.to_str().ok())
                .unwrap_or("")
                .chars()
                .take(200)
                .collect();
            return Err(SourceError::Redirected {
                status: status.as_u16(),
                to,
            });
        }
        if let Some(len) = resp.content_length() {
            if len as usize > self.max_reply_bytes {
                return Err(SourceError::TooLarge {
                    limit: self.max_reply_bytes,
                });
            }
        }
        let mut buf = Vec::new();
        while let Some(chunk) = resp
            .chunk()
            .await
            .map_err(|e| SourceError::Unreachable(crate::error_chain(&e)))?
        {
            if buf.len() + chunk.len() > self.max_reply_bytes {
                return Err(SourceError::TooLarge {
                    limit: self.max_reply_bytes,
                });
            }
            buf.extend_from_slice(&chunk);
        }
        Ok((status, buf))
    }

    async fn call_inner(&self, method: &str, params: Value) -> Result<Value, SourceError> {
        let id = self.next_id.fetch_add(1, Ordering::Relaxed);
        let body = json!({"jsonrpc": "2.0", "id": id, "method": method, "params": params});
        let post = match &self.parsed {
            Some(url) => self.http.post(url.clone()),
            // Refused by reqwest, with its own words for what is wrong.
            None => self.http.post(&self.url),
        };
        let (status, buf) = self.send(post.json(&body)).await?;
        // Refused credentials, whatever the body says.
        if matches!(status.as_u16(), 401 | 403) {
            return Err(SourceError::Http(status.as_u16()));
        }
        let reply: Value = match serde_json::from_slice(&buf) {
            Ok(v) => v,
            Err(e) if status.is_success() => {
                return Err(SourceError::Malformed(format!("{method}: {e}")))
            }
            Err(_) => return Err(SourceError::Http(status.as_u16())),
        };
        if let Some(err) = reply.get("error").filter(|e| !e.is_null()) {
            // Some nodes (CometBFT) say what went wrong in `data`.
            let message = match (
                err.get("message").and_then(Value::as_str),
                err.get("data").and_then(Value::as_str),
            ) {
                (Some(m), Some(d)) => format!("{m}: {d}"),
                (Some(m), None) => m.to_string(),
                (None, Some(d)) => d.to_string(),
                (None, None) => String::new(),
            };
            return Err(SourceError::Rpc {
                code: err.get("code").and_then(Value::as_i64).unwrap_or(0),
                message: message.chars().take(200).collect(),
            });
        }
        if !status.is_success() {
            return Err(SourceError::Http(status.as_u16()));
        }
        match reply.get("result") {
            Some(v) => Ok(v.clone()),
            None => Err(SourceError::Malformed(format!(
                "{method}: reply has neither result nor error"
            ))),
        }
    }
}

/// Parses a 0x-prefixed hex quantity.
pub fn parse_quantity(v: &Value, what: &str) -> Result<u64, SourceError> {
    let s = v
        .as_str()
        .ok_or_else(|| SourceError::Malformed(format!("{what}: expected a hex string, got {v}")))?;
    let digits = s
        .strip_prefix("0x")
        .ok_or_else(|| SourceError::Malformed(format!("{what}: {s:?} lacks 0x")))?;
    u64::from_str_radix(digits, 16)
        .map_err(|_| SourceError::Malformed(format!("{what}: {s:?} is not a hex quantity")))
}

/// Whether a request failed because nothing accepted the connection.
fn refused(e: &reqwest::Error) -> bool {
    let mut cause: Option<&(dyn std::error::Error + 'static)> = Some(e);
    while let Some(c) = cause {
        if let Some(io) = c.downcast_ref::<std::io::Error>() {
            if io.kind() == std::io::ErrorKind::ConnectionRefused {
                return true;
            }
        }
        cause = c.source();
    }
    false
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn quantities() {
        assert_eq!(parse_quantity(&json!("0x10"), "n").unwrap(), 16);
        assert!(parse_quantity(&json!("10"), "n").is_err());
        assert!(parse_quantity(&json!(16), "n").is_err());
        assert!(parse_quantity(&json!("0xzz"), "n").is_err());
    }

    /// Serves one connection per accept with `reply`; returns the address
    /// and what each request carried.
    async fn raw_server(
        reply: String,
    ) -> (
        std::net::SocketAddr,
        std::sync::Arc<std::sync::Mutex<Vec<String>>>,
    ) {
        use tokio::io::{AsyncReadExt, AsyncWriteExt};
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let seen = std::sync::Arc::new(std::sync::Mutex::new(Vec::new()));
        let log = seen.clone();
        tokio::spawn(async move {
            while let Ok((mut s, _)) = listener.accept().await {
                let mut buf = vec![0u8; 8192];
                let n = s.read(&mut buf).await.unwrap_or(0);
                log.lock()
                    .unwrap()
                    .push(String::from_utf8_lossy(&buf[..n]).into_owned());
                let _ = s.write_all(reply.as_bytes()).await;
            }
        });
        (addr, seen)
    }

    #[tokio::test]
    async fn a_redirect_is_not_followed_with_the_token() {
        let (elsewhere, seen_elsewhere) = raw_server(
            "HTTP/1.1 200 OK\r\ncontent-length: 2\r\nconnection: close\r\n\r\n{}".into(),
        )
        .await;
        let (node, _) = raw_server(format!(
            "HTTP/1.1 307 Temporary Redirect\r\nlocation: http://{elsewhere}/\r\ncontent-length: 0\r\nconnection: close\r\n\r\n"
        ))
        .await;
        let dir = tempfile::tempdir().unwrap();
        let token = dir.path().join("token");
        std::fs::write(&token, "s3cret-token").unwrap();
        let client = JsonRpcClient::new(
            &format!("http://{node}"),
            Duration::from_secs(2),
            1 << 20,
            RpcTimings::new(),
        )
        .with_auth(Auth::Header {
            name: "X-API-Key",
            value_file: token,
        });
        let e = client.get("/api/v2/status").await.unwrap_err();
        assert!(
            matches!(e, SourceError::Redirected { status: 307, .. }),
            "{e}"
        );
        assert!(e.to_string().contains(&elsewhere.to_string()), "{e}");
        let leaked = seen_elsewhere.lock().unwrap().clone();
        assert!(leaked.is_empty(), "the other host got: {leaked:?}");
    }

    #[tokio::test]
    async fn failures_say_whether_nothing_listens_the_credentials_were_refused_or_time_ran_out() {
        use crate::chain::Cause;
        let client = |addr: String, timeout_ms| {
            JsonRpcClient::new(
                &format!("http://{addr}"),
                Duration::from_millis(timeout_ms),
                1 << 20,
                RpcTimings::new(),
            )
        };
        // A port nothing listens on: bound, then closed.
        let closed = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let addr = closed.local_addr().unwrap().to_string();
        drop(closed);
        let e = client(addr, 2000)
            .call("eth_blockNumber", json!([]))
            .await
            .unwrap_err();
        assert_eq!(e.cause(), Cause::Refused, "{e}");

        let (denied, _) = raw_server(
            "HTTP/1.1 401 Unauthorized\r\ncontent-length: 24\r\nconnection: close\r\n\r\n{\"error\":\"unauthorized\"}".into(),
        )
        .await;
        let e = client(denied.to_string(), 2000)
            .call("eth_blockNumber", json!([]))
            .await
            .unwrap_err();
        assert_eq!(e.cause(), Cause::Denied(401), "{e}");

        // Accepts and never answers.
        let silent = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = silent.local_addr().unwrap().to_string();
        let e = client(addr, 200)
            .call("eth_blockNumber", json!([]))
            .await
            .unwrap_err();
        assert_eq!(e.cause(), Cause::TimedOut, "{e}");
        drop(silent);
    }
}
