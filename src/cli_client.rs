//! `tern send` and `tern sync`: one-shot clients over the blocking SDK driver that print
//! JSON, one object per line, for shells and scripts.

use std::net::SocketAddr;

use tern::client::{BlockingClient, ClientConfig, ClientError};

fn connect(
    server: SocketAddr,
    user: &str,
    password: &str,
    device: &str,
) -> Result<BlockingClient, String> {
    let config = ClientConfig::new(user, device).with_password(password);
    let mut client = BlockingClient::new(server, config);
    client.connect().map_err(|e| describe(server, e))?;
    Ok(client)
}

fn describe(server: SocketAddr, error: ClientError) -> String {
    match error {
        ClientError::Offline {
            last_error: Some(e),
        } => format!("cannot reach {server}: {e}"),
        other => other.to_string(),
    }
}

pub fn send(
    server: SocketAddr,
    user: &str,
    password: &str,
    device: &str,
    to: &str,
    text: &str,
) -> Result<(), String> {
    let mut client = connect(server, user, password, device)?;
    let acked = client.send(to, text).map_err(|e| describe(server, e));
    client.close();
    let acked = acked?;
    println!(
        "{}",
        serde_json::json!({
            "msg_id": acked.msg_id,
            "seq": acked.seq,
            "client_msg_id": acked.client_msg_id,
            "duplicate": acked.duplicate,
            "to": to,
        })
    );
    Ok(())
}

pub fn sync(
    server: SocketAddr,
    user: &str,
    password: &str,
    device: &str,
    after: u64,
) -> Result<(), String> {
    use std::io::Write;

    let mut client = connect(server, user, password, device)?;
    let stdout = std::io::stdout();
    let mut out = std::io::BufWriter::new(stdout.lock());
    let mut write_error = None;
    let result = client.sync_each(after, |entry| {
        if write_error.is_some() {
            return;
        }
        // Records (group messages, membership changes, read marks) carry their kind too.
        let line = crate::cli_team::entry_json(entry);
        if let Err(e) = writeln!(out, "{line}") {
            write_error = Some(e);
        }
    });
    client.close();
    result.map_err(|e| describe(server, e))?;
    if let Some(e) = write_error {
        return Err(format!("write stdout: {e}"));
    }
    out.flush().map_err(|e| format!("write stdout: {e}"))
}
