//! `tern group …`, `tern history`, `tern conversations` and `tern read`: one-shot team
//! messaging clients over the blocking SDK driver, printing JSON, one object per line.

use clap::Subcommand;
use serde_json::json;

use tern::client::{BlockingClient, ClientError, ReceivedMessage};

use crate::cli_client::{Account, connect, describe};
use tern::protocol::{GroupInfo, conv_group, group_conv, record_kind};

#[derive(Subcommand)]
pub enum GroupCommand {
    /// Create a group owned by --user with the named members; prints the group.
    Create {
        #[command(flatten)]
        account: Account,
        name: String,
        /// Member user names (the owner is added anyway).
        #[arg(long = "member", num_args = 1..)]
        members: Vec<String>,
    },
    /// Add members to a group.
    Add {
        #[command(flatten)]
        account: Account,
        group: u64,
        #[arg(required = true)]
        users: Vec<String>,
    },
    /// Remove members from a group (owner only).
    Remove {
        #[command(flatten)]
        account: Account,
        group: u64,
        #[arg(required = true)]
        users: Vec<String>,
    },
    /// Leave a group.
    Leave {
        #[command(flatten)]
        account: Account,
        group: u64,
    },
    /// Rename a group.
    Rename {
        #[command(flatten)]
        account: Account,
        group: u64,
        name: String,
    },
    /// Print one group with its members.
    Info {
        #[command(flatten)]
        account: Account,
        group: u64,
    },
    /// Print the user's groups, one per line.
    List {
        #[command(flatten)]
        account: Account,
    },
    /// Send a message to a group and wait for its durable ack.
    Send {
        #[command(flatten)]
        account: Account,
        group: u64,
        text: String,
    },
}

/// Runs `f` on a connected client, then closes it.
fn with_client<T>(
    login: &Account,
    f: impl FnOnce(&mut BlockingClient) -> Result<T, ClientError>,
) -> Result<T, String> {
    let mut client = connect(login)?;
    let result = f(&mut client);
    client.close();
    result.map_err(|e| describe(login.server, e))
}

fn group_json(info: &GroupInfo) -> serde_json::Value {
    json!({
        "group_id": info.group_id,
        "conv": group_conv(info.group_id),
        "name": info.name,
        "owner_id": info.owner_id,
        "members": info.members.iter().map(|m| json!({
            "user_id": m.user_id,
            "name": m.name,
            "owner": m.owner,
        })).collect::<Vec<_>>(),
        "seq": info.seq,
    })
}

pub fn group(command: GroupCommand) -> Result<(), String> {
    match command {
        GroupCommand::Create {
            account,
            name,
            members,
        } => {
            let info = with_client(&account, |c| c.group_create(&name, &members))?;
            println!("{}", group_json(&info));
        }
        GroupCommand::Add {
            account,
            group,
            users,
        } => {
            let info = with_client(&account, |c| c.group_add(group, &users))?;
            println!("{}", group_json(&info));
        }
        GroupCommand::Remove {
            account,
            group,
            users,
        } => {
            let info = with_client(&account, |c| c.group_remove(group, &users))?;
            println!("{}", group_json(&info));
        }
        GroupCommand::Leave { account, group } => {
            let info = with_client(&account, |c| c.group_leave(group))?;
            println!("{}", json!({ "group_id": info.group_id, "left": true }));
        }
        GroupCommand::Rename {
            account,
            group,
            name,
        } => {
            let info = with_client(&account, |c| c.group_rename(group, &name))?;
            println!("{}", group_json(&info));
        }
        GroupCommand::Info { account, group } => {
            let info = with_client(&account, |c| c.group_info(group))?;
            println!("{}", group_json(&info));
        }
        GroupCommand::List { account } => {
            let groups = with_client(&account, |c| c.group_list())?;
            for g in groups {
                println!(
                    "{}",
                    json!({
                        "group_id": g.group_id,
                        "conv": group_conv(g.group_id),
                        "name": g.name,
                        "owner_id": g.owner_id,
                        "members": g.members,
                    })
                );
            }
        }
        GroupCommand::Send {
            account,
            group,
            text,
        } => {
            let ack = with_client(&account, |c| c.group_send(group, &text))?;
            println!(
                "{}",
                json!({
                    "msg_id": ack.msg_id,
                    "seq": ack.seq,
                    "duplicate": ack.duplicate,
                    "group_id": group,
                })
            );
        }
    }
    Ok(())
}

