//! The e-mail alert sink: one message per finding when it opens and one
//! when it resolves, over SMTP with STARTTLS (`smtp://`) or implicit TLS
//! (`smtps://`), never in the clear. lettre speaks SMTP; this module makes
//! the message and the transport from the sink's config.

use lettre::message::header::{ContentType, HeaderName, HeaderValue};
use lettre::message::Mailbox;
use lettre::transport::smtp::authentication::Credentials;
use lettre::transport::smtp::client::{Certificate, Tls, TlsParameters};
use lettre::{AsyncSmtpTransport, AsyncTransport, Message, Tokio1Executor};

use crate::config::AlertSinkConfig;
use crate::model::hex;
use crate::proto::{Finding, FindingState, NodeFinding};

pub struct Mailer {
    transport: AsyncSmtpTransport<Tokio1Executor>,
    from: Mailbox,
    to: Vec<Mailbox>,
}

impl Mailer {
    /// The transport for `cfg`. Errors name the field at fault; the config
    /// check has already refused most of them.
    pub fn new(cfg: &AlertSinkConfig) -> Result<Mailer, String> {
        let url = reqwest::Url::parse(&cfg.url).map_err(|e| format!("url: {e}"))?;
        let host = url.host_str().ok_or("url: no host")?.to_string();
        let implicit = url.scheme() == "smtps";
        let port = url.port().unwrap_or(if implicit { 465 } else { 587 });
        let mut tls = TlsParameters::builder(host.clone());
        if let Some(ca) = &cfg.ca {
            let pem = std::fs::read(ca).map_err(|e| format!("ca: {}: {e}", ca.display()))?;
            let cert = Certificate::from_pem(&pem).map_err(|e| format!("ca: {e}"))?;
            tls = tls.add_root_certificate(cert);
        }
        let tls = tls.build_rustls().map_err(|e| format!("TLS: {e}"))?;
        let mut builder = AsyncSmtpTransport::<Tokio1Executor>::builder_dangerous(host)
            .port(port)
            .tls(if implicit {
                Tls::Wrapper(tls)
            } else {
                Tls::Required(tls)
            })
            .timeout(Some(cfg.timeout));
        if let (Some(user), Some(file)) = (&cfg.username, &cfg.password_file) {
            let password = std::fs::read_to_string(file)
                .map_err(|e| format!("password_file: {}: {e}", file.display()))?;
            builder = builder.credentials(Credentials::new(
                user.clone(),
                password.trim_end_matches(['\n', '\r']).to_string(),
            ));
        }
        let mailbox = |s: &str, field: &str| {
            s.parse::<Mailbox>()
                .map_err(|e| format!("{field}: {s:?}: {e}"))
        };
        Ok(Mailer {
            transport: builder.build(),
            from: mailbox(cfg.from.as_deref().unwrap_or(""), "from")?,
            to: cfg
                .to
                .iter()
                .map(|t| mailbox(t, "to"))
                .collect::<Result<_, _>>()?,
        })
    }

    /// Sends the message for `nf` to every recipient, once.
    pub async fn send(&self, nf: &NodeFinding) -> Result<(), String> {
        let message = message(&self.from, &self.to, nf)?;
        self.transport
            .send(message)
            .await
            .map(|_| ())
            .map_err(|e| crate::error_chain(&e))
    }
}

/// The subject line: state, severity, kind and where.
pub fn subject(nf: &NodeFinding, f: &Finding) -> String {
    let word = match f.state() {
        FindingState::Resolved => "RESOLVED",
        FindingState::Occurred => "OCCURRED",
        _ => "FIRING",
    };
    format!(
        "[{word}] {} {} on {}",
        f.severity().label(),
        f.kind().label(),
        super::alert::subject(nf, f)
    )
}

