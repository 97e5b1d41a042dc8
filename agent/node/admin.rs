//! The running agent's local admin endpoint: a Unix socket beside its data
//! dir (`<data_dir>-admin.sock`, mode 0600). One request per connection, one
//! line each way; the only request is `snapshot`, which `outpost snapshot
//! create` sends when the agent holds its store.

use std::path::{Path, PathBuf};

use actix::Addr;
use serde_json::{json, Value};
use tokio::io::{AsyncBufReadExt, AsyncWriteExt, BufReader};
use tokio::net::{UnixListener, UnixStream};

use super::snapshot::{Snapshots, TakeNow, TAKE_TIMEOUT};

/// Where the admin socket of the agent with this data dir lives.
pub fn socket_path(data_dir: &Path) -> PathBuf {
    let mut name = data_dir
        .file_name()
        .map(|n| n.to_os_string())
        .unwrap_or_else(|| "store".into());
    name.push("-admin.sock");
    data_dir.with_file_name(name)
}

/// Binds the socket (replacing a stale one) and serves it until the agent stops.
pub fn serve(data_dir: &Path, snapshots: Addr<Snapshots>) -> std::io::Result<PathBuf> {
    use std::os::unix::fs::PermissionsExt;
    let path = socket_path(data_dir);
    // Only one agent can hold the store, so a socket here is a dead one's.
    let _ = std::fs::remove_file(&path);
    let listener = UnixListener::bind(&path)?;
    std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o600))?;
    actix::spawn(async move {
        while let Ok((stream, _)) = listener.accept().await {
            actix::spawn(answer(stream, snapshots.clone()));
        }
    });
    Ok(path)
}

async fn answer(stream: UnixStream, snapshots: Addr<Snapshots>) {
    let (read, mut write) = stream.into_split();
    let mut line = String::new();
    // A request is one short line; cap what is read at 1 KiB.
    let mut reader = BufReader::new(tokio::io::AsyncReadExt::take(read, 1024));
    if reader.read_line(&mut line).await.is_err() {
        return;
    }
    let reply = match line.trim() {
        "snapshot" => match tokio::time::timeout(TAKE_TIMEOUT, snapshots.send(TakeNow)).await {
            Ok(Ok(Ok(w))) => json!({
                "ok": true,
                "file": w.path,
                "bytes": w.bytes,
                "sha256": w.sha256,
                "last_seq": w.manifest.last_seq,
            }),
            Ok(Ok(Err(e))) => json!({"ok": false, "error": e}),
            Ok(Err(e)) => json!({"ok": false, "error": e.to_string()}),
            Err(_) => json!({"ok": false, "error": "the snapshot did not finish within 300 s"}),
        },
        other => json!({"ok": false, "error": format!("unknown request {other:?}")}),
    };
    let _ = write.write_all(format!("{reply}\n").as_bytes()).await;
}

/// Asks the agent at `data_dir` for a snapshot; returns its reply.
pub async fn request_snapshot(data_dir: &Path) -> Result<Value, String> {
    let path = socket_path(data_dir);
    let stream = UnixStream::connect(&path)
        .await
        .map_err(|e| format!("cannot reach the running agent at {}: {e}", path.display()))?;
    let (read, mut write) = stream.into_split();
    write
        .write_all(b"snapshot\n")
        .await
        .map_err(|e| format!("{}: {e}", path.display()))?;
    let mut line = String::new();
    BufReader::new(read)
        .read_line(&mut line)
        .await
        .map_err(|e| format!("{}: {e}", path.display()))?;
    let v: Value = serde_json::from_str(&line)
        .map_err(|e| format!("{}: unreadable reply {line:?}: {e}", path.display()))?;
    if v["ok"] == true {
        Ok(v)
    } else {
        Err(v["error"].as_str().unwrap_or("unknown error").to_string())
    }
}
