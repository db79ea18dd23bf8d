use std::collections::HashMap;

use proptest::prelude::*;
use prost::Message;

use super::*;
use crate::cri::{
    ContainerConfig, ContainerMetadata, CreateContainerRequest, Mount, MountPropagation,
    PodSandboxConfig, PodSandboxMetadata,
};

// CRI v1 field numbers.
const REQUEST_CONFIG: u32 = 2;
const CONFIG_MOUNTS: u32 = 7;
const CONFIG_ANNOTATIONS: u32 = 10;
const MOUNT_PROPAGATION: u32 = 5;
const HOST_TO_CONTAINER: u64 = MountPropagation::PropagationHostToContainer as u64;

// Fields the crate's proto does not know.
const UNKNOWN_TOP: u32 = 77;
const UNKNOWN_CONFIG: u32 = 500;
const UNKNOWN_MOUNT: u32 = 99;

fn varint_field(field: u32, value: u64) -> Vec<u8> {
    let mut out = Vec::new();
    put_tag(field, WireType::Varint, &mut out);
    put_varint(value, &mut out);
    out
}

fn len_field(field: u32, payload: &[u8]) -> Vec<u8> {
    let mut out = Vec::new();
    put_len_field(field, payload, &mut out);
    out
}

fn set_propagation(mount: usize) -> Edit {
    Edit {
        path: vec![
            Step::Field(REQUEST_CONFIG),
            Step::Item(CONFIG_MOUNTS, mount),
        ],
        op: Op::SetVarint {
            field: MOUNT_PROPAGATION,
            value: HOST_TO_CONTAINER,
        },
    }
}

fn annotate(key: &str, value: &str) -> Edit {
    Edit {
        path: vec![Step::Field(REQUEST_CONFIG)],
        op: Op::Append {
            field: CONFIG_ANNOTATIONS,
            value: map_entry(key, value),
        },
    }
}

fn mount(host: &str, container: &str, propagation: MountPropagation) -> Mount {
    Mount {
        host_path: host.into(),
        container_path: container.into(),
        propagation: propagation as i32,
        ..Default::default()
    }
}

fn request(mounts: Vec<Mount>, annotations: &[(&str, &str)]) -> CreateContainerRequest {
    CreateContainerRequest {
        pod_sandbox_id: "4f797c539e6c".into(),
        config: Some(ContainerConfig {
            metadata: Some(ContainerMetadata {
                name: "app".into(),
                attempt: 1,
            }),
            command: vec!["/bin/sh".into(), "-c".into(), "sleep 1".into()],
            mounts,
            annotations: annotations
                .iter()
                .map(|(k, v)| (k.to_string(), v.to_string()))
                .collect(),
            ..Default::default()
        }),
        sandbox_config: Some(PodSandboxConfig {
            metadata: Some(PodSandboxMetadata {
                name: "pod".into(),
                namespace: "default".into(),
                ..Default::default()
            }),
            ..Default::default()
        }),
    }
}

fn five_mounts() -> Vec<Mount> {
    (0..5)
        .map(|i| {
            mount(
                &format!("/host/{i}"),
                &format!("/ctr/{i}"),
                MountPropagation::PropagationPrivate,
            )
        })
        .collect()
}

/// Unknown fields to plant in an encoding.
#[derive(Debug, Clone, Default)]
struct Unknowns {
    /// Appended to the whole request.
    top: Option<u64>,
    /// Inserted in the config before mount i (or at its end).
    config: Option<(usize, Vec<u8>)>,
    /// Appended to mount i.
    mount: Vec<(usize, u64)>,
}

/// Encodes `request` as prost would, plus `unknowns`, the way a newer kubelet might.
fn encode_with(request: &CreateContainerRequest, unknowns: &Unknowns) -> Vec<u8> {
    let Some(config) = &request.config else {
        return request.encode_to_vec();
    };
    let mut bare_config = config.clone();
    bare_config.mounts.clear();
    let mut config_bytes = bare_config.encode_to_vec();
    for i in 0..=config.mounts.len() {
        if let Some((at, payload)) = &unknowns.config {
            if *at == i {
                config_bytes.extend(len_field(UNKNOWN_CONFIG, payload));
            }
        }
        let Some(m) = config.mounts.get(i) else {
            break;
        };
        let mut mount_bytes = m.encode_to_vec();
        for (at, value) in &unknowns.mount {
            if *at == i {
                mount_bytes.extend(varint_field(UNKNOWN_MOUNT, *value));
            }
        }
        config_bytes.extend(len_field(CONFIG_MOUNTS, &mount_bytes));
    }
    let mut bare = request.clone();
    bare.config = None;
    let sandbox = bare.sandbox_config.take();
    let mut out = bare.encode_to_vec();
    out.extend(len_field(REQUEST_CONFIG, &config_bytes));
    if let Some(top) = unknowns.top {
        out.extend(varint_field(UNKNOWN_TOP, top));
    }
    if let Some(sandbox) = sandbox {
        out.extend(len_field(3, &sandbox.encode_to_vec()));
    }
    out
}

