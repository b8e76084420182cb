//! The text log line when it goes to a file or a pipe: the same line
//! `tracing_subscriber`'s default (full) format writes without colours, written with
//! less work. kas writes one line per proxied request, and the default formatter spent
//! about a fifth of kas's instructions per request on it (styling wrappers that paint
//! nothing without colours, a `Debug` round trip for every number and string, calendar
//! formatting through `core::fmt`). On a terminal the default formatter, with colours,
//! is used instead.
//!
//! A line: `2026-12-06T08:06:12.115302Z  INFO span{fields}:target: message key=value`.
//! Strings are quoted and escaped as `Debug` does, `%`-values and the message are
//! written as `Display` does, floats as `Debug` does (see [`debug_f64`]), and fields of
//! `log` records (`log.*`) are left out, as the default formatter does. A line is put
//! together in a buffer of the thread and handed on in one piece.

use std::fmt::{self, Write};
use std::time::{SystemTime, UNIX_EPOCH};
use tracing::field::{Field, Visit};
use tracing::{Event, Level, Subscriber};
use tracing_log::NormalizeEvent;
use tracing_subscriber::fmt::format::Writer;
use tracing_subscriber::fmt::{FmtContext, FormatEvent, FormatFields, FormattedFields};
use tracing_subscriber::registry::LookupSpan;

/// The event format; see the module docs.
#[derive(Debug, Clone, Copy, Default)]
pub struct PlainText;

impl<S, N> FormatEvent<S, N> for PlainText
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
        with_line(&mut writer, |line| self.line(ctx, line, event))
    }
}

impl PlainText {
    /// Writes the line of `event` to `writer`.
    fn line<S, N>(
        &self,
        ctx: &FmtContext<'_, S, N>,
        writer: &mut String,
        event: &Event<'_>,
    ) -> fmt::Result
    where
        S: Subscriber + for<'a> LookupSpan<'a>,
        N: for<'a> FormatFields<'a> + 'static,
    {
        let normalized = event.normalized_metadata();
        let meta = normalized.as_ref().unwrap_or_else(|| event.metadata());
        write_timestamp(writer, SystemTime::now())?;
        writer.write_str(match *meta.level() {
            Level::TRACE => " TRACE ",
            Level::DEBUG => " DEBUG ",
            Level::INFO => "  INFO ",
            Level::WARN => "  WARN ",
            Level::ERROR => " ERROR ",
        })?;
        if let Some(scope) = ctx.event_scope() {
            let mut seen = false;
            for span in scope.from_root() {
                writer.write_str(span.metadata().name())?;
                seen = true;
                let ext = span.extensions();
                if let Some(fields) = ext.get::<FormattedFields<N>>() {
                    if !fields.is_empty() {
                        write!(writer, "{{{fields}}}")?;
                    }
                }
                writer.write_char(':')?;
            }
            if seen {
                writer.write_char(' ')?;
            }
        }
        writer.write_str(meta.target())?;
        writer.write_str(": ")?;
        let mut v = Fields {
            writer,
            first: true,
            result: Ok(()),
        };
        event.record(&mut v);
        v.result?;
        writer.write_char('\n')
    }
}

/// Runs `write` on an empty line buffer, then hands the line to `writer` in one piece.
/// The many small pieces of a line go to a `String` of this thread, written to
/// directly, instead of each going through the `dyn Write` behind `writer` (a request
/// line has about forty).
pub(crate) fn with_line(
    writer: &mut Writer<'_>,
    write: impl FnOnce(&mut String) -> fmt::Result,
) -> fmt::Result {
    thread_local! {
        static LINE: std::cell::RefCell<String> = const { std::cell::RefCell::new(String::new()) };
    }
    LINE.with(|cell| match cell.try_borrow_mut() {
        Ok(mut line) => {
            line.clear();
            let written = write(&mut line);
            let result = written.and_then(|()| writer.write_str(&line));
            // A line far larger than usual does not stay allocated.
            if line.capacity() > 64 * 1024 {
                *line = String::new();
            }
            result
        }
        // A value's Debug logging while its line is being written: a line of its own.
        Err(_) => {
            let mut line = String::new();
            write(&mut line)?;
            writer.write_str(&line)
        }
    })
}