/// One timeline entry as a JSON object (shared by `history`).
pub fn entry_json(entry: &ReceivedMessage) -> serde_json::Value {
    let mut value = json!({
        "seq": entry.seq,
        "msg_id": entry.msg_id,
        "from": entry.from,
        "text": entry.text,
        "sent_at_ms": entry.sent_at_ms,
    });
    match &entry.record {
        None => value["to"] = json!(entry.to),
        Some(record) => {
            value["kind"] = json!(match record.kind {
                record_kind::GROUP_MESSAGE => "group_message",
                record_kind::GROUP_CREATED => "group_created",
                record_kind::MEMBERS_ADDED => "members_added",
                record_kind::MEMBERS_REMOVED => "members_removed",
                record_kind::MEMBER_LEFT => "member_left",
                record_kind::GROUP_RENAMED => "group_renamed",
                record_kind::READ => "read",
                record_kind::DELIVERED => "delivered",
                record_kind::FILE_MESSAGE => "file_message",
                _ => "unknown",
            });
            value["conv"] = json!(record.conv);
            if let Some(group_id) = conv_group(record.conv) {
                value["group_id"] = json!(group_id);
            }
            if !record.users.is_empty() {
                value["users"] = json!(record.users);
            }
            if let Some(a) = &record.attachment {
                value["file"] = json!({
                    "file_id": a.file_id,
                    "name": a.name,
                    "mime": a.mime,
                    "size": a.size,
                    "media": a.media,
                    "thumbnail_id": a.thumbnail_id,
                });
            }
            if matches!(record.kind, record_kind::READ | record_kind::DELIVERED) {
                value["up_to_msg_id"] = json!(record.up_to);
            }
        }
    }
    value
}

/// The conversation id named on the command line: `--group ID` or `--with USER`.
fn conversation(
    client: &mut BlockingClient,
    group: Option<u64>,
    with: Option<&str>,
) -> Result<u64, ClientError> {
    match (group, with) {
        (Some(group), _) => Ok(group_conv(group)),
        (None, Some(name)) => {
            // A 1:1 conversation is named by the other user's id: find it in the list.
            let mut offset = 0;
            loop {
                let page = client.conversations(offset, 0)?;
                if let Some(item) = page
                    .items
                    .iter()
                    .find(|i| conv_group(i.conv).is_none() && i.title == name)
                {
                    return Ok(item.conv);
                }
                offset += page.items.len() as u32;
                if page.items.is_empty() || offset >= page.total {
                    return Err(ClientError::Invalid("no conversation with that user"));
                }
            }
        }
        (None, None) => Err(ClientError::Invalid("name --group ID or --with USER")),
    }
}

pub fn history(
    login: &Account,
    group: Option<u64>,
    with: Option<&str>,
    before: u64,
    limit: u32,
    all: bool,
) -> Result<(), String> {
    with_client(login, |client| {
        let conv = conversation(client, group, with)?;
        let mut before = before;
        loop {
            let (entries, has_more) = client.history(conv, before, limit)?;
            for entry in &entries {
                println!("{}", entry_json(entry));
            }
            match entries.last() {
                Some(last) if all && has_more => before = last.seq,
                _ => return Ok(()),
            }
        }
    })
}

pub fn conversations(login: &Account, offset: u32, limit: u32) -> Result<(), String> {
    let page = with_client(login, |c| c.conversations(offset, limit))?;
    for item in page.items {
        println!(
            "{}",
            json!({
                "conv": item.conv,
                "group_id": conv_group(item.conv),
                "title": item.title,
                "last_seq": item.last_seq,
                "last_at_ms": item.last_at_ms,
                "last_from": item.last_from,
                "preview": item.preview,
                "unread": item.unread,
                "read_seq": item.read_seq,
                "total": page.total,
            })
        );
    }
    Ok(())
}

