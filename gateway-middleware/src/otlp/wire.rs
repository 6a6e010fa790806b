//! The protobuf wire format, as far as OTLP's trace messages need it: written straight from
//! the exporter's records, without an intermediate tree of owned messages.
//!
//! Field numbers are those of `opentelemetry/proto/collector/trace/v1/trace_service.proto`,
//! `trace/v1/trace.proto`, `common/v1/common.proto` and `resource/v1/resource.proto`.

/// Wire type of varints.
const VARINT: u32 = 0;
/// Wire type of `fixed64`.
const I64: u32 = 1;
/// Wire type of length-delimited fields (strings, bytes, messages).
const LEN: u32 = 2;
/// Wire type of `fixed32`.
const I32: u32 = 5;

/// Appends `value` as a varint.
pub(super) fn varint(out: &mut Vec<u8>, mut value: u64) {
    while value >= 0x80 {
        #[expect(clippy::cast_possible_truncation, reason = "the low seven bits")]
        out.push((value as u8 & 0x7f) | 0x80);
        value >>= 7;
    }
    #[expect(clippy::cast_possible_truncation, reason = "below 0x80")]
    out.push(value as u8);
}

fn key(out: &mut Vec<u8>, field: u32, wire: u32) {
    varint(out, u64::from(field << 3 | wire));
}

/// A `string` or `bytes` field.
pub(super) fn bytes(out: &mut Vec<u8>, field: u32, value: &[u8]) {
    key(out, field, LEN);
    varint(out, value.len() as u64);
    out.extend_from_slice(value);
}

/// A varint field (`uint32`, `int64` of a non-negative value, an enum).
pub(super) fn uint(out: &mut Vec<u8>, field: u32, value: u64) {
    key(out, field, VARINT);
    varint(out, value);
}

/// A `fixed64` field.
pub(super) fn fixed64(out: &mut Vec<u8>, field: u32, value: u64) {
    key(out, field, I64);
    out.extend_from_slice(&value.to_le_bytes());
}

/// A `fixed32` field.
pub(super) fn fixed32(out: &mut Vec<u8>, field: u32, value: u32) {
    key(out, field, I32);
    out.extend_from_slice(&value.to_le_bytes());
}

/// A message field, its body written by `body`.
///
/// The length goes before the body but is known only after it: one byte is set aside (most
/// messages here are attributes, under 128 bytes), and the rare longer one shifts its body
/// to make room.
pub(super) fn message(out: &mut Vec<u8>, field: u32, body: impl FnOnce(&mut Vec<u8>)) {
    key(out, field, LEN);
    let at = out.len();
    out.push(0);
    body(out);
    let len = out.len() - at - 1;
    if len < 0x80 {
        #[expect(clippy::cast_possible_truncation, reason = "below 0x80")]
        let len = len as u8;
        out[at] = len;
    } else {
        let mut prefix = Vec::with_capacity(10);
        varint(&mut prefix, len as u64);
        out.splice(at..=at, prefix);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn varints_and_lengths() {
        let mut out = Vec::new();
        varint(&mut out, 300);
        assert_eq!(out, [0xac, 0x02]);
        out.clear();
        varint(&mut out, u64::MAX);
        assert_eq!(out.len(), 10);
        assert_eq!(out[9], 0x01);

        // A message of 200 bytes gets a two-byte length, its body moved after it.
        let mut out = Vec::new();
        message(&mut out, 2, |out| bytes(out, 1, &[7; 197]));
        assert_eq!(out[..3], [0x12, 0xc8, 0x01]);
        assert_eq!(out[3..6], [0x0a, 0xc5, 0x01]);
        assert_eq!(out.len(), 3 + 200);

        let mut out = Vec::new();
        message(&mut out, 1, |out| {
            uint(out, 6, 2);
            fixed64(out, 7, 1);
            fixed32(out, 16, 0x101);
        });
        assert_eq!(
            out,
            [
                0x0a, 17, 0x30, 2, 0x39, 1, 0, 0, 0, 0, 0, 0, 0, 0x85, 0x01, 1, 1, 0, 0
            ]
        );
    }
}