fn all_fields(message: &[u8]) -> Vec<Field> {
    fields(message).collect::<Result<_, _>>().unwrap()
}

fn nth(message: &[u8], number: u32, n: usize) -> Field {
    all_fields(message)
        .into_iter()
        .filter(|f| f.number == number)
        .nth(n)
        .unwrap()
}

fn bytes<'m>(message: &'m [u8], range: &Range<usize>) -> &'m [u8] {
    &message[range.clone()]
}

/// Checks, field by field, that `output` is `input` with exactly the proxy's edit: each mount
/// in `edited` has propagation HOST_TO_CONTAINER, one annotation entry `appended` at the end of
/// the config, and every other field's bytes identical and in the same order.
fn assert_only_edited(input: &[u8], output: &[u8], edited: &[usize], appended: &[u8]) {
    let (a, b) = (all_fields(input), all_fields(output));
    assert_eq!(a.len(), b.len(), "top-level field count");
    for (fa, fb) in a.iter().zip(&b) {
        if fa.number != REQUEST_CONFIG {
            assert_eq!(bytes(input, &fa.span()), bytes(output, &fb.span()));
            continue;
        }
        assert_eq!(bytes(input, &fa.tag), bytes(output, &fb.tag));
        let (ci, co) = (bytes(input, &fa.value), bytes(output, &fb.value));
        let (ca, cb) = (all_fields(ci), all_fields(co));
        assert_eq!(ca.len() + 1, cb.len(), "config gains one field");
        let last = cb.last().unwrap();
        assert_eq!(last.number, CONFIG_ANNOTATIONS);
        assert_eq!(bytes(co, &last.value), appended);
        let mut mount_index = 0;
        for (ga, gb) in ca.iter().zip(&cb) {
            let is_edited = ga.number == CONFIG_MOUNTS && edited.contains(&mount_index);
            if ga.number == CONFIG_MOUNTS {
                mount_index += 1;
            }
            if !is_edited {
                assert_eq!(bytes(ci, &ga.span()), bytes(co, &gb.span()));
                continue;
            }
            assert_eq!(bytes(ci, &ga.tag), bytes(co, &gb.tag));
            let (mi, mo) = (bytes(ci, &ga.value), bytes(co, &gb.value));
            let (ma, mb) = (all_fields(mi), all_fields(mo));
            let others = |m: &[u8], fs: &[Field]| -> Vec<Vec<u8>> {
                fs.iter()
                    .filter(|f| f.number != MOUNT_PROPAGATION)
                    .map(|f| bytes(m, &f.span()).to_vec())
                    .collect()
            };
            assert_eq!(others(mi, &ma), others(mo, &mb));
            let props: Vec<&Field> = mb
                .iter()
                .filter(|f| f.number == MOUNT_PROPAGATION)
                .collect();
            assert_eq!(props.len(), 1);
            assert_eq!(bytes(mo, &props[0].value), [HOST_TO_CONTAINER as u8]);
        }
    }
}

fn decode(bytes: &[u8]) -> CreateContainerRequest {
    CreateContainerRequest::decode(bytes).unwrap()
}

#[test]
fn sets_one_mount_and_appends_an_annotation() {
    let original = request(five_mounts(), &[("a", "1")]);
    let input = original.encode_to_vec();
    let output = apply(&input, &[set_propagation(3), annotate("k", "v")]).unwrap();

    let mut expected = original.clone();
    let config = expected.config.as_mut().unwrap();
    config.mounts[3].propagation = HOST_TO_CONTAINER as i32;
    config.annotations.insert("k".into(), "v".into());
    assert_eq!(decode(&output), expected);
    assert_only_edited(&input, &output, &[3], &map_entry("k", "v"));
}