/// Writes `value` as its `Debug` does (`0.348`, `1.0`, `1e-7`, `NaN`). In the range
/// where `Debug` writes plain decimals, the shortest digits come from `zmij` (as in
/// serde_json), with a fraction of `core::fmt`'s work: the same digits, except that
/// where two shortest forms are equally near (about 1 in 10,000 random values) the
/// last digit may be the other one, which reads back as the same number.
pub(crate) fn debug_f64(w: &mut String, value: f64) -> fmt::Result {
    let magnitude = value.abs();
    if value == 0.0 || (1e-4..1e16).contains(&magnitude) {
        let mut b = zmij::Buffer::new();
        let text = b.format_finite(value);
        if !text.contains(['e', 'E']) {
            w.push_str(text);
            return Ok(());
        }
    }
    write!(w, "{value:?}")
}

/// Writes an event's fields as the default formatter's visitor does.
struct Fields<'a> {
    writer: &'a mut String,
    first: bool,
    result: fmt::Result,
}

impl Fields<'_> {
    /// Starts a field: false if it is not written (an earlier write failed, or it is
    /// `log` metadata already in the line's head).
    fn start(&mut self, field: &Field) -> bool {
        if self.result.is_err() || field.name().starts_with("log.") {
            return false;
        }
        if self.first {
            self.first = false;
        } else {
            self.result = self.writer.write_char(' ');
        }
        self.result.is_ok()
    }

    /// `name=` (the message has no name; `r#` of raw identifiers is dropped).
    fn name(&mut self, field: &Field) -> fmt::Result {
        match field.name() {
            "message" => Ok(()),
            name => {
                self.writer
                    .write_str(name.strip_prefix("r#").unwrap_or(name))?;
                self.writer.write_char('=')
            }
        }
    }

    /// A value written as it is (a number, `true`, `false`).
    fn bare(&mut self, field: &Field, text: &str) {
        if self.start(field) {
            self.result = self.name(field).and_then(|()| self.writer.write_str(text));
        }
    }
}

impl Visit for Fields<'_> {
    fn record_f64(&mut self, field: &Field, value: f64) {
        if self.start(field) {
            self.result = self
                .name(field)
                .and_then(|()| debug_f64(self.writer, value));
        }
    }

    fn record_u64(&mut self, field: &Field, value: u64) {
        self.bare(field, itoa::Buffer::new().format(value));
    }

    fn record_i64(&mut self, field: &Field, value: i64) {
        self.bare(field, itoa::Buffer::new().format(value));
    }

    fn record_bool(&mut self, field: &Field, value: bool) {
        self.bare(field, if value { "true" } else { "false" });
    }

    fn record_str(&mut self, field: &Field, value: &str) {
        if !self.start(field) {
            return;
        }
        self.result = self.name(field).and_then(|()| {
            if field.name() == "message" {
                self.writer.write_str(value)
            } else if value
                .bytes()
                .all(|b| (0x20..0x7f).contains(&b) && b != b'"' && b != b'\\')
            {
                // What `Debug` writes for a string with nothing to escape.
                self.writer.write_char('"')?;
                self.writer.write_str(value)?;
                self.writer.write_char('"')
            } else {
                write!(self.writer, "{value:?}")
            }
        });
    }

    fn record_error(&mut self, field: &Field, value: &(dyn std::error::Error + 'static)) {
        match value.source() {
            Some(source) => self.record_debug(
                field,
                &format_args!("{value} {}.sources={}", field.name(), Sources(source)),
            ),
            None => self.record_debug(field, &format_args!("{value}")),
        }
    }

    fn record_debug(&mut self, field: &Field, value: &dyn fmt::Debug) {
        if self.start(field) {
            self.result = self
                .name(field)
                .and_then(|()| write!(self.writer, "{value:?}"));
        }
    }
}

/// An error's chain of sources, as `[first, second]`.
struct Sources<'a>(&'a (dyn std::error::Error + 'static));

impl fmt::Display for Sources<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let mut list = f.debug_list();
        let mut next = Some(self.0);
        while let Some(e) = next {
            list.entry(&format_args!("{e}"));
            next = e.source();
        }
        list.finish()
    }
}

