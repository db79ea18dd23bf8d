//! Comparing what a scenario observed straight from containerd with what it observed through the
//! proxy: a [`Transcript`] records each step's outcome as text, and [`assert_same`] compares two
//! after normalising what legitimately differs between runs (ids, times, map order).

use std::collections::HashMap;
use std::fmt::Debug;

use tonic::Status;

/// What a scenario observed, step by step, in a form both ways can be compared in.
#[derive(Default)]
pub struct Transcript {
    pub steps: Vec<(String, String)>,
    /// Strings that legitimately differ between the two runs (pod uids), replaced before compare.
    aliases: Vec<(String, String)>,
}

impl Transcript {
    pub fn record<T: Debug>(&mut self, step: &str, outcome: &Result<T, Status>) {
        let text = match outcome {
            Ok(value) => format!("{value:#?}"),
            // Metadata may legitimately differ (transport headers); code and message may not.
            Err(status) => format!("Err({:?}, {:?})", status.code(), status.message()),
        };
        self.steps.push((step.to_string(), text));
    }

    /// Like `record`, for an outcome already rendered as text.
    pub fn record_text(&mut self, step: &str, outcome: Result<String, Status>) {
        match outcome {
            Ok(text) => self.note(step, text),
            Err(status) => self.record::<()>(step, &Err(status)),
        }
    }

    pub fn note(&mut self, step: &str, text: String) {
        self.steps.push((step.to_string(), text));
    }

    pub fn alias(&mut self, value: &str, name: &str) {
        self.aliases.push((value.to_string(), name.to_string()));
    }

    /// The transcript with aliases applied, 64-hex ids numbered by first appearance, nanosecond
    /// timestamps and RFC 3339 times blanked, and map entries sorted (HashMap order is random).
    pub fn normalised(&self) -> Vec<(String, String)> {
        let mut ids: HashMap<String, String> = HashMap::new();
        self.steps
            .iter()
            .map(|(step, text)| {
                let mut text = text.clone();
                for (value, name) in &self.aliases {
                    text = text.replace(value, name);
                }
                (
                    step.clone(),
                    sort_map_entries(&normalise_tokens(&text, &mut ids)),
                )
            })
            .collect()
    }
}

fn normalise_tokens(text: &str, ids: &mut HashMap<String, String>) -> String {
    let mut out = String::new();
    let mut token = String::new();
    let flush = |token: &mut String, out: &mut String, ids: &mut HashMap<String, String>| {
        let is_hex = token.len() == 64 && token.chars().all(|c| c.is_ascii_hexdigit());
        let is_nanos = token.len() == 19 && token.chars().all(|c| c.is_ascii_digit());
        if is_hex {
            let next = format!("<id{}>", ids.len());
            out.push_str(ids.entry(token.clone()).or_insert(next));
        } else if is_nanos {
            out.push_str("<nanos>");
        } else if looks_like_rfc3339(token) {
            out.push_str("<time>");
        } else {
            out.push_str(token);
        }
        token.clear();
    };
    for c in text.chars() {
        if c.is_ascii_alphanumeric() || matches!(c, '-' | ':' | '.') {
            token.push(c);
        } else {
            flush(&mut token, &mut out, ids);
            out.push(c);
        }
    }
    flush(&mut token, &mut out, ids);
    out
}

fn looks_like_rfc3339(token: &str) -> bool {
    let bytes = token.as_bytes();
    bytes.len() >= 20
        && bytes[4] == b'-'
        && bytes[7] == b'-'
        && bytes[10] == b'T'
        && bytes[13] == b':'
}

/// Sorts runs of consecutive `"key": value,` lines (map entries in pretty Debug output).
fn sort_map_entries(text: &str) -> String {
    let mut out: Vec<String> = Vec::new();
    let mut run: Vec<String> = Vec::new();
    for line in text.lines() {
        if line.trim_start().starts_with('"') && line.contains("\": ") {
            run.push(line.to_string());
        } else {
            run.sort();
            out.append(&mut run);
            out.push(line.to_string());
        }
    }
    run.sort();
    out.append(&mut run);
    out.join("\n")
}

/// Asserts that the scenario looked the same both ways, step by step.
pub fn assert_same(direct: &Transcript, via_proxy: &Transcript) {
    let (direct, via_proxy) = (direct.normalised(), via_proxy.normalised());
    for (d, p) in direct.iter().zip(&via_proxy) {
        assert_eq!(d, p, "step {:?} differs through the proxy", d.0);
    }
    assert_eq!(direct.len(), via_proxy.len(), "different number of steps");
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ids_times_aliases_and_map_order_are_normalised() {
        let id_a = "a".repeat(64);
        let id_b = "b".repeat(64);
        let mut first = Transcript::default();
        first.alias("uid-1", "<uid>");
        first.note(
            "s",
            format!("{id_a} {id_b} {id_a} 1764108000123456789 uid-1\n  \"k\": 1,\n  \"j\": 2,"),
        );
        let mut second = Transcript::default();
        second.alias("uid-2", "<uid>");
        second.note(
            "s",
            format!("{id_b} {id_a} {id_b} 1764108000999999999 uid-2\n  \"j\": 2,\n  \"k\": 1,"),
        );
        assert_same(&first, &second);
        assert_eq!(
            first.normalised()[0].1,
            "<id0> <id1> <id0> <nanos> <uid>\n  \"j\": 2,\n  \"k\": 1,"
        );
    }

    #[test]
    #[should_panic(expected = "differs")]
    fn a_different_outcome_is_reported() {
        let mut first = Transcript::default();
        first.record::<()>("call", &Err(Status::not_found("no such container")));
        let mut second = Transcript::default();
        second.record::<()>("call", &Err(Status::unavailable("no such container")));
        assert_same(&first, &second);
    }
}