#[test]
fn unknown_fields_survive_at_every_level() {
    let original = request(five_mounts(), &[]);
    let unknowns = Unknowns {
        top: Some(123_456),
        config: Some((2, b"from a newer kubelet".to_vec())),
        mount: vec![(3, 7), (1, 8)],
    };
    let input = encode_with(&original, &unknowns);
    let output = apply(&input, &[set_propagation(3), annotate("k", "v")]).unwrap();
    assert_only_edited(&input, &output, &[3], &map_entry("k", "v"));

    let top = varint_field(UNKNOWN_TOP, 123_456);
    let config = len_field(UNKNOWN_CONFIG, b"from a newer kubelet");
    let mount = varint_field(UNKNOWN_MOUNT, 7);
    for planted in [&top, &config, &mount] {
        assert!(output
            .windows(planted.len())
            .any(|w| w == planted.as_slice()));
    }
    // And prost still reads the known fields.
    let decoded = decode(&output).config.unwrap();
    assert_eq!(decoded.mounts[3].propagation, HOST_TO_CONTAINER as i32);
    assert_eq!(decoded.annotations["k"], "v");
}

#[test]
fn no_edits_copy_the_message_exactly() {
    let input = encode_with(
        &request(five_mounts(), &[("a", "b")]),
        &Unknowns {
            top: Some(1),
            ..Default::default()
        },
    );
    assert_eq!(apply(&input, &[]).unwrap(), input);
}

#[test]
fn edits_an_empty_config() {
    let original = CreateContainerRequest {
        pod_sandbox_id: "p".into(),
        config: Some(ContainerConfig::default()),
        sandbox_config: None,
    };
    let input = original.encode_to_vec();
    assert_eq!(nth(&input, REQUEST_CONFIG, 0).value.len(), 0);
    let output = apply(&input, &[annotate("k", "v")]).unwrap();
    assert_eq!(
        decode(&output).config.unwrap().annotations,
        HashMap::from([("k".to_string(), "v".to_string())])
    );
    assert_eq!(
        apply(&input, &[set_propagation(0)]),
        Err(WireError::NoSuchItem {
            field: CONFIG_MOUNTS,
            index: 0,
            count: 0,
            offset: nth(&input, REQUEST_CONFIG, 0).value.start,
        })
    );
}

#[test]
fn replaces_an_existing_propagation_in_place() {
    let mut mounts = five_mounts();
    mounts[1].propagation = MountPropagation::PropagationBidirectional as i32;
    let input = request(mounts, &[]).encode_to_vec();
    let edit = Edit {
        path: vec![Step::Field(REQUEST_CONFIG), Step::Item(CONFIG_MOUNTS, 1)],
        op: Op::SetVarint {
            field: MOUNT_PROPAGATION,
            value: HOST_TO_CONTAINER,
        },
    };
    let output = apply(&input, &[edit]).unwrap();
    assert_eq!(
        output.len(),
        input.len(),
        "same size: replaced, not appended"
    );
    let config = decode(&output).config.unwrap();
    assert_eq!(config.mounts[1].propagation, HOST_TO_CONTAINER as i32);
    let mount = nth(&output, REQUEST_CONFIG, 0);
    let mount = bytes(&output, &mount.value);
    let mount = bytes(mount, &nth(mount, CONFIG_MOUNTS, 1).value);
    let props: Vec<Field> = all_fields(mount)
        .into_iter()
        .filter(|f| f.number == MOUNT_PROPAGATION)
        .collect();
    assert_eq!(props.len(), 1);
}

#[test]
fn earlier_occurrences_are_dropped_and_the_last_replaced_with_its_tag() {
    // propagation twice, the second with a non-canonical tag (0xa8 0x00) and value.
    let mut mount = Mount {
        host_path: "/".into(),
        ..Default::default()
    }
    .encode_to_vec();
    mount.extend(varint_field(MOUNT_PROPAGATION, 2));
    mount.extend(varint_field(UNKNOWN_MOUNT, 5));
    mount.extend([0xa8, 0x00, 0x82, 0x00]);
    let input = len_field(REQUEST_CONFIG, &len_field(CONFIG_MOUNTS, &mount));
    let output = apply(&input, &[set_propagation(0)]).unwrap();

    let mut expected_mount = Mount {
        host_path: "/".into(),
        ..Default::default()
    }
    .encode_to_vec();
    expected_mount.extend(varint_field(UNKNOWN_MOUNT, 5));
    expected_mount.extend([0xa8, 0x00, 0x01]);
    assert_eq!(
        output,
        len_field(REQUEST_CONFIG, &len_field(CONFIG_MOUNTS, &expected_mount))
    );
}