/// The plain-text body: what happened, whose fault it is and why, and the
/// finding's fields an operator looks up next.
pub fn body(nf: &NodeFinding, f: &Finding) -> String {
    let mut lines = vec![
        f.summary.clone(),
        String::new(),
        format!(
            "whose fault: {} ({})",
            f.verdict().label(),
            f.verdict_reason
        ),
        format!("network:     {}", f.network),
        format!(
            "node:        {}",
            if nf.node_id.is_empty() {
                "(the network)"
            } else {
                &nf.node_id
            }
        ),
        format!("height:      {}", f.height),
        format!(
            "opened:      {}",
            super::alert::rfc3339(f.opened_at_unix_ms)
        ),
    ];
    if f.state() == FindingState::Resolved {
        lines.push(format!(
            "resolved:    {}",
            super::alert::rfc3339(f.resolved_at_unix_ms)
        ));
    }
    if !f.nodes.is_empty() {
        lines.push(format!("nodes:       {}", f.nodes.join(", ")));
    }
    for g in &f.groups {
        lines.push(format!(
            "branch:      {} held by {}{}",
            hex(&g.hash),
            g.node_ids.join(", "),
            if g.canonical { " (canonical)" } else { "" }
        ));
    }
    lines.push(format!("finding id:  {}", f.id));
    lines.push(String::new());
    lines.push(format!(
        "outpost query findings --node {}",
        if nf.node_id.is_empty() {
            format!("@{}", f.network)
        } else {
            nf.node_id.clone()
        }
    ));
    lines.join("\n") + "\n"
}

/// The header that names the finding, so that a mail filter or a reply
/// thread can follow one finding from open to resolved.
const FINDING_HEADER: &str = "X-Outpost-Finding-Id";

fn message(from: &Mailbox, to: &[Mailbox], nf: &NodeFinding) -> Result<Message, String> {
    let f = nf.finding.as_ref().ok_or("no finding")?;
    let mut m = Message::builder()
        .from(from.clone())
        .subject(subject(nf, f))
        .header(ContentType::TEXT_PLAIN);
    for t in to {
        m = m.to(t.clone());
    }
    let mut message = m.body(body(nf, f)).map_err(|e| e.to_string())?;
    message.headers_mut().insert_raw(HeaderValue::new(
        HeaderName::new_from_ascii_str(FINDING_HEADER),
        f.id.clone(),
    ));
    Ok(message)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::proto::{FindingKind, Severity, Verdict};

    fn finding(state: FindingState) -> NodeFinding {
        NodeFinding {
            node_id: "node-2".into(),
            finding: Some(Finding {
                id: "divergence:node-2:h38".into(),
                kind: FindingKind::Divergence as i32,
                severity: Severity::Critical as i32,
                state: state as i32,
                network: "devnet".into(),
                height: 38,
                summary: "node-2 diverges from devnet at height 38".into(),
                verdict: Verdict::Node as i32,
                verdict_reason: "3 of 4 nodes hold the other block".into(),
                opened_at_unix_ms: 1_700_000_000_000,
                resolved_at_unix_ms: 1_700_000_060_000,
                ..Default::default()
            }),
        }
    }

    #[test]
    fn subject_and_body_say_what_whose_fault_and_where() {
        let nf = finding(FindingState::Open);
        let f = nf.finding.as_ref().unwrap();
        assert_eq!(
            subject(&nf, f),
            "[FIRING] critical divergence on node-2 (devnet)"
        );
        let text = body(&nf, f);
        assert!(
            text.starts_with("node-2 diverges from devnet at height 38\n"),
            "{text}"
        );
        assert!(
            text.contains("whose fault: node (3 of 4 nodes hold the other block)"),
            "{text}"
        );
        assert!(
            text.contains("finding id:  divergence:node-2:h38"),
            "{text}"
        );
        assert!(!text.contains("resolved:"), "{text}");
        let nf = finding(FindingState::Resolved);
        let f = nf.finding.as_ref().unwrap();
        assert!(subject(&nf, f).starts_with("[RESOLVED] "));
        assert!(body(&nf, f).contains("resolved:    2023-11-14T22:14:20.000Z"));
    }

    #[test]
    fn the_message_names_every_recipient_and_the_finding() {
        let from: Mailbox = "Outpost <outpost@example.net>".parse().unwrap();
        let to: Vec<Mailbox> = ["a@example.net", "b@example.net"]
            .iter()
            .map(|t| t.parse().unwrap())
            .collect();
        let m = message(&from, &to, &finding(FindingState::Open)).unwrap();
        let raw = String::from_utf8(m.formatted()).unwrap();
        assert!(raw.contains("To: a@example.net, b@example.net"), "{raw}");
        assert!(
            raw.contains("X-Outpost-Finding-Id: divergence:node-2:h38"),
            "{raw}"
        );
        assert!(
            raw.contains("Subject: [FIRING] critical divergence on node-2 (devnet)"),
            "{raw}"
        );
    }
}
