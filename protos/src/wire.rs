//! The wire-preserving editor: change fields deep inside an encoded protobuf message and keep
//! every other byte.
//!
//! prost drops unknown fields on decode, so the proxy never re-encodes a request it decoded: a
//! newer kubelet's fields would vanish on the way to containerd. Instead [`apply`] edits the
//! encoded bytes. It walks only the fields an edit's [`Step`]s name, copies everything else as
//! it came (unknown fields, field order, non-canonical varints), and re-encodes, as minimal
//! varints, only the lengths of the length-delimited fields that enclose an edit.
//!
//! Validation is structural and covers what the editor walks: the top-level message and every
//! embedded message along an edit's path must be a well-formed sequence of fields. Bytes it does
//! not descend into are opaque (without the schema a `bytes` field is indistinguishable from a
//! message) and are copied unchanged. A malformed message is reported, never half-edited: on
//! error [`apply`] returns no bytes.
//!
//! Groups (wire types 3 and 4) are rejected as unsupported: proto3, and so CRI, cannot declare
//! them, and skipping one means parsing to its matching end tag at unbounded depth.
//!
//! Fuzzing: cargo-fuzz needs a nightly toolchain and dockhand builds on stable, so the proptests
//! in `wire/tests.rs` are this module's fuzzer (arbitrary bytes and arbitrary edit paths).

use std::fmt;
use std::ops::Range;

/// Largest field number protobuf allows.
pub const MAX_FIELD_NUMBER: u32 = (1 << 29) - 1;

/// Longest edit path [`apply`] accepts; each step is one level of recursion. prost's decoder
/// stops at the same depth.
pub const MAX_PATH_LEN: usize = 100;

/// One step of an edit's path, from a message to one of its embedded messages.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Step {
    /// The singular embedded message at this field number. It must occur exactly once: a
    /// missing one is an error, and so is a repeated one (decoders merge the occurrences, so
    /// editing one of them would be ambiguous).
    Field(u32),
    /// The i-th occurrence (from 0) of a repeated embedded-message field.
    Item(u32, usize),
}

/// What an edit does to the message its path leads to.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Op {
    /// Set a varint field: the last occurrence is replaced in place (protobuf: the last one
    /// wins), earlier occurrences are dropped, and the field is appended when absent.
    SetVarint { field: u32, value: u64 },
    /// Append a length-delimited field (its payload, without tag or length), e.g. a map entry
    /// built by [`map_entry`].
    Append { field: u32, value: Vec<u8> },
}

/// One edit: where, and what.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Edit {
    pub path: Vec<Step>,
    pub op: Op,
}

/// A field's wire type. Groups are not represented: [`fields`] rejects them.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum WireType {
    Varint,
    I64,
    Len,
    I32,
}

impl WireType {
    fn code(self) -> u64 {
        match self {
            WireType::Varint => 0,
            WireType::I64 => 1,
            WireType::Len => 2,
            WireType::I32 => 5,
        }
    }
}

impl fmt::Display for WireType {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            WireType::Varint => "a varint",
            WireType::I64 => "a fixed64",
            WireType::Len => "length-delimited",
            WireType::I32 => "a fixed32",
        })
    }
}