#[test]
fn absent_varint_is_appended() {
    let input = len_field(
        REQUEST_CONFIG,
        &len_field(CONFIG_MOUNTS, &len_field(2, b"/")),
    );
    let output = apply(&input, &[set_propagation(0)]).unwrap();
    let mut mount = len_field(2, b"/");
    mount.extend(varint_field(MOUNT_PROPAGATION, HOST_TO_CONTAINER));
    assert_eq!(
        output,
        len_field(REQUEST_CONFIG, &len_field(CONFIG_MOUNTS, &mount))
    );
}

#[test]
fn edits_several_mounts_in_one_batch() {
    let original = request(five_mounts(), &[]);
    let input = encode_with(
        &original,
        &Unknowns {
            mount: vec![(0, 1), (2, 2), (3, 3)],
            ..Default::default()
        },
    );
    let edits = [
        set_propagation(4),
        set_propagation(0),
        annotate("k", "v"),
        set_propagation(2),
    ];
    let output = apply(&input, &edits).unwrap();
    assert_only_edited(&input, &output, &[0, 2, 4], &map_entry("k", "v"));
    let config = decode(&output).config.unwrap();
    let props: Vec<i32> = config.mounts.iter().map(|m| m.propagation).collect();
    assert_eq!(props, [1, 0, 1, 0, 1]);
}

#[test]
fn appended_annotation_overrides_an_existing_key() {
    let input = request(five_mounts(), &[("k", "old"), ("other", "x")]).encode_to_vec();
    let output = apply(&input, &[annotate("k", "new")]).unwrap();
    let annotations = decode(&output).config.unwrap().annotations;
    assert_eq!(annotations["k"], "new");
    assert_eq!(annotations["other"], "x");
    assert_eq!(annotations.len(), 2);
}

#[test]
fn map_entry_is_a_prost_map_entry() {
    let config = ContainerConfig {
        annotations: HashMap::from([("key".to_string(), "a value".to_string())]),
        ..Default::default()
    };
    let encoded = config.encode_to_vec();
    let entry = nth(&encoded, CONFIG_ANNOTATIONS, 0);
    assert_eq!(bytes(&encoded, &entry.value), map_entry("key", "a value"));
}

#[test]
fn item_indexes_the_original_occurrences_even_when_a_mount_is_appended() {
    let input = request(five_mounts(), &[]).encode_to_vec();
    let new_mount = mount("/new", "/new", MountPropagation::PropagationPrivate).encode_to_vec();
    let edits = [
        Edit {
            path: vec![Step::Field(REQUEST_CONFIG)],
            op: Op::Append {
                field: CONFIG_MOUNTS,
                value: new_mount,
            },
        },
        set_propagation(4),
    ];
    let config = decode(&apply(&input, &edits).unwrap()).config.unwrap();
    assert_eq!(config.mounts.len(), 6);
    assert_eq!(config.mounts[4].propagation, HOST_TO_CONTAINER as i32);
    assert_eq!(config.mounts[5].host_path, "/new");
}

#[test]
fn field_and_first_item_are_the_same_occurrence() {
    let input = len_field(1, &varint_field(2, 0));
    let edits = [
        Edit {
            path: vec![Step::Field(1)],
            op: Op::SetVarint { field: 2, value: 5 },
        },
        Edit {
            path: vec![Step::Item(1, 0)],
            op: Op::SetVarint { field: 3, value: 6 },
        },
    ];
    let mut inner = varint_field(2, 5);
    inner.extend(varint_field(3, 6));
    assert_eq!(apply(&input, &edits).unwrap(), len_field(1, &inner));
}

#[test]
fn later_set_of_the_same_field_wins() {
    let edits = [
        Edit {
            path: vec![],
            op: Op::SetVarint { field: 4, value: 1 },
        },
        Edit {
            path: vec![],
            op: Op::SetVarint {
                field: 4,
                value: 300,
            },
        },
    ];
    assert_eq!(apply(&[], &edits).unwrap(), varint_field(4, 300));
}

#[test]
fn lengths_are_reencoded_minimally_only_along_the_path() {
    // The config's length is non-canonical (3 bytes for 0), and so is an unrelated field's.
    let mut input = vec![0x12, 0x80, 0x80, 0x00];
    input.extend([0x1a, 0x81, 0x00, 0xff]); // field 3, length 1 in two bytes
    let output = apply(&input, &[annotate("k", "v")]).unwrap();
    let mut expected = len_field(
        REQUEST_CONFIG,
        &len_field(CONFIG_ANNOTATIONS, &map_entry("k", "v")),
    );
    expected.extend([0x1a, 0x81, 0x00, 0xff]);
    assert_eq!(output, expected);
}

