//! The `start` action's answer: the delegate's reply, with the delegate's address replaced by
//! this shim's, in whichever format the delegate used so that containerd sees what it asked for:
//!
//! - plain address (containerd 1.6; accepted by later versions as task API v2),
//! - JSON `{"version":2|3,"address":...,"protocol":"ttrpc"}` (containerd 1.7 and 2.x),
//! - protobuf (`BootstrapResult`, containerd 2.3): the field holding the address is replaced on
//!   the wire and every other byte is kept, whatever its field number.

use sha2::{Digest, Sha256};

/// Errors reading the delegate's reply.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum ReplyError {
    #[error("the delegate's start reply is empty")]
    Empty,
    #[error("the delegate's start reply {reply:?} holds no address")]
    NoAddress { reply: String },
    #[error("delegate address {address:?} is not a unix socket path")]
    NotUnix { address: String },
}

/// The reply formats containerd understands.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Format {
    Plain,
    Json,
    Protobuf,
}

/// A parsed `start` reply.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct StartReply {
    raw: Vec<u8>,
    pub format: Format,
    /// The address the delegate serves on.
    pub address: String,
}

impl StartReply {
    /// Parses the delegate's stdout.
    pub fn parse(raw: &[u8]) -> Result<StartReply, ReplyError> {
        let text = std::str::from_utf8(raw).ok().map(str::trim);
        let no_address = || ReplyError::NoAddress {
            reply: String::from_utf8_lossy(raw).into_owned(),
        };
        match text {
            Some("") => Err(ReplyError::Empty),
            Some(t) if t.starts_with('{') => {
                let value: serde_json::Value = serde_json::from_str(t).map_err(|_| no_address())?;
                let address = value
                    .get("address")
                    .and_then(|a| a.as_str())
                    .ok_or_else(no_address)?;
                Ok(StartReply {
                    raw: raw.to_vec(),
                    format: Format::Json,
                    address: address.to_string(),
                })
            }
            Some(t) if !t.contains(char::is_control) && looks_like_address(t) => Ok(StartReply {
                raw: raw.to_vec(),
                format: Format::Plain,
                address: t.to_string(),
            }),
            _ => {
                let (_, value) = find_address_field(raw).ok_or_else(no_address)?;
                Ok(StartReply {
                    raw: raw.to_vec(),
                    format: Format::Protobuf,
                    address: value,
                })
            }
        }
    }

    /// The same reply, with `address` in place of the delegate's.
    pub fn with_address(&self, address: &str) -> Vec<u8> {
        match self.format {
            Format::Plain => {
                let text = String::from_utf8_lossy(&self.raw);
                text.replacen(&self.address, address, 1).into_bytes()
            }
            Format::Json => {
                let mut value: serde_json::Value =
                    serde_json::from_slice(&self.raw).unwrap_or_default();
                value["address"] = serde_json::Value::String(address.to_string());
                serde_json::to_vec(&value).unwrap_or_default()
            }
            Format::Protobuf => replace_field(&self.raw, address),
        }
    }
}

fn looks_like_address(s: &str) -> bool {
    s.starts_with("unix://") || s.starts_with('/') || s.contains("://")
}

/// This shim's socket for a delegate address: in the same directory, named by
/// `sha256("dockhand:" + delegate address)`. One delegate, one dockhand socket.
pub fn own_address(delegate: &str) -> Result<String, ReplyError> {
    let path = delegate.strip_prefix("unix://").unwrap_or(delegate);
    let not_unix = || ReplyError::NotUnix {
        address: delegate.to_string(),
    };
    if !path.starts_with('/') {
        return Err(not_unix());
    }
    let dir = std::path::Path::new(path).parent().ok_or_else(not_unix)?;
    let hash = Sha256::digest(format!("dockhand:{delegate}").as_bytes());
    let hex: String = hash.iter().map(|b| format!("{b:02x}")).collect();
    Ok(format!("unix://{}/{hex}", dir.display()))
}

fn read_varint(buf: &[u8], pos: &mut usize) -> Option<u64> {
    let mut value = 0u64;
    for shift in (0..64).step_by(7) {
        let byte = *buf.get(*pos)?;
        *pos += 1;
        value |= u64::from(byte & 0x7f) << shift;
        if byte & 0x80 == 0 {
            return Some(value);
        }
    }
    None
}

fn write_varint(out: &mut Vec<u8>, mut value: u64) {
    while value >= 0x80 {
        out.push((value as u8) | 0x80);
        value >>= 7;
    }
    out.push(value as u8);
}