pub fn read(login: &Account, conv: u64, up_to: u64) -> Result<(), String> {
    let ok = with_client(login, |c| c.read(conv, up_to))?;
    println!(
        "{}",
        json!({ "conv": ok.conv, "read_seq": ok.read_seq, "unread": ok.unread })
    );
    Ok(())
}

/// Prints the users' presence, then (with `watch_s` > 0) each change for that long.
pub fn presence(login: &Account, users: &[String], watch_s: u64) -> Result<(), String> {
    use std::time::{Duration, Instant};
    use tern::client::Event;

    let mut client = connect(login)?;
    let items = if watch_s > 0 {
        client.presence_subscribe(users)
    } else {
        client.presence_query(users)
    };
    let items = match items {
        Ok(items) => items,
        Err(e) => {
            client.close();
            return Err(describe(login.server, e));
        }
    };
    for item in &items {
        println!(
            "{}",
            json!({ "user": item.name, "user_id": item.user_id, "online": item.online, "version": item.version })
        );
    }
    let deadline = Instant::now() + Duration::from_secs(watch_s);
    client.run_until(deadline, |event| {
        if let Event::Presence {
            user_id,
            online,
            version,
        } = event
        {
            let name = items
                .iter()
                .find(|i| i.user_id == *user_id)
                .map_or("", |i| i.name.as_str());
            println!(
                "{}",
                json!({ "user": name, "user_id": user_id, "online": online, "version": version })
            );
        }
        false
    });
    client.close();
    Ok(())
}

/// Uploads a file and sends it as a message to a user or a group.
pub fn upload(
    login: &Account,
    path: &std::path::Path,
    to: Option<&str>,
    group: Option<u64>,
    media_kind: &str,
    mime: &str,
) -> Result<(), String> {
    use tern::client::FileMessage;
    use tern::protocol::media;

    let media = match media_kind {
        "file" => media::FILE,
        "image" => media::IMAGE,
        "voice" => media::VOICE,
        other => return Err(format!("--media must be file, image or voice, not {other}")),
    };
    let data = std::fs::read(path).map_err(|e| format!("read {}: {e}", path.display()))?;
    let name = path
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_else(|| "file".to_owned());
    let (info, ack) = with_client(login, |client| {
        let info = client.upload(&name, mime, &data)?;
        let message = FileMessage {
            media,
            ..FileMessage::default()
        };
        let ack = client.send_file(to, group, info.file_id, &message)?;
        Ok((info, ack))
    })?;
    println!(
        "{}",
        json!({
            "file_id": info.file_id,
            "name": info.name,
            "size": info.size,
            "msg_id": ack.msg_id,
            "seq": ack.seq,
        })
    );
    Ok(())
}

/// `out` with `suffix` appended to its file name (`out.txt` → `out.txt.part`).
fn sibling(out: &std::path::Path, suffix: &str) -> std::path::PathBuf {
    let mut name = out.as_os_str().to_owned();
    name.push(suffix);
    std::path::PathBuf::from(name)
}

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