#[test]
fn growing_past_127_bytes_grows_the_length_prefix() {
    let input = len_field(REQUEST_CONFIG, &len_field(3, &[b'x'; 120]));
    assert_eq!(input[1], 122);
    let output = apply(&input, &[annotate("key", "value")]).unwrap();
    let config = nth(&output, REQUEST_CONFIG, 0);
    assert_eq!(config.value.start - config.tag.end, 2);
    assert_eq!(
        config.value.len(),
        122 + 2 + map_entry("key", "value").len()
    );
}

#[test]
fn reader_reports_spans() {
    // 1: varint 150, 2: "hi", 3: fixed32, 4: fixed64
    let mut message = vec![0x08, 0x96, 0x01, 0x12, 0x02, b'h', b'i'];
    message.extend([0x1d, 1, 2, 3, 4, 0x21, 1, 2, 3, 4, 5, 6, 7, 8]);
    let summary: Vec<(u32, WireType, Range<usize>, Range<usize>)> = all_fields(&message)
        .into_iter()
        .map(|f| (f.number, f.wire_type, f.tag, f.value))
        .collect();
    assert_eq!(
        summary,
        [
            (1, WireType::Varint, 0..1, 1..3),
            (2, WireType::Len, 3..4, 5..7),
            (3, WireType::I32, 7..8, 8..12),
            (4, WireType::I64, 12..13, 13..21),
        ]
    );
    let mut broken = fields(&[0x08, 0x96, 0x01, 0x08]);
    assert!(broken.next().unwrap().is_ok());
    assert_eq!(
        broken.next(),
        Some(Err(WireError::TruncatedVarint { offset: 4 }))
    );
    assert_eq!(broken.next(), None);
}

fn err(message: &[u8], edits: &[Edit]) -> WireError {
    apply(message, edits).unwrap_err()
}

#[test]
fn malformed_messages_are_reported_with_offsets() {
    let annotate = [annotate("k", "v")];
    assert_eq!(err(&[0x08], &[]), WireError::TruncatedVarint { offset: 1 });
    assert_eq!(
        err(
            &[0x08, 0x80, 0x80, 0x80, 0x80, 0x80, 0x80, 0x80, 0x80, 0x80, 0x80, 0x00],
            &[]
        ),
        WireError::VarintOverflow { offset: 1 }
    );
    assert_eq!(
        err(
            &[0x08, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0x80, 0x02],
            &[]
        ),
        WireError::VarintOverflow { offset: 1 }
    );
    // The largest 10-byte varint is fine.
    assert!(apply(
        &[0x08, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0x01],
        &[]
    )
    .is_ok());
    assert_eq!(
        err(&[0x12, 0x05, 0x00], &annotate),
        WireError::LengthPastEnd {
            field: 2,
            offset: 0,
            len: 5,
            available: 1
        }
    );
    assert_eq!(
        err(&[0x0d, 0x00], &[]),
        WireError::LengthPastEnd {
            field: 1,
            offset: 0,
            len: 4,
            available: 1
        }
    );
    assert_eq!(
        err(&[0x0b, 0x0c], &[]),
        WireError::Group {
            field: 1,
            offset: 0,
            wire_type: 3
        }
    );
    assert_eq!(
        err(&[0x08, 0x00, 0x0e], &[]),
        WireError::InvalidWireType {
            field: 1,
            offset: 2,
            wire_type: 6
        }
    );
    assert_eq!(
        err(&[0x00, 0x00], &[]),
        WireError::InvalidFieldNumber {
            field: 0,
            offset: 0
        }
    );
    assert_eq!(
        err(&[0x80, 0x80, 0x80, 0x80, 0x10, 0x00], &[]),
        WireError::InvalidFieldNumber {
            field: 1 << 29,
            offset: 0
        }
    );
}