/// Top-level fields: (start of the field, start of its value, end, wire type).
fn fields(buf: &[u8]) -> Option<Vec<(usize, usize, usize, u64)>> {
    let mut out = Vec::new();
    let mut pos = 0;
    while pos < buf.len() {
        let start = pos;
        let key = read_varint(buf, &mut pos)?;
        let wire = key & 7;
        let value_start;
        match wire {
            0 => {
                value_start = pos;
                read_varint(buf, &mut pos)?;
            }
            1 => {
                value_start = pos;
                pos += 8;
            }
            2 => {
                let len = read_varint(buf, &mut pos)? as usize;
                value_start = pos;
                pos = pos.checked_add(len)?;
            }
            5 => {
                value_start = pos;
                pos += 4;
            }
            _ => return None,
        }
        if pos > buf.len() {
            return None;
        }
        out.push((start, value_start, pos, wire));
    }
    Some(out)
}

/// The first length-delimited top-level field whose value reads as a socket address.
fn find_address_field(buf: &[u8]) -> Option<(usize, String)> {
    fields(buf)?
        .into_iter()
        .filter(|f| f.3 == 2)
        .find_map(|(start, value_start, end, _)| {
            let s = std::str::from_utf8(&buf[value_start..end]).ok()?;
            looks_like_address(s).then(|| (start, s.to_string()))
        })
}

fn replace_field(buf: &[u8], address: &str) -> Vec<u8> {
    let Some((start, _)) = find_address_field(buf) else {
        return buf.to_vec();
    };
    let Some(all) = fields(buf) else {
        return buf.to_vec();
    };
    let mut out = Vec::with_capacity(buf.len() + address.len());
    for (fstart, value_start, end, _) in all {
        if fstart != start {
            out.extend_from_slice(&buf[fstart..end]);
            continue;
        }
        let mut pos = fstart;
        let _ = read_varint(buf, &mut pos); // the key
        out.extend_from_slice(&buf[fstart..pos]);
        write_varint(&mut out, address.len() as u64);
        out.extend_from_slice(address.as_bytes());
        let _ = value_start;
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    const DELEGATE: &str = "unix:///run/containerd/s/0f2a";

    #[test]
    fn plain_reply_keeps_its_shape() {
        let reply = StartReply::parse(format!("{DELEGATE}\n").as_bytes()).unwrap();
        assert_eq!(reply.format, Format::Plain);
        assert_eq!(reply.address, DELEGATE);
        assert_eq!(reply.with_address("unix:///x/y"), b"unix:///x/y\n");
    }

    #[test]
    fn json_reply_keeps_version_and_protocol() {
        let raw = format!(r#"{{"version":3,"address":"{DELEGATE}","protocol":"ttrpc"}}"#);
        let reply = StartReply::parse(raw.as_bytes()).unwrap();
        assert_eq!(reply.format, Format::Json);
        assert_eq!(reply.address, DELEGATE);
        let out: serde_json::Value =
            serde_json::from_slice(&reply.with_address("unix:///x/y")).unwrap();
        assert_eq!(
            out,
            serde_json::json!({"version": 3, "address": "unix:///x/y", "protocol": "ttrpc"})
        );
    }

    #[test]
    fn protobuf_reply_replaces_only_the_address_field() {
        // version = 3 (field 1, varint), address (field 2), protocol (field 3), unknown field 9.
        let mut raw = vec![0x08, 0x03, 0x12, DELEGATE.len() as u8];
        raw.extend_from_slice(DELEGATE.as_bytes());
        raw.extend_from_slice(&[0x1a, 0x05]);
        raw.extend_from_slice(b"ttrpc");
        raw.extend_from_slice(&[0x48, 0x01]);
        let reply = StartReply::parse(&raw).unwrap();
        assert_eq!(reply.format, Format::Protobuf);
        assert_eq!(reply.address, DELEGATE);
        let new = "unix:///run/containerd/s/".to_string() + &"a".repeat(120);
        let out = reply.with_address(&new);
        let mut want = vec![0x08, 0x03, 0x12, 0x91, 0x01];
        want.extend_from_slice(new.as_bytes());
        want.extend_from_slice(&[0x1a, 0x05]);
        want.extend_from_slice(b"ttrpc");
        want.extend_from_slice(&[0x48, 0x01]);
        assert_eq!(out, want);
        assert_eq!(StartReply::parse(&out).unwrap().address, new);
    }

    #[test]
    fn own_address_is_a_sibling_and_stable() {
        let a = own_address(DELEGATE).unwrap();
        assert!(a.starts_with("unix:///run/containerd/s/"));
        assert_eq!(a.len(), "unix:///run/containerd/s/".len() + 64);
        assert_eq!(a, own_address(DELEGATE).unwrap());
        assert_ne!(a, own_address("unix:///run/containerd/s/other").unwrap());
        assert!(own_address("vsock://3:1024").is_err());
    }

    #[test]
    fn garbage_is_refused() {
        assert_eq!(StartReply::parse(b"  \n"), Err(ReplyError::Empty));
        assert!(StartReply::parse(b"{\"version\":2}").is_err());
        assert!(StartReply::parse(&[0xff, 0x00]).is_err());
    }
}
