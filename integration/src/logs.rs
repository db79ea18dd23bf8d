//! CRI container log files: `2016-10-06T00:17:09.669794202Z stdout F message` per line.

use std::path::Path;

use anyhow::{bail, Context, Result};

/// One line of a CRI log file.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LogLine {
    /// RFC 3339 time with nanoseconds, as written.
    pub time: String,
    /// `stdout` or `stderr`.
    pub stream: String,
    /// Tag `P`: the message continues on the next line.
    pub partial: bool,
    pub message: String,
}

/// Parses a whole CRI log file.
pub fn read_log(path: &Path) -> Result<Vec<LogLine>> {
    let text = std::fs::read_to_string(path).with_context(|| format!("read {}", path.display()))?;
    text.lines().map(parse_line).collect()
}

/// The messages of `stream` (`stdout`/`stderr`) in a CRI log file, partial lines joined.
pub fn read_messages(path: &Path, stream: &str) -> Result<Vec<String>> {
    let mut messages = Vec::new();
    let mut pending = String::new();
    for line in read_log(path)?.into_iter().filter(|l| l.stream == stream) {
        pending.push_str(&line.message);
        if !line.partial {
            messages.push(std::mem::take(&mut pending));
        }
    }
    if !pending.is_empty() {
        messages.push(pending);
    }
    Ok(messages)
}

/// Parses one line of a CRI log file.
pub fn parse_line(line: &str) -> Result<LogLine> {
    let mut parts = line.splitn(4, ' ');
    let (Some(time), Some(stream), Some(tag)) = (parts.next(), parts.next(), parts.next()) else {
        bail!("not a CRI log line: {line:?}");
    };
    let message = parts.next().unwrap_or("").to_string();
    if !matches!(stream, "stdout" | "stderr") || !matches!(tag, "F" | "P") {
        bail!("not a CRI log line: {line:?}");
    }
    if !(time.ends_with('Z') || time.contains('+')) || time.len() < 20 || &time[10..11] != "T" {
        bail!("bad time in CRI log line: {line:?}");
    }
    Ok(LogLine {
        time: time.into(),
        stream: stream.into(),
        partial: tag == "P",
        message,
    })
}

/// `secs` since the epoch as `YYYY-MM-DDThh:mm:ss.nnnnnnnnnZ`.
pub fn format_rfc3339(secs: i64, nanos: u32) -> String {
    let days = secs.div_euclid(86_400);
    let rem = secs.rem_euclid(86_400);
    // Howard Hinnant's civil_from_days.
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z.rem_euclid(146_097);
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let day = doy - (153 * mp + 2) / 5 + 1;
    let month = if mp < 10 { mp + 3 } else { mp - 9 };
    let year = yoe + era * 400 + i64::from(month <= 2);
    format!(
        "{year:04}-{month:02}-{day:02}T{:02}:{:02}:{:02}.{nanos:09}Z",
        rem / 3600,
        rem % 3600 / 60,
        rem % 60
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_full_and_partial_lines() {
        let line = parse_line("2016-10-06T00:17:09.669794202Z stdout F hello world").unwrap();
        assert_eq!(line.stream, "stdout");
        assert!(!line.partial);
        assert_eq!(line.message, "hello world");
        let line = parse_line("2016-10-06T00:17:09.669794202Z stderr P ").unwrap();
        assert!(line.partial);
        assert_eq!(line.message, "");
        assert!(parse_line("hello").is_err());
        assert!(parse_line("2016-10-06T00:17:09Z stdin F x").is_err());
    }

    #[test]
    fn formats_rfc3339() {
        assert_eq!(format_rfc3339(0, 0), "1970-01-01T00:00:00.000000000Z");
        assert_eq!(
            format_rfc3339(1_475_713_029, 669_794_202),
            "2016-10-06T00:17:09.669794202Z"
        );
    }
}