#[test]
fn malformed_field_inside_an_edited_mount_fails_the_whole_edit() {
    let original = request(five_mounts(), &[]);
    let mut config = original.config.clone().unwrap();
    let mut broken = config.mounts[3].encode_to_vec();
    broken.push(0x28); // propagation's tag, with no value
    config.mounts.truncate(3);
    let mut config_bytes = config.encode_to_vec();
    config_bytes.extend(len_field(CONFIG_MOUNTS, &broken));
    let input = len_field(REQUEST_CONFIG, &config_bytes);
    let mount = nth(bytes(&input, &nth(&input, 2, 0).value), CONFIG_MOUNTS, 3);
    let offset = nth(&input, 2, 0).value.start + mount.value.end;
    assert_eq!(
        err(&input, &[set_propagation(3), annotate("k", "v")]),
        WireError::TruncatedVarint { offset }
    );
    // A mount the edits do not enter is opaque bytes, copied as they came.
    assert!(apply(&input, &[set_propagation(0)]).is_ok());
}

#[test]
fn paths_that_do_not_lead_to_one_message_are_errors() {
    let input = request(five_mounts(), &[]).encode_to_vec();
    let config_at = nth(&input, REQUEST_CONFIG, 0).value.start;
    assert_eq!(
        err(
            &CreateContainerRequest::default().encode_to_vec(),
            &[annotate("k", "v")]
        ),
        WireError::Missing {
            field: REQUEST_CONFIG,
            offset: 0
        }
    );
    assert_eq!(
        err(&input, &[set_propagation(5)]),
        WireError::NoSuchItem {
            field: CONFIG_MOUNTS,
            index: 5,
            count: 5,
            offset: config_at
        }
    );
    let mut twice = input.clone();
    twice.extend(len_field(REQUEST_CONFIG, &[]));
    assert_eq!(
        err(&twice, &[annotate("k", "v")]),
        WireError::Ambiguous {
            field: REQUEST_CONFIG,
            count: 2,
            offset: 0
        }
    );
    // ContainerConfig.stdin (12) is a bool.
    let mut stdin = request(vec![], &[]);
    stdin.config.as_mut().unwrap().stdin = true;
    let stdin = stdin.encode_to_vec();
    let edit = Edit {
        path: vec![Step::Field(REQUEST_CONFIG), Step::Field(12)],
        op: Op::SetVarint { field: 1, value: 1 },
    };
    assert!(matches!(
        err(&stdin, &[edit]),
        WireError::NotAMessage {
            field: 12,
            found: WireType::Varint,
            ..
        }
    ));
    let edit = Edit {
        path: vec![],
        op: Op::SetVarint {
            field: REQUEST_CONFIG,
            value: 1,
        },
    };
    assert_eq!(
        err(&input, &[edit]),
        WireError::NotAVarint {
            field: REQUEST_CONFIG,
            offset: nth(&input, REQUEST_CONFIG, 0).tag.start,
            found: WireType::Len
        }
    );
}

#[test]
fn invalid_edits_are_errors() {
    let set = |path: Vec<Step>, field: u32| Edit {
        path,
        op: Op::SetVarint { field, value: 1 },
    };
    assert_eq!(
        err(&[], &[set(vec![], 0)]),
        WireError::InvalidEditField { field: 0 }
    );
    assert_eq!(
        err(&[], &[set(vec![Step::Item(1 << 29, 0)], 1)]),
        WireError::InvalidEditField { field: 1 << 29 }
    );
    assert_eq!(
        err(&[], &[set(vec![Step::Field(1); MAX_PATH_LEN + 1], 1)]),
        WireError::PathTooLong {
            len: MAX_PATH_LEN + 1
        }
    );
    assert_eq!(
        err(&[], &[set(vec![Step::Field(2)], 1), set(vec![], 2)]),
        WireError::ConflictingEdits { field: 2 }
    );
    let append = Edit {
        path: vec![],
        op: Op::Append {
            field: 2,
            value: vec![],
        },
    };
    assert_eq!(
        err(&[], &[append, set(vec![], 2)]),
        WireError::ConflictingEdits { field: 2 }
    );
}

#[test]
fn errors_read_well() {
    let e = WireError::NoSuchItem {
        field: 7,
        index: 3,
        count: 2,
        offset: 40,
    };
    assert_eq!(
        e.to_string(),
        "field 7 occurs 2 times in the message at byte 40, so it has no item 3"
    );
    let e = WireError::NotAMessage {
        field: 12,
        offset: 9,
        found: WireType::Varint,
    };
    assert_eq!(
        e.to_string(),
        "field 12 at byte 9 is a varint, not an embedded message"
    );
}

// Property tests: dockhand builds on stable, where cargo-fuzz does not run, so these are the
// editor's fuzzer.

