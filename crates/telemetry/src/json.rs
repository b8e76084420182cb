//! The JSON log line (`--log-format json`), written with less work: the same object
//! `tracing_subscriber`'s JSON format writes,
//! `{"timestamp":…,"level":…,"fields":{…},"target":…}`, without a serde serializer
//! per line. With JSON logs the default formatter was a quarter of kas's instructions
//! per proxied request (22,900 of 84,000). Events inside a span (kas and agentk open
//! none; libraries may at trace level) go to the default formatter, which adds the
//! span and its parents.
//!
//! As the default: strings, `%` and `?` values (their `Display` or `Debug` text) and
//! errors (their `Display` text) are JSON strings; integers, floats (`null` if not
//! finite) and booleans are JSON values; every field is kept, `log.*` ones included.

use crate::text::{with_line, write_timestamp};
use std::fmt::{self, Write};
use std::time::SystemTime;
use tracing::field::{Field, Visit};
use tracing::{Event, Level, Subscriber};
use tracing_log::NormalizeEvent;
use tracing_subscriber::fmt::format::{Format, Json, Writer};
use tracing_subscriber::fmt::{FmtContext, FormatEvent, FormatFields};
use tracing_subscriber::registry::LookupSpan;

/// The event format; see the module docs.
#[derive(Debug)]
pub struct PlainJson {
    /// For events inside a span.
    in_span: Format<Json>,
}

impl Default for PlainJson {
    fn default() -> Self {
        PlainJson {
            in_span: tracing_subscriber::fmt::format().json(),
        }
    }
}

impl<S, N> FormatEvent<S, N> for PlainJson
where
    S: Subscriber + for<'a> LookupSpan<'a>,
    N: for<'a> FormatFields<'a> + 'static,
{
    fn format_event(
        &self,
        ctx: &FmtContext<'_, S, N>,
        mut writer: Writer<'_>,
        event: &Event<'_>,
    ) -> fmt::Result {
        let in_span = event
            .parent()
            .and_then(|id| ctx.span(id))
            .or_else(|| ctx.lookup_current())
            .is_some();
        if in_span {
            return self.in_span.format_event(ctx, writer, event);
        }
        with_line(&mut writer, |line| object(line, event))
    }
}

/// Writes the JSON object of `event` (outside spans) to `writer`.
fn object(writer: &mut String, event: &Event<'_>) -> fmt::Result {
    let normalized = event.normalized_metadata();
    let meta = normalized.as_ref().unwrap_or_else(|| event.metadata());
    writer.write_str("{\"timestamp\":\"")?;
    write_timestamp(writer, SystemTime::now())?;
    writer.write_str(match *meta.level() {
        Level::TRACE => "\",\"level\":\"TRACE\",\"fields\":{",
        Level::DEBUG => "\",\"level\":\"DEBUG\",\"fields\":{",
        Level::INFO => "\",\"level\":\"INFO\",\"fields\":{",
        Level::WARN => "\",\"level\":\"WARN\",\"fields\":{",
        Level::ERROR => "\",\"level\":\"ERROR\",\"fields\":{",
    })?;
    let mut v = Fields {
        writer,
        first: true,
        result: Ok(()),
    };
    event.record(&mut v);
    v.result?;
    writer.write_str("},\"target\":")?;
    string(writer, meta.target())?;
    writer.write_str("}\n")
}

/// Writes `s` as a JSON string.
fn string(w: &mut impl Write, s: &str) -> fmt::Result {
    w.write_char('"')?;
    if needs_escape(s.as_bytes()) {
        Escaped(w).write_str(s)?;
    } else {
        w.write_str(s)?;
    }
    w.write_char('"')
}

/// Whether a JSON string needs escapes for `s`: a `"`, a `\` or a control character
/// (below 0x20) in it. Eight bytes at a time, as log and audit lines check every
/// string they write and most need nothing.
pub fn needs_escape(s: &[u8]) -> bool {
    const ONES: u64 = u64::MAX / 255;
    const HIGH: u64 = ONES * 0x80;
    // Whether any byte of `x` is zero, or below `n` (n <= 0x80): exact as a whole.
    let has_zero = |x: u64| x.wrapping_sub(ONES) & !x & HIGH != 0;
    let has_below = |x: u64, n: u64| x.wrapping_sub(ONES * n) & !x & HIGH != 0;
    let mut chunks = s.chunks_exact(8);
    for c in &mut chunks {
        let mut b = [0u8; 8];
        b.copy_from_slice(c);
        let x = u64::from_le_bytes(b);
        if has_below(x, 0x20)
            || has_zero(x ^ (ONES * u64::from(b'"')))
            || has_zero(x ^ (ONES * u64::from(b'\\')))
        {
            return true;
        }
    }
    chunks
        .remainder()
        .iter()
        .any(|&b| b < 0x20 || b == b'"' || b == b'\\')
}

/// Escapes what it is given as serde_json does inside a string: `"`, `\` and control
/// characters; everything else, non-ASCII included, goes through as it is.
struct Escaped<'a, W: Write>(&'a mut W);

