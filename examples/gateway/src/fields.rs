//! How the log formats span and event fields: `name=value`, as `tracing-subscriber`'s
//! default does, with less work per field when there is no colour to paint.
//!
//! The `request` span of a sampled request is formatted when it opens and again for each
//! field recorded later (route, upstream, status), whether or not anything is logged in it.
//! `DefaultFields` paints every name and `=` through `nu-ansi-term` even with colours off,
//! which is most of that span's cost; here a name and its `=` are written as they are, and
//! a number without `core::fmt`. The text is the same. With colours on (a terminal), and
//! for the fields it treats apart (`message`, errors, `r#` and `log.` names), this defers
//! to `DefaultFields`.

use std::fmt;

use tracing::field::{Field, Visit};
use tracing_subscriber::field::{RecordFields, VisitOutput};
use tracing_subscriber::fmt::FormatFields;
use tracing_subscriber::fmt::format::{DefaultVisitor, Writer};

/// `name=value` fields; see the [module docs](self).
#[derive(Clone, Copy, Debug, Default)]
pub(crate) struct Fields;

impl<'w> FormatFields<'w> for Fields {
    fn format_fields<R: RecordFields>(&self, writer: Writer<'w>, fields: R) -> fmt::Result {
        if writer.has_ansi_escapes() {
            let mut visitor = DefaultVisitor::new(writer, true);
            fields.record(&mut visitor);
            return visitor.finish();
        }
        let mut visitor = Visitor {
            writer,
            empty: true,
            result: Ok(()),
        };
        fields.record(&mut visitor);
        visitor.result
    }
}

struct Visitor<'w> {
    writer: Writer<'w>,
    /// Whether nothing was written yet (no space before the first field).
    empty: bool,
    result: fmt::Result,
}

impl Visitor<'_> {
    /// Writes `field`: as `name=` and `plain`'s value, or, for a field `DefaultVisitor`
    /// writes its own way (`message`, `r#` and `log.` names), through that visitor
    /// (`special`).
    fn record(
        &mut self,
        field: &Field,
        special: impl FnOnce(&mut DefaultVisitor<'_>),
        plain: impl FnOnce(&mut Writer<'_>) -> fmt::Result,
    ) {
        let name = field.name();
        if name == "message" || name.starts_with("r#") || name.starts_with("log.") {
            self.defer(special);
        } else if self.result.is_ok() {
            self.result = self.plain(name, plain);
            self.empty = false;
        }
    }

    /// Has `DefaultVisitor` write a field, unless an earlier one failed.
    fn defer(&mut self, special: impl FnOnce(&mut DefaultVisitor<'_>)) {
        if self.result.is_ok() {
            let mut visitor = DefaultVisitor::new(self.writer.by_ref(), self.empty);
            special(&mut visitor);
            self.result = visitor.finish();
            self.empty = false;
        }
    }

    fn plain(
        &mut self,
        name: &str,
        value: impl FnOnce(&mut Writer<'_>) -> fmt::Result,
    ) -> fmt::Result {
        if !self.empty {
            self.writer.write_char(' ')?;
        }
        self.writer.write_str(name)?;
        self.writer.write_char('=')?;
        value(&mut self.writer)
    }
}

impl Visit for Visitor<'_> {
    fn record_debug(&mut self, field: &Field, value: &dyn fmt::Debug) {
        self.record(
            field,
            |v| v.record_debug(field, value),
            |w| write!(w, "{value:?}"),
        );
    }

    fn record_str(&mut self, field: &Field, value: &str) {
        // Quoted, as `DefaultFields` writes a `str`.
        self.record(
            field,
            |v| v.record_str(field, value),
            |w| write!(w, "{value:?}"),
        );
    }

    fn record_u64(&mut self, field: &Field, value: u64) {
        self.record(
            field,
            |v| v.record_u64(field, value),
            |w| w.write_str(itoa::Buffer::new().format(value)),
        );
    }

    fn record_i64(&mut self, field: &Field, value: i64) {
        self.record(
            field,
            |v| v.record_i64(field, value),
            |w| w.write_str(itoa::Buffer::new().format(value)),
        );
    }

    fn record_bool(&mut self, field: &Field, value: bool) {
        self.record(
            field,
            |v| v.record_bool(field, value),
            |w| w.write_str(if value { "true" } else { "false" }),
        );
    }

    fn record_error(&mut self, field: &Field, value: &(dyn std::error::Error + 'static)) {
        self.defer(|v| v.record_error(field, value));
    }
}

#[cfg(test)]
mod tests {
    use std::io;
    use std::sync::{Arc, Mutex, PoisonError};

    use tracing_subscriber::fmt::format::DefaultFields;
    use tracing_subscriber::fmt::{MakeWriter, format};

    use super::*;

    #[derive(Clone, Default)]
    struct Buffer(Arc<Mutex<Vec<u8>>>);

    impl io::Write for Buffer {
        fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
            self.0
                .lock()
                .unwrap_or_else(PoisonError::into_inner)
                .extend_from_slice(buf);
            Ok(buf.len())
        }
        fn flush(&mut self) -> io::Result<()> {
            Ok(())
        }
    }

    impl<'a> MakeWriter<'a> for Buffer {
        type Writer = Self;
        fn make_writer(&'a self) -> Self {
            self.clone()
        }
    }

    /// What a formatter with `fields` writes for a span with fields recorded in three
    /// steps and an event in it with a message, numbers, a string and an error.
    fn lines<N>(fields: N) -> String
    where
        N: for<'w> FormatFields<'w> + Send + Sync + 'static,
    {
        let out = Buffer::default();
        let subscriber = tracing_subscriber::fmt()
            .with_writer(out.clone())
            .with_ansi(false)
            .without_time()
            .fmt_fields(fields)
            .event_format(format().without_time())
            .finish();
        tracing::subscriber::with_default(subscriber, || {
            let span = tracing::info_span!(
                "request",
                method = %"GET",
                path = %"/a b",
                route = tracing::field::Empty,
                status = tracing::field::Empty,
                first = true,
            );
            span.record("route", tracing::field::display("api"));
            span.record("status", 502u64);
            let _entered = span.enter();
            let err = io::Error::other("refused");
            tracing::warn!(
                delta = -3i64,
                name = "quoted \"x\"",
                ok = false,
                error = &err as &(dyn std::error::Error + 'static),
                "request failed {}",
                7
            );
        });
        let bytes = out.0.lock().unwrap_or_else(PoisonError::into_inner).clone();
        String::from_utf8(bytes).unwrap_or_default()
    }

    #[test]
    fn lines_read_as_with_the_default_fields() {
        let ours = lines(Fields);
        assert_eq!(ours, lines(DefaultFields::new()));
        assert!(
            ours.contains(
                "request{method=GET path=/a b first=true route=api status=502}: \
                 gateway::fields::tests: request failed 7 delta=-3 name=\"quoted \\\"x\\\"\" \
                 ok=false error=refused"
            ),
            "{ours}"
        );
    }
}