/// Arbitrary edits over few field numbers, so they often meet the generated fields.
fn arb_edit() -> impl Strategy<Value = Edit> {
    let step = prop_oneof![
        1 => (1u32..4).prop_map(Step::Field),
        3 => ((1u32..4), 0usize..2).prop_map(|(f, i)| Step::Item(f, i)),
    ];
    let op = prop_oneof![
        ((1u32..4), any::<u64>()).prop_map(|(field, value)| Op::SetVarint { field, value }),
        ((1u32..4), prop::collection::vec(any::<u8>(), 0..8))
            .prop_map(|(field, value)| Op::Append { field, value }),
    ];
    (prop::collection::vec(step, 0..4), op).prop_map(|(path, op)| Edit { path, op })
}

/// Encoded messages, mostly well formed, nested up to 4 levels, with some raw noise.
fn arb_message() -> impl Strategy<Value = Vec<u8>> {
    let leaf = prop_oneof![
        4 => ((1u32..4), any::<u64>()).prop_map(|(f, v)| varint_field(f, v)),
        2 => ((1u32..4), prop::collection::vec(any::<u8>(), 0..6)).prop_map(|(f, v)| len_field(f, &v)),
        1 => prop::collection::vec(any::<u8>(), 0..4),
    ];
    let message = leaf.prop_recursive(4, 64, 4, |inner| {
        prop::collection::vec(
            prop_oneof![
                1 => inner.clone(),
                3 => ((1u32..4), inner).prop_map(|(f, m)| len_field(f, &m)),
            ],
            0..4,
        )
        .prop_map(|parts| parts.concat())
    });
    prop_oneof![4 => message, 1 => prop::collection::vec(any::<u8>(), 0..64)]
}

/// Validates `message` and, following `path` as far as it leads, every message on it.
fn parses_along(message: &[u8], path: &[Step]) -> bool {
    let Ok(all) = fields(message).collect::<Result<Vec<_>, _>>() else {
        return false;
    };
    let Some((step, rest)) = path.split_first() else {
        return true;
    };
    let (field, index) = match *step {
        Step::Field(f) => (f, 0),
        Step::Item(f, i) => (f, i),
    };
    match all.iter().filter(|f| f.number == field).nth(index) {
        Some(f) if f.wire_type == WireType::Len => parses_along(&message[f.value.clone()], rest),
        _ => true,
    }
}

/// A path that exists in `message`: each choice picks one of the embedded fields that parse as
/// messages at that level, as `Item` (or `Field` when it is the only occurrence).
fn existing_path(message: &[u8], choices: &[usize]) -> Vec<Step> {
    let mut path = Vec::new();
    let mut current = message;
    for &choice in choices {
        let Ok(all) = fields(current).collect::<Result<Vec<_>, _>>() else {
            break;
        };
        let nested: Vec<(Step, Range<usize>)> = all
            .iter()
            .filter(|f| {
                f.wire_type == WireType::Len && fields(&current[f.value.clone()]).all(|r| r.is_ok())
            })
            .map(|f| {
                let ordinal = all
                    .iter()
                    .filter(|g| g.number == f.number && g.tag.start < f.tag.start)
                    .count();
                let only = all.iter().filter(|g| g.number == f.number).count() == 1;
                let step = if only && choice % 2 == 0 {
                    Step::Field(f.number)
                } else {
                    Step::Item(f.number, ordinal)
                };
                (step, f.value.clone())
            })
            .collect();
        if nested.is_empty() {
            break;
        }
        let (step, value) = nested[choice % nested.len()].clone();
        path.push(step);
        current = &current[value];
    }
    path
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(1024))]

    #[test]
    fn arbitrary_input_never_panics(
        message in arb_message(),
        edits in prop::collection::vec(arb_edit(), 0..4),
        existing in prop::collection::vec(
            (prop::collection::vec(any::<usize>(), 0..4), arb_edit()),
            0..4,
        ),
    ) {
        let mut edits = edits;
        // Half the cases: only paths that exist, so the edit mostly goes through.
        if !existing.is_empty() {
            edits = existing
                .into_iter()
                .map(|(choices, edit)| Edit { path: existing_path(&message, &choices), op: edit.op })
                .collect();
        }
        if let Ok(output) = apply(&message, &edits) {
            for edit in &edits {
                prop_assert!(parses_along(&output, &edit.path));
            }
            if edits.is_empty() {
                prop_assert_eq!(output, message);
            }
        }
    }

    #[test]
    fn arbitrary_requests_get_exactly_the_edit(
        mounts in prop::collection::vec(
            ("/[a-z]{1,12}", "/[a-z ]{1,12}", any::<bool>(), 0i32..3),
            1..8,
        ),
        annotations in prop::collection::hash_map("[a-z]{1,4}", "[a-z]{0,8}", 0..5),
        top in prop::option::of(any::<u64>()),
        config_unknown in prop::option::of((0usize..8, prop::collection::vec(any::<u8>(), 0..40))),
        mount_unknowns in prop::collection::vec((0usize..8, any::<u64>()), 0..4),
        chosen in prop::collection::btree_set(0usize..8, 0..4),
        key in "[a-z]{1,4}",
        value in "[a-z]{0,300}",
    ) {
        let mounts: Vec<Mount> = mounts
            .into_iter()
            .map(|(host, ctr, readonly, propagation)| Mount {
                host_path: host,
                container_path: ctr,
                readonly,
                propagation,
                ..Default::default()
            })
            .collect();
        let chosen: Vec<usize> = chosen.into_iter().filter(|i| *i < mounts.len()).collect();
        let mut original = request(mounts, &[]);
        original.config.as_mut().unwrap().annotations = annotations;
        let unknowns = Unknowns { top, config: config_unknown, mount: mount_unknowns };
        let input = encode_with(&original, &unknowns);

        let mut edits: Vec<Edit> = chosen.iter().map(|&i| set_propagation(i)).collect();
        edits.push(annotate(&key, &value));
        let output = apply(&input, &edits).unwrap();

        let mut expected = original.clone();
        let config = expected.config.as_mut().unwrap();
        for &i in &chosen {
            config.mounts[i].propagation = HOST_TO_CONTAINER as i32;
        }
        config.annotations.insert(key.clone(), value.clone());
        prop_assert_eq!(decode(&output), expected);
        assert_only_edited(&input, &output, &chosen, &map_entry(&key, &value));
    }
}