/// RFC 3339 in UTC with microseconds (`2026-12-06T08:06:12.115302Z`), as the default
/// formatter's `SystemTime` writes it.
pub(crate) fn write_timestamp(w: &mut impl Write, now: SystemTime) -> fmt::Result {
    let since = now.duration_since(UNIX_EPOCH).unwrap_or_default();
    let secs = since.as_secs();
    let (days, rem) = (secs / 86_400, secs % 86_400);
    let (year, month, day) = civil_from_days(days);
    let mut b = *b"0000-00-00T00:00:00.000000Z";
    let mut put = |at: usize, width: usize, mut v: u64| {
        for i in (at..at + width).rev() {
            // Always a digit: v % 10 < 10.
            b[i] = b'0' + (v % 10) as u8;
            v /= 10;
        }
    };
    put(0, 4, year);
    put(5, 2, month);
    put(8, 2, day);
    put(11, 2, rem / 3600);
    put(14, 2, rem % 3600 / 60);
    put(17, 2, rem % 60);
    put(20, 6, u64::from(since.subsec_micros()));
    // Only ASCII digits and punctuation were written.
    w.write_str(std::str::from_utf8(&b).map_err(|_| fmt::Error)?)
}

/// (year, month, day) of a day counted from 1970-01-01 (Howard Hinnant's algorithm,
/// for the non-negative days a clock after 1970 gives).
fn civil_from_days(days: u64) -> (u64, u64, u64) {
    let z = days + 719_468;
    let era = z / 146_097;
    let doe = z - era * 146_097;
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let day = doy - (153 * mp + 2) / 5 + 1;
    let month = if mp < 10 { mp + 3 } else { mp - 9 };
    let year = yoe + era * 400 + u64::from(month <= 2);
    (year, month, day)
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;
    use std::sync::{Arc, Mutex};
    use std::time::Duration;
    use tracing_subscriber::layer::SubscriberExt;

    fn stamp(secs: u64, micros: u32) -> String {
        let mut s = String::new();
        let t = UNIX_EPOCH + Duration::from_secs(secs) + Duration::from_micros(micros.into());
        write_timestamp(&mut s, t).expect("format");
        s
    }

    #[test]
    fn timestamps_are_rfc3339_utc_with_microseconds() {
        assert_eq!(stamp(0, 0), "1970-01-01T00:00:00.000000Z");
        assert_eq!(stamp(951_782_400, 7), "2000-02-29T00:00:00.000007Z");
        assert_eq!(stamp(1_796_544_372, 115_302), "2026-12-06T08:06:12.115302Z");
        assert_eq!(stamp(4_107_542_399, 999_999), "2100-02-28T23:59:59.999999Z");
        assert_eq!(stamp(4_107_542_400, 0), "2100-03-01T00:00:00.000000Z");
    }

    #[test]
    fn floats_are_written_as_debug_writes_them() {
        let mut values = vec![
            0.0,
            -0.0,
            1e-4,
            -1e-4,
            9.999_999_999_999_999e-5,
            0.348,
            1.0,
            100_000.0,
            123_456.789,
            9_999_999_999_999_998.0,
            1e15,
            1e16,
            1e-7,
            f64::MIN_POSITIVE,
            f64::MAX,
            f64::NAN,
            f64::INFINITY,
            f64::NEG_INFINITY,
        ];
        // Bit patterns spread over every exponent, and durations as the proxy logs them.
        let mut x: u64 = 0x9E37_79B9_7F4A_7C15;
        for i in 0..200_000u32 {
            x = x.wrapping_mul(6_364_136_223_846_793_005).wrapping_add(1);
            values.push(f64::from_bits(x));
            values.push(f64::from(i) / 1000.0);
        }
        let mut differ = 0;
        for v in values {
            let mut ours = String::new();
            debug_f64(&mut ours, v).expect("format");
            let debug = format!("{v:?}");
            if ours == debug {
                continue;
            }
            // Where two shortest forms are equally near (a tie), the last digit may be
            // the other one: as short, and read back as the same number.
            differ += 1;
            assert_eq!(ours.len(), debug.len(), "{ours} against {debug}");
            assert_eq!(ours.parse::<f64>().ok(), Some(v), "{ours} against {debug}");
        }
        assert!(differ < 100, "{differ} values written otherwise than Debug");
    }

    /// A writer the tests read back.
    #[derive(Clone, Default)]
    pub(crate) struct Captured(Arc<Mutex<Vec<u8>>>);

    impl std::io::Write for Captured {
        fn write(&mut self, b: &[u8]) -> std::io::Result<usize> {
            self.0.lock().expect("lock").extend_from_slice(b);
            Ok(b.len())
        }
        fn flush(&mut self) -> std::io::Result<()> {
            Ok(())
        }
    }

    /// A fmt layer without colours writing to a [`Captured`].
    pub(crate) type TestLayer<S> = tracing_subscriber::fmt::Layer<
        S,
        tracing_subscriber::fmt::format::DefaultFields,
        tracing_subscriber::fmt::format::Format,
        Box<dyn Fn() -> Captured + Send + Sync>,
    >;

    type Filtered = tracing_subscriber::layer::Layered<
        tracing_subscriber::filter::LevelFilter,
        tracing_subscriber::Registry,
    >;

    /// The lines `events` logs through the fmt layer `configure` makes of a plain one
    /// (every level enabled).
    pub(crate) fn capture<L>(
        events: impl Fn(),
        configure: impl FnOnce(TestLayer<Filtered>) -> L,
    ) -> Vec<String>
    where
        L: tracing_subscriber::Layer<Filtered> + Send + Sync + 'static,
    {
        let out = Captured::default();
        let w = out.clone();
        let make: Box<dyn Fn() -> Captured + Send + Sync> = Box::new(move || w.clone());
        let layer = tracing_subscriber::fmt::layer()
            .with_writer(make)
            .with_ansi(false);
        let s = tracing_subscriber::registry()
            .with(tracing_subscriber::filter::LevelFilter::TRACE)
            .with(configure(layer));
        tracing::subscriber::with_default(s, events);
        let bytes = out.0.lock().expect("lock").clone();
        String::from_utf8(bytes)
            .expect("utf-8")
            .lines()
            .map(str::to_string)
            .collect()
    }

    #[derive(Debug, thiserror::Error)]
    #[error("outer failure")]
    struct Outer(#[source] std::io::Error);

    /// Every kind of field the code logs, at every level, inside and outside spans.
    pub(crate) fn events() {
        let path = String::from("/api/v1/namespaces/default/pods?limit=5");
        tracing::info!(
            request_id = %"00ab", agent_id = 7u64, delta = -3i64, ok = true,
            project = %"group/project", method = %"GET", path = %path, status = 200u16,
            head_ms = 0.348, "k8s-proxy: request"
        );
        tracing::warn!(
            name = "quote \" and \\ and \n and é",
            empty = "",
            "odd strings"
        );
        tracing::error!(
            error = &Outer(std::io::Error::other("inner")) as &(dyn std::error::Error + 'static),
            "with a source"
        );
        tracing::debug!(r#type = "raw", list = ?vec![1, 2], "debug values {}", 42);
        tracing::trace!("only a message");
        let span = tracing::info_span!("conn", peer = %"127.0.0.1:1", n = 3u32);
        let _g = span.enter();
        let inner = tracing::info_span!("empty");
        let _h = inner.enter();
        tracing::info!(target: "k8s_integration", agent_id = 1u64, "in spans");
    }

    #[test]
    fn lines_match_the_default_formatter_without_colours() {
        // Each line without its timestamp (up to the first space).
        let strip = |lines: Vec<String>| -> Vec<String> {
            lines
                .iter()
                .map(|l| {
                    l.split_once(' ')
                        .map_or(l.as_str(), |(_, rest)| rest)
                        .to_string()
                })
                .collect()
        };
        let ours = strip(capture(events, |layer| layer.event_format(PlainText)));
        let default = strip(capture(events, |layer| layer));
        assert_eq!(ours.len(), 6, "{ours:#?}");
        assert_eq!(ours, default);
    }
}