/// Why a message could not be read or edited. Offsets are bytes from the start of the message
/// given to [`apply`] or [`fields`].
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum WireError {
    #[error("truncated varint at byte {offset}")]
    TruncatedVarint { offset: usize },
    #[error("varint at byte {offset} is over 10 bytes or overflows 64 bits")]
    VarintOverflow { offset: usize },
    #[error("field {field} at byte {offset} needs {len} bytes but only {available} remain")]
    LengthPastEnd {
        field: u32,
        offset: usize,
        len: u64,
        available: usize,
    },
    #[error("invalid field number {field} at byte {offset}")]
    InvalidFieldNumber { field: u64, offset: usize },
    #[error(
        "field {field} at byte {offset} is a group (wire type {wire_type}), which is not supported"
    )]
    Group {
        field: u32,
        offset: usize,
        wire_type: u8,
    },
    #[error("field {field} at byte {offset} has invalid wire type {wire_type}")]
    InvalidWireType {
        field: u32,
        offset: usize,
        wire_type: u8,
    },
    #[error("field {field} is missing from the message at byte {offset}")]
    Missing { field: u32, offset: usize },
    #[error("field {field} occurs {count} times in the message at byte {offset}, so it has no item {index}")]
    NoSuchItem {
        field: u32,
        index: usize,
        count: usize,
        offset: usize,
    },
    #[error("singular field {field} occurs {count} times in the message at byte {offset}: editing one would be ambiguous")]
    Ambiguous {
        field: u32,
        count: usize,
        offset: usize,
    },
    #[error("field {field} at byte {offset} is {found}, not an embedded message")]
    NotAMessage {
        field: u32,
        offset: usize,
        found: WireType,
    },
    #[error("field {field} at byte {offset} is {found}, not a varint")]
    NotAVarint {
        field: u32,
        offset: usize,
        found: WireType,
    },
    #[error("edit names invalid field number {field}")]
    InvalidEditField { field: u32 },
    #[error("edit path of {len} steps exceeds the limit of {MAX_PATH_LEN}")]
    PathTooLong { len: usize },
    #[error("edits both set field {field} and descend into or append to it")]
    ConflictingEdits { field: u32 },
}

/// One field of an encoded message, as byte ranges into that message.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Field {
    pub number: u32,
    pub wire_type: WireType,
    /// The tag's bytes, as encoded.
    pub tag: Range<usize>,
    /// The value: a varint's bytes, the fixed bytes, or a length-delimited payload without its
    /// length prefix (which sits between `tag.end` and `value.start`). The field ends at
    /// `value.end`.
    pub value: Range<usize>,
}

impl Field {
    /// The whole field: tag, length prefix if any, and value.
    pub fn span(&self) -> Range<usize> {
        self.tag.start..self.value.end
    }
}

/// Reads the fields of an encoded message in order, validating as it goes: yields `Err` for
/// the first malformed field and nothing after it.
pub fn fields(message: &[u8]) -> Fields<'_> {
    Fields::new(message, 0)
}

/// The iterator returned by [`fields`].
pub struct Fields<'a> {
    buf: &'a [u8],
    pos: usize,
    /// Offset of `buf` in the outermost message, for error messages only.
    base: usize,
}

impl<'a> Fields<'a> {
    fn new(buf: &'a [u8], base: usize) -> Fields<'a> {
        Fields { buf, pos: 0, base }
    }

    fn next_field(&mut self) -> Result<Field, WireError> {
        let start = self.pos;
        let offset = self.base + start;
        let (tag, tag_end) = read_varint(self.buf, start, self.base)?;
        let number = tag >> 3;
        if number == 0 || number > u64::from(MAX_FIELD_NUMBER) {
            return Err(WireError::InvalidFieldNumber {
                field: number,
                offset,
            });
        }
        let field = number as u32;
        let wire_type = match tag & 7 {
            0 => WireType::Varint,
            1 => WireType::I64,
            2 => WireType::Len,
            5 => WireType::I32,
            code @ (3 | 4) => {
                return Err(WireError::Group {
                    field,
                    offset,
                    wire_type: code as u8,
                })
            }
            code => {
                return Err(WireError::InvalidWireType {
                    field,
                    offset,
                    wire_type: code as u8,
                })
            }
        };
        let available = |at: usize| self.buf.len() - at;
        let value = match wire_type {
            WireType::Varint => {
                let (_, end) = read_varint(self.buf, tag_end, self.base)?;
                tag_end..end
            }
            WireType::I64 | WireType::I32 => {
                let len = if wire_type == WireType::I64 { 8 } else { 4 };
                if len > available(tag_end) {
                    return Err(WireError::LengthPastEnd {
                        field,
                        offset,
                        len: len as u64,
                        available: available(tag_end),
                    });
                }
                tag_end..tag_end + len
            }
            WireType::Len => {
                let (len, value_start) = read_varint(self.buf, tag_end, self.base)?;
                if len > available(value_start) as u64 {
                    return Err(WireError::LengthPastEnd {
                        field,
                        offset,
                        len,
                        available: available(value_start),
                    });
                }
                value_start..value_start + len as usize
            }
        };
        Ok(Field {
            number: field,
            wire_type,
            tag: start..tag_end,
            value,
        })
    }
}

impl Iterator for Fields<'_> {
    type Item = Result<Field, WireError>;

