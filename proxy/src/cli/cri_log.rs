//! The CRI log line format (`2016-10-06T00:17:09.669794202Z stdout F message`), read back the
//! way `kubectl logs` shows it: partial (`P`) lines joined with the line that ends them.
//!
//! Times by hand, not with jiff or humantime: the command reads one format (RFC 3339 as
//! containerd writes it, nanoseconds, `Z` or an offset) and `--since` takes kubectl's `10m`/`2h`
//! units; the hundred lines here are tested against both, where a date-time crate would add a
//! dependency tree to the binary every node runs for what the CLI alone uses.

/// One logical line: partial pieces joined, with the time of its first piece.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Line {
    pub time: String,
    /// Unix nanoseconds of `time` (0 when it does not parse).
    pub nanos: i64,
    pub stream: String,
    pub message: String,
}

/// Parses CRI log text into logical lines. Lines that are not CRI lines are kept as messages
/// (with no time) rather than dropped. A trailing partial line with no end is kept as it is.
pub fn parse(text: &str) -> Vec<Line> {
    let mut lines = Vec::new();
    // Pending partial pieces per stream (stdout and stderr interleave).
    let mut pending: Vec<Line> = Vec::new();
    for raw in text.split_inclusive('\n') {
        let raw = raw.strip_suffix('\n').unwrap_or(raw);
        let mut parts = raw.splitn(4, ' ');
        let (Some(time), Some(stream), Some(tag)) = (parts.next(), parts.next(), parts.next())
        else {
            lines.push(plain(raw));
            continue;
        };
        let message = parts.next().unwrap_or("");
        let nanos = parse_rfc3339_nanos(time);
        if nanos.is_none() || !(tag == "F" || tag == "P") {
            lines.push(plain(raw));
            continue;
        }
        let piece = match pending.iter().position(|p| p.stream == stream) {
            Some(i) => {
                let mut line = pending.remove(i);
                line.message.push_str(message);
                line
            }
            None => Line {
                time: time.to_string(),
                nanos: nanos.unwrap_or(0),
                stream: stream.to_string(),
                message: message.to_string(),
            },
        };
        if tag == "P" {
            pending.push(piece);
        } else {
            lines.push(piece);
        }
    }
    lines.extend(pending);
    lines
}

fn plain(raw: &str) -> Line {
    Line {
        time: String::new(),
        nanos: 0,
        stream: String::new(),
        message: raw.to_string(),
    }
}

/// Unix nanoseconds of an RFC 3339 time (`2016-10-06T00:17:09.669794202Z`, or with an offset).
pub fn parse_rfc3339_nanos(text: &str) -> Option<i64> {
    let b = text.as_bytes();
    if b.len() < 20 || b[4] != b'-' || b[7] != b'-' || !(b[10] == b'T' || b[10] == b't') {
        return None;
    }
    if b[13] != b':' || b[16] != b':' {
        return None;
    }
    let num = |range: std::ops::Range<usize>| -> Option<i64> {
        let s = text.get(range)?;
        s.bytes()
            .all(|c| c.is_ascii_digit())
            .then(|| s.parse().ok())?
    };
    let (year, month, day) = (num(0..4)?, num(5..7)?, num(8..10)?);
    let (hour, minute, second) = (num(11..13)?, num(14..16)?, num(17..19)?);
    if !(1..=12).contains(&month)
        || !(1..=31).contains(&day)
        || hour > 23
        || minute > 59
        || second > 60
    {
        return None;
    }
    let mut rest = &text[19..];
    let mut nanos = 0i64;
    if let Some(fraction) = rest.strip_prefix('.') {
        let digits = fraction.bytes().take_while(u8::is_ascii_digit).count();
        if digits == 0 {
            return None;
        }
        let mut value: i64 = fraction[..digits.min(9)].parse().ok()?;
        for _ in digits.min(9)..9 {
            value *= 10;
        }
        nanos = value;
        rest = &fraction[digits..];
    }
    let offset_seconds = match rest {
        "Z" | "z" => 0,
        _ if rest.len() == 6 && (rest.starts_with('+') || rest.starts_with('-')) => {
            let h: i64 = rest.get(1..3)?.parse().ok()?;
            let m: i64 = rest.get(4..6)?.parse().ok()?;
            let sign = if rest.starts_with('-') { -1 } else { 1 };
            sign * (h * 3600 + m * 60)
        }
        _ => return None,
    };
    let days = days_from_civil(year, month, day);
    let seconds = days * 86_400 + hour * 3600 + minute * 60 + second - offset_seconds;
    Some(seconds * 1_000_000_000 + nanos)
}

/// RFC 3339 in UTC with nanoseconds, as CRI writes it.
pub fn format_rfc3339(nanos: i64) -> String {
    let seconds = nanos.div_euclid(1_000_000_000);
    let fraction = nanos.rem_euclid(1_000_000_000);
    let (year, month, day) = civil_from_days(seconds.div_euclid(86_400));
    let of_day = seconds.rem_euclid(86_400);
    format!(
        "{year:04}-{month:02}-{day:02}T{:02}:{:02}:{:02}.{fraction:09}Z",
        of_day / 3600,
        of_day % 3600 / 60,
        of_day % 60
    )
}

// Howard Hinnant's civil calendar algorithms.
fn days_from_civil(y: i64, m: i64, d: i64) -> i64 {
    let y = if m <= 2 { y - 1 } else { y };
    let era = y.div_euclid(400);
    let yoe = y - era * 400;
    let doy = (153 * (if m > 2 { m - 3 } else { m + 9 }) + 2) / 5 + d - 1;
    let doe = yoe * 365 + yoe / 4 - yoe / 100 + doy;
    era * 146_097 + doe - 719_468
}

fn civil_from_days(z: i64) -> (i64, i64, i64) {
    let z = z + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z - era * 146_097;
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let y = yoe + era * 400;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let d = doy - (153 * mp + 2) / 5 + 1;
    let m = if mp < 10 { mp + 3 } else { mp - 9 };
    (if m <= 2 { y + 1 } else { y }, m, d)
}

/// A duration like `30s`, `10m`, `2h`, `1d` (or a plain number of seconds), in seconds.
pub fn parse_duration_seconds(text: &str) -> Option<u64> {
    let text = text.trim();
    let (number, unit) = match text.find(|c: char| !c.is_ascii_digit()) {
        Some(i) => text.split_at(i),
        None => (text, "s"),
    };
    let n: u64 = number.parse().ok()?;
    let scale = match unit {
        "s" => 1,
        "m" => 60,
        "h" => 3600,
        "d" => 86_400,
        _ => return None,
    };
    n.checked_mul(scale)
}