impl<W: Write> Write for Escaped<'_, W> {
    fn write_str(&mut self, s: &str) -> fmt::Result {
        let mut plain = 0;
        for (i, b) in s.bytes().enumerate() {
            let escape = match b {
                b'"' => "\\\"",
                b'\\' => "\\\\",
                b'\n' => "\\n",
                b'\r' => "\\r",
                b'\t' => "\\t",
                0x08 => "\\b",
                0x0c => "\\f",
                0..=0x1f => "",
                _ => continue,
            };
            // Escaped bytes are ASCII, so `plain..i` and `i + 1..` are on char boundaries.
            self.0.write_str(&s[plain..i])?;
            if escape.is_empty() {
                const HEX: &[u8; 16] = b"0123456789abcdef";
                self.0.write_str("\\u00")?;
                self.0.write_char(char::from(HEX[usize::from(b >> 4)]))?;
                self.0.write_char(char::from(HEX[usize::from(b & 0xf)]))?;
            } else {
                self.0.write_str(escape)?;
            }
            plain = i + 1;
        }
        self.0.write_str(&s[plain..])
    }
}

/// Writes an event's fields as members of the `fields` object.
struct Fields<'a> {
    writer: &'a mut String,
    first: bool,
    result: fmt::Result,
}

impl Fields<'_> {
    /// `"name":` (after a comma unless first), then the value `write` writes.
    fn member(&mut self, field: &Field, write: impl FnOnce(&mut String) -> fmt::Result) {
        if self.result.is_err() {
            return;
        }
        let first = std::mem::replace(&mut self.first, false);
        let w = &mut *self.writer;
        self.result = (|| {
            if !first {
                w.write_char(',')?;
            }
            string(w, field.name())?;
            w.write_char(':')?;
            write(w)
        })();
    }
}

impl Visit for Fields<'_> {
    fn record_u64(&mut self, field: &Field, value: u64) {
        self.member(field, |w| w.write_str(itoa::Buffer::new().format(value)));
    }

    fn record_i64(&mut self, field: &Field, value: i64) {
        self.member(field, |w| w.write_str(itoa::Buffer::new().format(value)));
    }

    fn record_bool(&mut self, field: &Field, value: bool) {
        self.member(field, |w| w.write_str(if value { "true" } else { "false" }));
    }

    fn record_f64(&mut self, field: &Field, value: f64) {
        self.member(field, |w| {
            if value.is_finite() {
                // serde_json's shortest form (`1.0`, `1e-7`), which `Display` is not:
                // serde_json writes it with zmij.
                w.write_str(zmij::Buffer::new().format_finite(value))
            } else {
                w.write_str("null")
            }
        });
    }

    fn record_str(&mut self, field: &Field, value: &str) {
        self.member(field, |w| string(w, value));
    }

    fn record_debug(&mut self, field: &Field, value: &dyn fmt::Debug) {
        self.member(field, |w| {
            w.write_char('"')?;
            write!(Escaped(w), "{value:?}")?;
            w.write_char('"')
        });
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::text::tests::{capture, events};

    #[test]
    fn lines_match_the_default_json_formatter() {
        let ours = capture(events, |layer| {
            layer.json().event_format(PlainJson::default())
        });
        let default = capture(events, |layer| layer.json());
        assert_eq!(ours.len(), 6, "{ours:#?}");
        // Every line is one JSON object, timestamps aside the same as the default's.
        for line in &ours {
            let v: serde_json::Value = serde_json::from_str(line).expect("a JSON line");
            assert!(v["timestamp"].is_string(), "{line}");
        }
        assert_eq!(without_timestamps(&ours), without_timestamps(&default));
    }

    #[test]
    fn control_characters_and_odd_numbers() {
        let weird = || {
            tracing::info!(
                s = "\u{1}\u{1f}\u{7f}\u{8}\u{c}\r\t\"\\ end",
                nan = f64::NAN,
                inf = f64::INFINITY,
                tiny = 1e-7,
                one = 1.0,
                big = u128::MAX,
                neg = i64::MIN,
                "m"
            );
        };
        let ours = capture(weird, |layer| {
            layer.json().event_format(PlainJson::default())
        });
        let default = capture(weird, |layer| layer.json());
        assert_eq!(without_timestamps(&ours), without_timestamps(&default));
    }

    #[test]
    fn escapes_are_found_in_every_position() {
        assert!(!needs_escape(b""));
        assert!(!needs_escape(
            "/api/v1/namespaces/default/pods é ☃ ~\u{7f}".as_bytes()
        ));
        let plain = [b'a'; 19];
        for special in [b'"', b'\\', 0u8, 0x1f, b'\n'] {
            for at in 0..plain.len() {
                let mut s = plain;
                s[at] = special;
                assert!(needs_escape(&s), "{special:#x} at {at}");
            }
        }
        for b in 0x20..=0xffu8 {
            let s = [b; 9];
            assert_eq!(needs_escape(&s), b == b'"' || b == b'\\', "{b:#x}");
        }
    }

    /// The lines with their `"timestamp":"…"` member cut out.
    fn without_timestamps(lines: &[String]) -> Vec<String> {
        lines
            .iter()
            .map(|l| {
                let start = l.find("\"timestamp\":\"").map(|i| i + 13);
                match start.and_then(|s| l[s..].find('"').map(|e| (s, s + e))) {
                    Some((s, e)) => format!("{}{}", &l[..s], &l[e..]),
                    None => l.clone(),
                }
            })
            .collect()
    }
}
