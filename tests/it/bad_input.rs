//! Bad input: malformed configs and a node that answers garbage.

use std::process::Command;
use std::sync::Arc;
use std::time::Duration;

use outpost::proto::{FindingKind, FindingState};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpListener;

use crate::harness::{outpost_bin, wait_for, Agent, AgentOptions, Aggregator, World};
use crate::spine::findings;

#[test]
fn malformed_configs_fail_with_one_clear_line_each() {
    let dir = tempfile::tempdir().unwrap();
    let cases = [
        ("syntax.toml", "node_id = \"n1\"\n[source\n", ":2:"),
        (
            "unknown.toml",
            "node_id = \"n1\"\nnode_idd = \"x\"\n[source]\nkind = \"ethereum\"\nurl = \"http://127.0.0.1:8545\"\n",
            "unknown field `node_idd`",
        ),
        ("neither.toml", "x = 1\n", "neither an agent config"),
    ];
    for (name, text, needle) in cases {
        let path = dir.path().join(name);
        std::fs::write(&path, text).unwrap();
        let out = Command::new(outpost_bin())
            .arg("check-config")
            .arg(&path)
            .output()
            .unwrap();
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert_eq!(out.status.code(), Some(1), "{name}: {stderr}");
        assert!(stderr.contains(needle), "{name}: {stderr}");
        assert!(
            stderr.contains(name),
            "{name}: the error names the file: {stderr}"
        );
        assert_eq!(
            stderr.trim().lines().count(),
            1,
            "{name}: one line: {stderr}"
        );
    }

    // Several problems in one file: one line each, and `agent` refuses to start.
    let path = dir.path().join("many.toml");
    std::fs::write(
        &path,
        "node_id = \"n 1\"\n[source]\nkind = \"ethereum\"\nurl = \"not a url\"\n[report]\naggregator = \"http://x:1\"\nca = \"/missing/ca.pem\"\ncert = \"/missing/c.pem\"\nkey = \"/missing/k.pem\"\n",
    )
    .unwrap();
    for args in [vec!["check-config"], vec!["agent", "--config"]] {
        let out = Command::new(outpost_bin())
            .args(&args)
            .arg(&path)
            .output()
            .unwrap();
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert_eq!(out.status.code(), Some(1), "{args:?}: {stderr}");
        for field in [
            "node_id",
            "source.url",
            "report.aggregator",
            "report.ca",
            "report.cert",
            "report.key",
        ] {
            assert!(
                stderr
                    .lines()
                    .any(|l| l.contains(field) && l.contains("many.toml")),
                "{args:?}: no line for {field}: {stderr}"
            );
        }
    }
}

/// How a fake node answers.
#[derive(Clone)]
enum Answer {
    /// All of it at once, with its length.
    Whole(Arc<Vec<u8>>),
    /// This many bytes of JSON-looking text with no length, until the
    /// connection closes.
    Endless(usize),
    /// One byte a second, forever.
    Trickle,
}

/// A fake node on loopback that answers every request as `answer` says.
async fn hostile_node(answer: Answer) -> String {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let url = format!("http://{}", listener.local_addr().unwrap());
    tokio::spawn(async move {
        loop {
            let Ok((mut s, _)) = listener.accept().await else {
                return;
            };
            let answer = answer.clone();
            tokio::spawn(async move {
                let mut buf = vec![0u8; 8192];
                let _ = s.read(&mut buf).await;
                match answer {
                    Answer::Whole(reply) => {
                        let head = format!(
                            "HTTP/1.1 200 OK\r\ncontent-type: application/json\r\ncontent-length: {}\r\nconnection: close\r\n\r\n",
                            reply.len()
                        );
                        let _ = s.write_all(head.as_bytes()).await;
                        let _ = s.write_all(&reply).await;
                    }
                    Answer::Endless(total) => {
                        let head = "HTTP/1.1 200 OK\r\ncontent-type: application/json\r\nconnection: close\r\n\r\n{\"jsonrpc\":\"2.0\",\"id\":1,\"result\":\"";
                        let _ = s.write_all(head.as_bytes()).await;
                        let chunk = vec![b'a'; 1 << 20];
                        for _ in 0..total / chunk.len() {
                            if s.write_all(&chunk).await.is_err() {
                                return;
                            }
                        }
                    }
                    Answer::Trickle => {
                        let head = "HTTP/1.1 200 OK\r\ncontent-type: application/json\r\ncontent-length: 1000\r\n\r\n";
                        let _ = s.write_all(head.as_bytes()).await;
                        loop {
                            if s.write_all(b" ").await.is_err() {
                                return;
                            }
                            tokio::time::sleep(Duration::from_secs(1)).await;
                        }
                    }
                }
            });
        }
    });
    url
}

