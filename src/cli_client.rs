//! `tern send` and `tern sync`: one-shot clients over the blocking SDK driver that print
//! JSON, one object per line, for shells and scripts.

use std::net::SocketAddr;

use tern::client::{BlockingClient, ClientConfig, ClientError};

/// Where and as whom a one-shot client command logs in.
#[derive(clap::Args)]
pub struct Account {
    #[arg(long, default_value = "127.0.0.1:7420")]
    pub server: SocketAddr,
    #[arg(long)]
    pub user: String,
    #[arg(long)]
    pub password: String,
    /// Device name; a second login of the same device replaces the first.
    #[arg(long, default_value = "cli")]
    pub device: String,
    /// Speak TLS to the node, trusting only the CA certificate(s) in --ca.
    #[arg(long, requires = "ca")]
    pub tls: bool,
    /// PEM file of the CA to pin (`ca.pem` from `tern cert generate`).
    #[arg(long, value_name = "FILE", requires = "tls")]
    pub ca: Option<std::path::PathBuf>,
    /// Name the node's certificate must carry (default: the --server IP address).
    #[arg(long, value_name = "NAME", requires = "tls")]
    pub tls_name: Option<String>,
}

pub fn connect(account: &Account) -> Result<BlockingClient, String> {
    let config = ClientConfig::new(&account.user, &account.device).with_password(&account.password);
    let mut client = BlockingClient::new(account.server, config);
    if account.tls {
        let ca = account
            .ca
            .as_deref()
            .expect("clap requires --ca with --tls");
        let tls = tern::transport::tls::client_config(ca).map_err(|e| e.to_string())?;
        let name = tern::transport::tls::server_name(account.tls_name.as_deref(), account.server)
            .map_err(|e| e.to_string())?;
        client = client.with_tls(tls, name);
    }
    client.connect().map_err(|e| describe(account.server, e))?;
    Ok(client)
}

pub fn describe(server: SocketAddr, error: ClientError) -> String {
    match error {
        ClientError::Offline {
            last_error: Some(e),
        } => format!("cannot reach {server}: {e}"),
        other => other.to_string(),
    }
}

pub fn send(account: &Account, to: &str, text: &str) -> Result<(), String> {
    let mut client = connect(account)?;
    let acked = client
        .send(to, text)
        .map_err(|e| describe(account.server, e));
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

pub fn sync(account: &Account, after: u64) -> Result<(), String> {
    use std::io::Write;

    let mut client = connect(account)?;
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
    result.map_err(|e| describe(account.server, e))?;
    if let Some(e) = write_error {
        return Err(format!("write stdout: {e}"));
    }
    out.flush().map_err(|e| format!("write stdout: {e}"))
}