    fn next(&mut self) -> Option<Self::Item> {
        if self.pos >= self.buf.len() {
            return None;
        }
        let field = self.next_field();
        self.pos = match &field {
            Ok(field) => field.value.end,
            Err(_) => self.buf.len(),
        };
        Some(field)
    }
}

/// Reads a varint at `pos`; returns its value and where it ends.
fn read_varint(buf: &[u8], pos: usize, base: usize) -> Result<(u64, usize), WireError> {
    let mut value = 0u64;
    for i in 0..10 {
        let Some(&byte) = buf.get(pos + i) else {
            return Err(WireError::TruncatedVarint { offset: base + pos });
        };
        if i == 9 && byte > 1 {
            break;
        }
        value |= u64::from(byte & 0x7f) << (7 * i);
        if byte < 0x80 {
            return Ok((value, pos + i + 1));
        }
    }
    Err(WireError::VarintOverflow { offset: base + pos })
}

/// `value` as a minimal varint: the bytes and how many of them are used.
fn varint_bytes(mut value: u64) -> ([u8; 10], usize) {
    let mut bytes = [0u8; 10];
    let mut n = 0;
    while value >= 0x80 {
        bytes[n] = (value as u8) | 0x80;
        value >>= 7;
        n += 1;
    }
    bytes[n] = value as u8;
    (bytes, n + 1)
}

/// Appends `value` as a minimal varint.
fn put_varint(value: u64, out: &mut Vec<u8>) {
    let (bytes, n) = varint_bytes(value);
    out.extend_from_slice(&bytes[..n]);
}

fn put_tag(field: u32, wire_type: WireType, out: &mut Vec<u8>) {
    put_varint((u64::from(field) << 3) | wire_type.code(), out);
}

fn put_len_field(field: u32, payload: &[u8], out: &mut Vec<u8>) {
    put_tag(field, WireType::Len, out);
    put_varint(payload.len() as u64, out);
    out.extend_from_slice(payload);
}

/// An encoded `map<string, string>` entry (1: key, 2: value), to [`Op::Append`] to a map field.
/// Decoders keep the last entry for a key, so appending one overrides an earlier entry.
pub fn map_entry(key: &str, value: &str) -> Vec<u8> {
    let mut out = Vec::with_capacity(key.len() + value.len() + 6);
    put_len_field(1, key.as_bytes(), &mut out);
    put_len_field(2, value.as_bytes(), &mut out);
    out
}

/// Applies `edits` to the encoded `message` in one pass and returns the edited message.
///
/// Edits are grouped by path, so several edits under one message (mounts 3 and 5 of one
/// config, plus an annotation) cost one walk of it. Paths name fields of the original message:
/// `Item(7, 3)` is the fourth mount as sent, even when another edit appends a mount. Two
/// `SetVarint`s on one field: the later edit wins. Appends, and `SetVarint`s of absent fields,
/// go to the end of their message in edit order.
pub fn apply(message: &[u8], edits: &[Edit]) -> Result<Vec<u8>, WireError> {
    let root = Node::build(edits)?;
    let added: usize = edits
        .iter()
        .map(|e| match &e.op {
            Op::Append { value, .. } => value.len() + 16,
            Op::SetVarint { .. } => 16,
        })
        .sum();
    let mut out = Vec::with_capacity(message.len() + added + 8 * edits.len());
    rewrite(message, 0, &root, &mut out)?;
    Ok(out)
}