#[tokio::test]
async fn garbage_and_oversized_replies_do_not_crash_the_agent() {
    let world = World::new();
    let agg = Aggregator::start(&world).await;
    let huge = {
        let mut v = b"{\"jsonrpc\":\"2.0\",\"id\":1,\"result\":\"".to_vec();
        v.extend(std::iter::repeat_n(b'a', 8 << 20));
        v.extend(b"\"}");
        v
    };
    // Nesting past any parser's depth.
    let deep = {
        let mut v = b"{\"jsonrpc\":\"2.0\",\"id\":1,\"result\":".to_vec();
        v.extend(std::iter::repeat_n(b'[', 200_000));
        v.extend(std::iter::repeat_n(b']', 200_000));
        v.push(b'}');
        v
    };
    let whole = |bytes: &[u8]| Answer::Whole(Arc::new(bytes.to_vec()));
    // Each is refused within the call's timeout and the reply cap, and
    // the agent stays up.
    let cases = [
        (
            "garbage",
            whole(b"\x00\xffnot json at all {{{"),
            "malformed reply",
        ),
        (
            "wrongtype",
            whole(br#"{"jsonrpc":"2.0","id":1,"result":{"number":"zz"}}"#),
            "malformed reply",
        ),
        ("huge", whole(&huge), "larger than"),
        ("deep", whole(&deep), "malformed reply"),
        ("endless", Answer::Endless(100 << 20), "larger than"),
        ("trickle", Answer::Trickle, "did not answer within"),
    ];
    let mut agents = Vec::new();
    for (name, answer, _) in &cases {
        let url = hostile_node(answer.clone()).await;
        agents.push(Agent::start(
            &world,
            name,
            &url,
            &agg,
            AgentOptions {
                extra_source: "max_reply_bytes = 1048576",
                ..Default::default()
            },
        ));
    }
    let q = world.query(&agg).await;
    for ((name, _, needle), agent) in cases.iter().zip(agents.iter_mut()) {
        let logs = [agent.log.as_path(), agg.log.as_path()];
        let f = wait_for(
            &format!("{name}: an unreachable finding"),
            Duration::from_secs(30),
            &logs,
            || {
                let mut c = q.clone();
                async move {
                    findings(&mut c, name, FindingKind::Unreachable)
                        .await
                        .into_iter()
                        .find(|f| f.state() == FindingState::Open)
                }
            },
        )
        .await;
        assert!(f.summary.contains(needle), "{name}: {}", f.summary);
    }
    tokio::time::sleep(Duration::from_secs(2)).await;
    for agent in &mut agents {
        assert!(agent.running(), "{} survived", agent.node_id);
    }
}

#[tokio::test]
async fn a_node_on_another_network_is_refused() {
    let world = World::new();
    let anvil = crate::harness::Anvil::start(&world, "anvil").await;
    let agg = Aggregator::start(&world).await;
    // anvil runs chain id 31337; this agent expects mainnet.
    let mut agent = Agent::start(
        &world,
        "node-1",
        &anvil.url(),
        &agg,
        AgentOptions {
            extra_source: "network_id = \"1\"",
            ..Default::default()
        },
    );
    let logs = [agent.log.clone()];
    let logs: Vec<&std::path::Path> = logs.iter().map(|p| p.as_path()).collect();
    let status = wait_for(
        "the agent to refuse and exit",
        Duration::from_secs(20),
        &logs,
        || {
            let s = agent.exited();
            async move { s }
        },
    )
    .await;
    assert_eq!(status.code(), Some(1), "{status:?}");
    let log = std::fs::read_to_string(&agent.log).unwrap();
    assert!(
        log.contains("is on network 31337, but the config expects 1"),
        "{log}"
    );

    // The right network id is accepted.
    let mut ok = Agent::start(
        &world,
        "node-2",
        &anvil.url(),
        &agg,
        AgentOptions {
            extra_source: "network_id = \"31337\"",
            ..Default::default()
        },
    );
    let mut q = world.query(&agg).await;
    crate::spine::wait_at_head(&mut q, &anvil, &ok, &agg).await;
    assert!(ok.running());
}