/// Downloads file `file_id` to `out`.
///
/// The bytes go to `OUT.part`, beside a marker `OUT.part.id` holding the file id and the
/// SHA-256 the node states for it. A later run resumes from `OUT.part` only when the marker
/// names the same file and hash; any other partial file is started over, and whatever `out`
/// holds is never read. When every byte is there the SHA-256 of `OUT.part` is checked, and
/// only a match is synced and renamed onto `out`; a mismatch removes the partial file and
/// fails, so nothing that looks complete is left behind.
pub fn download(login: &Account, file_id: u64, out: &std::path::Path) -> Result<(), String> {
    use sha2::{Digest, Sha256};
    use std::io::{Read, Seek, Write};

    let part = sibling(out, ".part");
    let marker = sibling(out, ".part.id");
    let io = |what: &str, path: &std::path::Path, e: std::io::Error| {
        format!("{what} {}: {e}", path.display())
    };
    let mut file = std::fs::File::options()
        .create(true)
        .truncate(false)
        .read(true)
        .write(true)
        .open(&part)
        .map_err(|e| io("open", &part, e))?;
    // "<file id> <sha256 hex>" of the partial file, if it is one of ours.
    let held = std::fs::read_to_string(&marker).ok().and_then(|text| {
        let (id, sha) = text.trim().split_once(' ')?;
        (id.parse::<u64>().ok()? == file_id).then(|| sha.to_owned())
    });
    let mut expected = held;
    let mut offset = if expected.is_some() {
        file.metadata().map_err(|e| io("stat", &part, e))?.len()
    } else {
        0
    };
    let start_over = |file: &mut std::fs::File| -> Result<(), String> {
        file.set_len(0).map_err(|e| io("truncate", &part, e))?;
        let _ = std::fs::remove_file(&marker);
        Ok(())
    };
    if offset == 0 {
        start_over(&mut file)?;
    }
    let mut client = connect(login)?;
    let size = loop {
        let chunk = match client.download_chunk(file_id, offset) {
            Ok(chunk) => chunk,
            // A partial file longer than the file: not this file's bytes.
            Err(ClientError::RequestFailed { code, .. })
                if offset > 0 && code == tern::protocol::ErrorCode::InvalidArgument as u16 =>
            {
                start_over(&mut file)?;
                (offset, expected) = (0, None);
                continue;
            }
            Err(e) => {
                client.close();
                // Refused before a byte of this file arrived: leave no partial file behind
                // (one with bytes stays, for a later run to resume).
                if expected.is_none() && offset == 0 {
                    drop(file);
                    let _ = std::fs::remove_file(&part);
                    let _ = std::fs::remove_file(&marker);
                }
                return Err(describe(login.server, e));
            }
        };
        let sha = hex(&chunk.sha256);
        match &expected {
            Some(held) if *held == sha => {}
            Some(_) => {
                // The partial file was of other content: start over.
                start_over(&mut file)?;
                (offset, expected) = (0, None);
                continue;
            }
            None => {
                std::fs::write(&marker, format!("{file_id} {sha}\n"))
                    .map_err(|e| io("write", &marker, e))?;
                expected = Some(sha);
            }
        }
        file.seek(std::io::SeekFrom::Start(offset))
            .and_then(|_| file.write_all(&chunk.data))
            .map_err(|e| io("write", &part, e))?;
        offset += chunk.data.len() as u64;
        if offset >= chunk.size || chunk.data.is_empty() {
            break chunk.size;
        }
    };
    client.close();
    let mut hasher = Sha256::new();
    let mut got = 0u64;
    file.seek(std::io::SeekFrom::Start(0))
        .map_err(|e| io("read", &part, e))?;
    let mut buf = vec![0u8; 64 * 1024];
    loop {
        let n = file.read(&mut buf).map_err(|e| io("read", &part, e))?;
        if n == 0 {
            break;
        }
        hasher.update(&buf[..n]);
        got += n as u64;
    }
    if got != size || expected.as_deref() != Some(hex(&hasher.finalize()).as_str()) {
        drop(file);
        let _ = std::fs::remove_file(&part);
        let _ = std::fs::remove_file(&marker);
        return Err(format!(
            "file {file_id}: the downloaded bytes do not match its size and SHA-256; \
             nothing was written to {} (run again to download it afresh)",
            out.display()
        ));
    }
    file.sync_all().map_err(|e| io("sync", &part, e))?;
    drop(file);
    std::fs::rename(&part, out).map_err(|e| io("rename onto", out, e))?;
    let _ = std::fs::remove_file(&marker);
    println!(
        "{}",
        json!({
            "file_id": file_id,
            "size": size,
            "sha256": expected,
            "path": out.display().to_string(),
        })
    );
    Ok(())
}
