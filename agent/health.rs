//! `/healthz` and `/readyz`: the process answers, and whether it can do its
//! job now. The body is JSON with one line per check, so that a person
//! reading `curl` output and a probe parsing it both get what failed.

use serde_json::json;

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