#[test]
fn repeated_fields_cost_linear_time() {
    // A million bytes of one repeated varint field: a quadratic walk would not finish.
    let input: Vec<u8> = [0x28, 0x01].repeat(500_000);
    let edit = Edit {
        path: vec![],
        op: Op::SetVarint { field: 5, value: 2 },
    };
    assert_eq!(apply(&input, &[edit]).unwrap(), [0x28, 0x02]);
    let mut nested = len_field(7, &input);
    nested.extend(len_field(7, &[]));
    let edit = Edit {
        path: vec![Step::Item(7, 1)],
        op: Op::SetVarint { field: 5, value: 2 },
    };
    let output = apply(&nested, &[edit]).unwrap();
    assert_eq!(&output[..output.len() - 4], &nested[..nested.len() - 2]);
}

#[test]
fn deep_paths_are_followed() {
    let mut message = varint_field(1, 1);
    for _ in 0..MAX_PATH_LEN {
        message = len_field(1, &message);
    }
    let edit = Edit {
        path: vec![Step::Field(1); MAX_PATH_LEN],
        op: Op::SetVarint {
            field: 1,
            value: 300,
        },
    };
    let output = apply(&message, &[edit]).unwrap();
    let mut expected = varint_field(1, 300);
    for _ in 0..MAX_PATH_LEN {
        expected = len_field(1, &expected);
    }
    assert_eq!(output, expected);
}

/// The largest field number protobuf allows is a field like any other: read, kept byte for byte
/// through an edit elsewhere, and itself editable (one more is refused: see above).
#[test]
fn the_largest_field_number_is_a_field_like_any_other() {
    let largest = varint_field(MAX_FIELD_NUMBER, 5);
    let message = [varint_field(1, 1), largest.clone()].concat();
    let read = all_fields(&message);
    assert_eq!(read.len(), 2);
    assert_eq!(read[1].number, MAX_FIELD_NUMBER);
    assert_eq!(bytes(&message, &read[1].span()), largest.as_slice());

    let set_first = Edit {
        path: vec![],
        op: Op::SetVarint { field: 1, value: 2 },
    };
    let edited = apply(&message, &[set_first]).unwrap();
    assert_eq!(edited, [varint_field(1, 2), largest].concat());

    let set_largest = Edit {
        path: vec![],
        op: Op::SetVarint {
            field: MAX_FIELD_NUMBER,
            value: 6,
        },
    };
    let edited = apply(&message, &[set_largest]).unwrap();
    assert_eq!(
        edited,
        [varint_field(1, 1), varint_field(MAX_FIELD_NUMBER, 6)].concat()
    );
}
