//! `tern user passwd`, `tern device list|revoke` and `tern logout`: one-shot account
//! clients over the blocking SDK driver, printing JSON, one object per line.

use clap::Subcommand;
use serde_json::json;

use crate::cli_client::{Account, connect, describe};

#[derive(Subcommand)]
pub enum DeviceCommand {
    /// List --user's devices: name, acked seq, online, and whether it is this one.
    List {
        #[command(flatten)]
        account: Account,
    },
    /// Revoke one of --user's devices: its tokens stop working and its connections are
    /// closed; it must log in with the password again. Prints the remaining list.
    Revoke {
        #[command(flatten)]
        account: Account,
        /// The device to revoke (its name, as `tern device list` shows it). Not `--device`,
        /// which names the device this command logs in as.
        #[arg(value_name = "DEVICE")]
        target: String,
    },
}

pub fn device(command: DeviceCommand) -> Result<(), String> {
    let (account, revoke) = match &command {
        DeviceCommand::List { account } => (account, None),
        DeviceCommand::Revoke { account, target } => (account, Some(target.as_str())),
    };
    let mut client = connect(account)?;
    let devices = client.devices(revoke);
    client.close();
    for item in devices.map_err(|e| describe(account.server, e))? {
        println!(
            "{}",
            json!({
                "device": item.name,
                "acked_seq": item.acked_seq,
                "online": item.online,
                "current": item.current,
            })
        );
    }
    Ok(())
}

/// Changes --user's password on the running node: every token of the user stops working
/// and every connection of the user is closed.
pub fn passwd(account: &Account, new_password: &str) -> Result<(), String> {
    let mut client = connect(account)?;
    let changed = client.change_password(&account.password, new_password);
    client.close();
    changed.map_err(|e| describe(account.server, e))?;
    println!(
        "{}",
        json!({ "user": account.user, "password_changed": true })
    );
    Ok(())
}

/// Logs --device out (or, with `everywhere`, every device of --user).
pub fn logout(account: &Account, everywhere: bool) -> Result<(), String> {
    let mut client = connect(account)?;
    let done = client.logout(everywhere);
    client.close();
    done.map_err(|e| describe(account.server, e))?;
    println!(
        "{}",
        json!({ "user": account.user, "logged_out": if everywhere { "everywhere" } else { account.device.as_str() } })
    );
    Ok(())
}