/// The edits under one message, grouped by path.
#[derive(Default)]
struct Node<'e> {
    children: Vec<Child<'e>>,
    /// Varint fields to set, in first-mention order, with their final value.
    sets: Vec<(u32, u64)>,
    /// What goes at the end of the message, in edit order.
    tail: Vec<Tail<'e>>,
    /// Field numbers the walk must look at: those of `children` and `sets`.
    wanted: Vec<u32>,
}

struct Child<'e> {
    field: u32,
    index: usize,
    /// Some edit reached this child through `Step::Field`: the field must occur exactly once.
    singular: bool,
    node: Node<'e>,
}

enum Tail<'e> {
    /// The `SetVarint` of this field, when the message lacks it.
    Set(u32),
    Append(u32, &'e [u8]),
}

fn check_field(field: u32) -> Result<u32, WireError> {
    if field == 0 || field > MAX_FIELD_NUMBER {
        return Err(WireError::InvalidEditField { field });
    }
    Ok(field)
}

impl<'e> Node<'e> {
    fn build(edits: &'e [Edit]) -> Result<Node<'e>, WireError> {
        let mut root = Node::default();
        for edit in edits {
            if edit.path.len() > MAX_PATH_LEN {
                return Err(WireError::PathTooLong {
                    len: edit.path.len(),
                });
            }
            let mut node = &mut root;
            for step in &edit.path {
                node = node.child(*step)?;
            }
            node.add(&edit.op)?;
        }
        root.finish()?;
        Ok(root)
    }

    fn child(&mut self, step: Step) -> Result<&mut Node<'e>, WireError> {
        let (field, index, singular) = match step {
            Step::Field(field) => (check_field(field)?, 0, true),
            Step::Item(field, index) => (check_field(field)?, index, false),
        };
        let at = match self
            .children
            .iter()
            .position(|c| c.field == field && c.index == index)
        {
            Some(at) => at,
            None => {
                self.children.push(Child {
                    field,
                    index,
                    singular: false,
                    node: Node::default(),
                });
                self.children.len() - 1
            }
        };
        let child = &mut self.children[at];
        child.singular |= singular;
        Ok(&mut child.node)
    }

    fn add(&mut self, op: &'e Op) -> Result<(), WireError> {
        match op {
            Op::SetVarint { field, value } => {
                let field = check_field(*field)?;
                match self.sets.iter_mut().find(|(f, _)| *f == field) {
                    Some(set) => set.1 = *value,
                    None => {
                        self.sets.push((field, *value));
                        self.tail.push(Tail::Set(field));
                    }
                }
            }
            Op::Append { field, value } => {
                self.tail.push(Tail::Append(check_field(*field)?, value));
            }
        }
        Ok(())
    }

    /// Rejects contradictory edits and fills `wanted`, here and below.
    fn finish(&mut self) -> Result<(), WireError> {
        for &(field, _) in &self.sets {
            let appended = self
                .tail
                .iter()
                .any(|t| matches!(t, Tail::Append(f, _) if *f == field));
            if appended || self.children.iter().any(|c| c.field == field) {
                return Err(WireError::ConflictingEdits { field });
            }
        }
        self.wanted = self.children.iter().map(|c| c.field).collect();
        self.wanted.extend(self.sets.iter().map(|(f, _)| *f));
        self.wanted.sort_unstable();
        self.wanted.dedup();
        self.children.iter_mut().try_for_each(|c| c.node.finish())
    }
}

/// What happens to one field of the message being rewritten.
enum Action<'n, 'e> {
    Keep,
    Drop,
    Replace(u64),
    Descend(&'n Node<'e>),
}

