//! The e-mail alert sink against a real SMTP server (aiosmtpd on loopback):
//! STARTTLS and implicit TLS, a login, several recipients, and one message
//! when a finding opens and one when it resolves.

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use crate::harness::{free_port, wait_for, Agent, AgentOptions, Aggregator, Anvil, World};

const WAIT: Duration = Duration::from_secs(60);

/// aiosmtpd on `port`, saving what it accepts in `out`.
struct Smtp {
    child: Child,
    out: PathBuf,
    port: u16,
}

impl Smtp {
    fn start(world: &World, name: &str, implicit: bool) -> Smtp {
        let pki = world.pki();
        let port = free_port();
        let out = world.path().join(name);
        let script = concat!(env!("CARGO_MANIFEST_DIR"), "/tests/fixtures/smtp/server.py");
        let mut cmd = Command::new("python3");
        cmd.arg(script)
            .args(["--port", &port.to_string()])
            .arg("--cert")
            .arg(pki.cert("aggregator-smtp"))
            .arg("--key")
            .arg(pki.key("aggregator-smtp"))
            .arg("--out")
            .arg(&out)
            .args(["--user", "outpost", "--password", "s3cret pass"])
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit());
        if implicit {
            cmd.arg("--implicit");
        }
        let mut child = cmd
            .spawn()
            .expect("python3 runs tests/fixtures/smtp/server.py (aiosmtpd from PyPI: tests/run.sh installs it)");
        let mut line = String::new();
        std::io::BufRead::read_line(
            &mut std::io::BufReader::new(child.stdout.take().unwrap()),
            &mut line,
        )
        .unwrap();
        assert_eq!(
            line.trim(),
            "ready",
            "the SMTP server did not start (is aiosmtpd installed?)"
        );
        Smtp { child, out, port }
    }

    /// The messages received, in order, each with its envelope recipients.
    fn messages(&self) -> Vec<(String, String)> {
        let mut found = Vec::new();
        for n in 1.. {
            let eml = self.out.join(format!("{n}.eml"));
            let Ok(text) = std::fs::read_to_string(&eml) else {
                break;
            };
            let rcpt = std::fs::read_to_string(self.out.join(format!("{n}.rcpt"))).unwrap();
            found.push((text, rcpt));
        }
        found
    }
}

impl Drop for Smtp {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// The value of header `name` in a raw message.
fn header<'a>(message: &'a str, name: &str) -> Option<&'a str> {
    message
        .lines()
        .take_while(|l| !l.is_empty())
        .find_map(|l| l.strip_prefix(name)?.strip_prefix(": "))
}

#[tokio::test]
async fn an_email_goes_out_once_when_a_finding_opens_and_once_when_it_resolves() {
    let world = World::new();
    outpost::tls::issue_aggregator(&world.pki().dir, "smtp", &["localhost".into()], 2).unwrap();
    let starttls = Smtp::start(&world, "mail-starttls", false);
    let implicit = Smtp::start(&world, "mail-implicit", true);
    let password = world.path().join("smtp-password");
    std::fs::write(&password, "s3cret pass\n").unwrap();
    let sink = |scheme: &str, port: u16| {
        format!(
            "[[alert]]\nkind = \"email\"\nurl = \"{scheme}://localhost:{port}\"\nfrom = \"Outpost <outpost@example.net>\"\nto = [\"oncall@example.net\", \"Ops <ops@example.net>\"]\nusername = \"outpost\"\npassword_file = \"{}\"\nca = \"{}\"\n",
            password.display(),
            world.pki().ca_cert().display()
        )
    };
    let extra = format!(
        "[fleet]\nsilent_after = \"2s\"\n{}{}",
        sink("smtp", starttls.port),
        sink("smtps", implicit.port)
    );
    let agg = Aggregator::start_with(&world, &extra).await;
    let anvil = Anvil::start(&world, "anvil").await;
    anvil.mine(2).await;
    let mut agent = Agent::start(
        &world,
        "node-1",
        &anvil.url(),
        &agg,
        AgentOptions::default(),
    );
    let conn = world.operator(&agg);
    wait_for("node-1 to report", WAIT, &[&agent.log, &agg.log], || {
        let conn = conn.clone();
        async move {
            let mut q = outpost::operator::connect(&conn).await.ok()?;
            crate::spine::node(&mut q, "node-1").await
        }
    })
    .await;

    // The agent dies: agent-silent opens and each server gets one message.
    agent.kill9();
    let (agg_log, agent_log) = (agg.log.clone(), agent.log.clone());
    let logs: [&Path; 2] = [&agg_log, &agent_log];
    for server in [&starttls, &implicit] {
        wait_for("the FIRING e-mail", WAIT, &logs, || async {
            (!server.messages().is_empty()).then_some(())
        })
        .await;
        let (message, rcpt) = server.messages().remove(0);
        assert_eq!(
            header(&message, "Subject"),
            Some("[FIRING] warning agent-silent on node-1 (devnet)"),
            "{message}"
        );
        assert_eq!(
            header(&message, "From"),
            Some("Outpost <outpost@example.net>"),
            "{message}"
        );
        let to = header(&message, "To").unwrap();
        assert!(
            to.contains("oncall@example.net") && to.contains("ops@example.net"),
            "{to}"
        );
        assert_eq!(rcpt, "oncall@example.net\nops@example.net\n");
        assert!(
            header(&message, "X-Outpost-Finding-Id").is_some(),
            "{message}"
        );
        assert!(
            message.contains("whose fault: monitoring-path"),
            "{message}"
        );
    }

    // It comes back: one RESOLVED message for the same finding, and no other.
    agent.restart();
    for server in [&starttls, &implicit] {
        wait_for("the RESOLVED e-mail", WAIT, &logs, || async {
            server
                .messages()
                .iter()
                .any(|(m, _)| {
                    header(m, "Subject")
                        .is_some_and(|s| s.starts_with("[RESOLVED] warning agent-silent"))
                })
                .then_some(())
        })
        .await;
    }
    tokio::time::sleep(Duration::from_secs(3)).await;
    for server in [&starttls, &implicit] {
        // The node mines no more blocks, so a stall may open too; the
        // agent-silent finding has exactly its two messages.
        let all = server.messages();
        let silent: Vec<&String> = all
            .iter()
            .map(|(m, _)| m)
            .filter(|m| {
                header(m, "X-Outpost-Finding-Id").is_some_and(|id| id.starts_with("agent-silent:"))
            })
            .collect();
        let subjects: Vec<Option<&str>> = all.iter().map(|(m, _)| header(m, "Subject")).collect();
        assert_eq!(silent.len(), 2, "{subjects:?}");
        let (opened, resolved) = (silent[0], silent[1]);
        assert!(header(opened, "Subject").unwrap().starts_with("[FIRING] "));
        assert_eq!(
            header(resolved, "Subject"),
            Some("[RESOLVED] warning agent-silent on node-1 (devnet)"),
            "{resolved}"
        );
        assert_eq!(
            header(opened, "X-Outpost-Finding-Id"),
            header(resolved, "X-Outpost-Finding-Id")
        );
        assert!(resolved.contains("resolved:"), "{resolved}");
    }
    let log = std::fs::read_to_string(&agg.log).unwrap();
    let failed: Vec<&str> = log
        .lines()
        .filter(|l| l.contains("alert delivery failed"))
        .collect();
    assert!(failed.is_empty(), "{failed:#?}");
}
