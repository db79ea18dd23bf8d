//! The flags containerd passes to shim binaries (Go `flag` syntax: `-name value`, `-name=value`,
//! `--name value`; bools without a value), followed by the action (`start`, `delete`, ...).
//!
//! The shim forwards the original argument list to the delegate untouched; this parse only reads
//! what the shim itself needs.
//!
//! Why by hand: clap and lexopt parse GNU/POSIX syntax and take `-id` for `-i -d`; the
//! `go-flag` crate parses Go's syntax but fails on a flag it was not told about, and a newer
//! containerd may pass one (it added `-socket` and `-debug` over the years) that must reach the
//! delegate instead of stopping the shim. Go's rules fit in this file.

use std::ffi::OsString;

/// Flags that take a value. Any other flag is a bool (`-debug`, `-v`, `-info`, ...).
const VALUE_FLAGS: &[&str] = &[
    "namespace",
    "id",
    "socket",
    "bundle",
    "address",
    "publish-binary",
];

/// Errors parsing the command line.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum ArgsError {
    #[error("argument {arg:?} is not valid UTF-8")]
    NotUtf8 { arg: String },
    #[error("flag -{flag} needs a value")]
    MissingValue { flag: String },
}

/// What the shim reads from its command line.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct Flags {
    pub namespace: String,
    pub id: String,
    pub address: String,
    pub publish_binary: String,
    pub bundle: String,
    pub debug: bool,
    /// The first non-flag argument (`start`, `delete`, ...); empty when there is none.
    pub action: String,
}

/// Parses `args` (without the program name).
pub fn parse(args: &[OsString]) -> Result<Flags, ArgsError> {
    let mut flags = Flags::default();
    let mut it = args.iter();
    while let Some(arg) = it.next() {
        let arg = arg.to_str().ok_or_else(|| ArgsError::NotUtf8 {
            arg: arg.to_string_lossy().into_owned(),
        })?;
        let Some(flag) = arg.strip_prefix("--").or_else(|| arg.strip_prefix('-')) else {
            flags.action = arg.to_string();
            break;
        };
        if flag.is_empty() {
            // "-" or "--": end of flags.
            if let Some(action) = it.next() {
                flags.action = action.to_string_lossy().into_owned();
            }
            break;
        }
        let (name, inline) = match flag.split_once('=') {
            Some((name, value)) => (name, Some(value.to_string())),
            None => (flag, None),
        };
        if VALUE_FLAGS.contains(&name) {
            let value = match inline {
                Some(v) => v,
                None => it
                    .next()
                    .and_then(|v| v.to_str())
                    .map(str::to_string)
                    .ok_or_else(|| ArgsError::MissingValue {
                        flag: name.to_string(),
                    })?,
            };
            match name {
                "namespace" => flags.namespace = value,
                "id" => flags.id = value,
                "address" => flags.address = value,
                "publish-binary" => flags.publish_binary = value,
                "bundle" => flags.bundle = value,
                _ => {}
            }
        } else if name == "debug" {
            flags.debug = inline.as_deref().is_none_or(|v| v == "true" || v == "1");
        }
    }
    Ok(flags)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn os(args: &[&str]) -> Vec<OsString> {
        args.iter().map(OsString::from).collect()
    }

    #[test]
    fn parses_containerd_start_and_delete_lines() {
        let start = parse(&os(&[
            "-namespace",
            "k8s.io",
            "-address",
            "/run/containerd/containerd.sock",
            "-publish-binary",
            "/usr/bin/containerd",
            "-id",
            "abc",
            "-debug",
            "start",
        ]))
        .unwrap();
        assert_eq!(start.namespace, "k8s.io");
        assert_eq!(start.address, "/run/containerd/containerd.sock");
        assert_eq!(start.publish_binary, "/usr/bin/containerd");
        assert_eq!(start.id, "abc");
        assert!(start.debug);
        assert_eq!(start.action, "start");

        let delete = parse(&os(&[
            "-namespace=k8s.io",
            "--id",
            "abc",
            "-bundle",
            "/b",
            "-v=false",
            "delete",
        ]))
        .unwrap();
        assert_eq!(delete.bundle, "/b");
        assert_eq!(delete.id, "abc");
        assert!(!delete.debug);
        assert_eq!(delete.action, "delete");
    }

    #[test]
    fn missing_value_is_an_error() {
        assert_eq!(
            parse(&os(&["-id"])),
            Err(ArgsError::MissingValue { flag: "id".into() })
        );
    }
}