/// Writes `message` (found at `base` in the outermost message) with `node`'s edits to `out`.
fn rewrite(message: &[u8], base: usize, node: &Node, out: &mut Vec<u8>) -> Result<(), WireError> {
    // Validate every field; remember the ones the edits name, with their ordinal among the
    // occurrences of their field number. Counts are per entry of `wanted`, so the work stays
    // linear however often a field repeats.
    let mut hits: Vec<(Field, usize)> = Vec::new();
    let mut counts = vec![0usize; node.wanted.len()];
    for field in Fields::new(message, base) {
        let field = field?;
        if let Ok(w) = node.wanted.binary_search(&field.number) {
            hits.push((field, counts[w]));
            counts[w] += 1;
        }
    }
    let count = |number: u32| node.wanted.binary_search(&number).map_or(0, |w| counts[w]);

    let mut actions: Vec<Action> = Vec::with_capacity(hits.len());
    for (hit, ordinal) in &hits {
        let (offset, ordinal) = (base + hit.tag.start, *ordinal);
        let action = if let Some(&(_, value)) = node.sets.iter().find(|(f, _)| *f == hit.number) {
            if hit.wire_type != WireType::Varint {
                return Err(WireError::NotAVarint {
                    field: hit.number,
                    offset,
                    found: hit.wire_type,
                });
            }
            if ordinal + 1 == count(hit.number) {
                Action::Replace(value)
            } else {
                Action::Drop
            }
        } else {
            if hit.wire_type != WireType::Len {
                return Err(WireError::NotAMessage {
                    field: hit.number,
                    offset,
                    found: hit.wire_type,
                });
            }
            match node
                .children
                .iter()
                .find(|c| c.field == hit.number && c.index == ordinal)
            {
                Some(child) => Action::Descend(&child.node),
                None => Action::Keep,
            }
        };
        actions.push(action);
    }
    for child in &node.children {
        let count = count(child.field);
        if child.singular && count != 1 {
            return Err(if count == 0 {
                WireError::Missing {
                    field: child.field,
                    offset: base,
                }
            } else {
                WireError::Ambiguous {
                    field: child.field,
                    count,
                    offset: base,
                }
            });
        }
        if child.index >= count {
            return Err(WireError::NoSuchItem {
                field: child.field,
                index: child.index,
                count,
                offset: base,
            });
        }
    }

    // Copy, splicing in the edited fields.
    let mut copied = 0;
    for ((hit, _), action) in hits.iter().zip(&actions) {
        if matches!(action, Action::Keep) {
            continue;
        }
        out.extend_from_slice(&message[copied..hit.tag.start]);
        match action {
            Action::Keep | Action::Drop => {}
            Action::Replace(value) => {
                out.extend_from_slice(&message[hit.tag.clone()]);
                put_varint(*value, out);
            }
            Action::Descend(child) => {
                // Write the edited message in place behind a length prefix sized for the
                // original length; move it only in the rare case the prefix changes size.
                out.extend_from_slice(&message[hit.tag.clone()]);
                let len_at = out.len();
                let reserved = varint_bytes(hit.value.len() as u64).1;
                out.resize(len_at + reserved, 0);
                rewrite(
                    &message[hit.value.clone()],
                    base + hit.value.start,
                    child,
                    out,
                )?;
                let (prefix, n) = varint_bytes((out.len() - len_at - reserved) as u64);
                if n == reserved {
                    out[len_at..len_at + n].copy_from_slice(&prefix[..n]);
                } else {
                    out.splice(len_at..len_at + reserved, prefix[..n].iter().copied());
                }
            }
        }
        copied = hit.value.end;
    }
    out.extend_from_slice(&message[copied..]);

    for tail in &node.tail {
        match *tail {
            Tail::Set(field) => {
                if count(field) == 0 {
                    let value = node.sets.iter().find(|(f, _)| *f == field).map(|s| s.1);
                    put_tag(field, WireType::Varint, out);
                    put_varint(value.unwrap_or_default(), out);
                }
            }
            Tail::Append(field, value) => put_len_field(field, value, out),
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests;
