//! RFC 8785 (JCS) canonical JSON of an audit event, written directly.
//!
//! Every event is canonicalized once when it is recorded and again whenever the chain is
//! verified, so this is on the exchange's hot path. The generic canonicalizer buffers and sorts
//! every object's members; an event's own fields have a fixed order, and the maps inside its
//! `detail` are already kept sorted, so this writes the bytes in one pass.
//!
//! Invariant: the output is byte-identical to `serde_json_canonicalizer` (verification compares
//! against it, and stores written by either must verify). Where the two could differ (a number
//! that is not an integer of at most 2^53 in magnitude, whose ECMAScript form this does not
//! write), [`write_event`] declines and the caller uses the generic canonicalizer.

use std::cmp::Ordering;
use std::fmt::Write;

use serde_json::{Map, Value};

use super::AuditEvent;

/// The largest integer magnitude an IEEE double holds exactly; RFC 8785 numbers are doubles.
const EXACT_INTEGER: u64 = 1 << 53;

/// Appends the canonical JSON of `event` to `out`; false (with `out` left partly written) when
/// the event holds a number this writer does not format.
pub(super) fn write_event(event: &AuditEvent, out: &mut String) -> bool {
    // Destructured without `..`: a new field does not compile until it is placed below.
    let AuditEvent {
        time,
        event,
        request_id,
        actor,
        exchange_id,
        issuer,
        subject,
        repository,
        workflow,
        run_id,
        capability,
        agent,
        decision,
        reason,
        policy_hash,
        credential_id,
        backend,
        fingerprint,
        expiry,
        detail,
    } = event;
    // Members in RFC 8785 order (by UTF-16 code units; these names are ASCII).
    let members: [(&str, Member); 20] = [
        ("actor", Member::text(actor)),
        ("agent", Member::text(agent)),
        ("backend", Member::text(backend)),
        ("capability", Member::text(capability)),
        ("credential_id", Member::text(credential_id)),
        ("decision", Member::text(decision)),
        ("detail", detail.as_ref().map_or(Member::Absent, Member::Value)),
        ("event", Member::Text(event)),
        ("exchange_id", Member::text(exchange_id)),
        ("expiry", Member::text(expiry)),
        ("fingerprint", Member::text(fingerprint)),
        ("issuer", Member::text(issuer)),
        ("policy_hash", Member::text(policy_hash)),
        ("reason", Member::text(reason)),
        ("repository", Member::text(repository)),
        ("request_id", Member::text(request_id)),
        ("run_id", Member::text(run_id)),
        ("subject", Member::text(subject)),
        ("time", Member::Text(time)),
        ("workflow", Member::text(workflow)),
    ];
    debug_assert!(members.is_sorted_by(|a, b| a.0 < b.0));
    out.push('{');
    let mut first = true;
    for (name, member) in members {
        let value = match member {
            Member::Absent => continue,
            member => member,
        };
        if !first {
            out.push(',');
        }
        first = false;
        write_str(name, out);
        out.push(':');
        let written = match value {
            Member::Text(s) => {
                write_str(s, out);
                true
            }
            Member::Value(v) => write_value(v, out),
            Member::Absent => true,
        };
        if !written {
            return false;
        }
    }
    out.push('}');
    true
}

/// One of the event's members, as serde serializes it (`None` fields are omitted).
enum Member<'a> {
    Absent,
    Text(&'a str),
    Value(&'a Value),
}

impl<'a> Member<'a> {
    fn text(field: &'a Option<String>) -> Self {
        field.as_deref().map_or(Member::Absent, Member::Text)
    }
}

fn write_value(value: &Value, out: &mut String) -> bool {
    match value {
        Value::Null => out.push_str("null"),
        Value::Bool(b) => out.push_str(if *b { "true" } else { "false" }),
        Value::Number(n) => {
            let exact = n.as_i64().filter(|i| i.unsigned_abs() <= EXACT_INTEGER).map(i128::from);
            let exact = exact.or_else(|| n.as_u64().filter(|u| *u <= EXACT_INTEGER).map(i128::from));
            match exact {
                Some(i) => {
                    let _ = write!(out, "{i}");
                }
                None => return false,
            }
        }
        Value::String(s) => write_str(s, out),
        Value::Array(items) => {
            out.push('[');
            for (i, item) in items.iter().enumerate() {
                if i > 0 {
                    out.push(',');
                }
                if !write_value(item, out) {
                    return false;
                }
            }
            out.push(']');
        }
        Value::Object(map) => return write_object(map, out),
    }
    true
}

fn write_object(map: &Map<String, Value>, out: &mut String) -> bool {
    let mut keys: Vec<&String> = map.keys().collect();
    // A `Map` iterates in UTF-8 byte order, which is UTF-16 order unless keys mix characters
    // above U+FFFF with ones from U+E000 to U+FFFF: sort only when that happened.
    if !keys.is_sorted_by(|a, b| utf16_cmp(a, b) != Ordering::Greater) {
        keys.sort_by(|a, b| utf16_cmp(a, b));
    }
    out.push('{');
    for (i, key) in keys.into_iter().enumerate() {
        if i > 0 {
            out.push(',');
        }
        write_str(key, out);
        out.push(':');
        if !write_value(&map[key.as_str()], out) {
            return false;
        }
    }
    out.push('}');
    true
}

fn utf16_cmp(a: &str, b: &str) -> Ordering {
    if a.is_ascii() && b.is_ascii() {
        return a.cmp(b);
    }
    a.encode_utf16().cmp(b.encode_utf16())
}

/// A JSON string as RFC 8785 writes it (ECMAScript `JSON.stringify`): `"` and `\` escaped, the
/// five short control escapes, `\u00xx` for the other control characters, all else as is.
fn write_str(s: &str, out: &mut String) {
    out.push('"');
    let mut start = 0;
    for (i, byte) in s.bytes().enumerate() {
        let escape = match byte {
            b'"' => "\\\"",
            b'\\' => "\\\\",
            0x08 => "\\b",
            b'\t' => "\\t",
            b'\n' => "\\n",
            0x0c => "\\f",
            b'\r' => "\\r",
            0x00..=0x1f => "",
            _ => continue,
        };
        out.push_str(&s[start..i]);
        if escape.is_empty() {
            let _ = write!(out, "\\u{byte:04x}");
        } else {
            out.push_str(escape);
        }
        start = i + 1;
    }
    out.push_str(&s[start..]);
    out.push('"');
}

#[cfg(test)]
mod tests {
    use proptest::prelude::*;
    use serde_json::json;

    use super::*;

    fn generic(event: &AuditEvent) -> String {
        serde_json_canonicalizer::to_string(event).unwrap()
    }

    fn fast(event: &AuditEvent) -> Option<String> {
        let mut out = String::new();
        write_event(event, &mut out).then_some(out)
    }

    /// Strings that reach every escape and both sort orders: controls, quotes, backslashes,
    /// DEL, U+2028, characters either side of U+E000 and above U+FFFF.
    fn text() -> impl Strategy<Value = String> {
        let chars = prop_oneof![
            4 => proptest::char::range('a', 'e'),
            1 => proptest::char::range('\u{0}', '\u{20}'),
            1 => Just('"'),
            1 => Just('\\'),
            1 => Just('\u{7f}'),
            1 => Just('\u{2028}'),
            1 => proptest::char::range('\u{d7fe}', '\u{d7ff}'),
            1 => proptest::char::range('\u{e000}', '\u{e001}'),
            1 => proptest::char::range('\u{fffe}', '\u{ffff}'),
            1 => proptest::char::range('\u{10000}', '\u{10001}'),
            1 => Just('\u{1f600}'),
        ];
        proptest::collection::vec(chars, 0..6).prop_map(|c| c.into_iter().collect())
    }

    fn number() -> impl Strategy<Value = Value> {
        prop_oneof![
            any::<i64>().prop_map(Value::from),
            any::<u64>().prop_map(Value::from),
            (-(1i64 << 54)..(1i64 << 54)).prop_map(Value::from),
            any::<f64>().prop_filter("JSON has no NaN or infinity", |f| f.is_finite()).prop_map(Value::from),
            Just(json!(-0.0)),
            Just(json!(1e21)),
        ]
    }

    fn value() -> impl Strategy<Value = Value> {
        let leaf = prop_oneof![
            Just(Value::Null),
            any::<bool>().prop_map(Value::Bool),
            number(),
            text().prop_map(Value::String),
        ];
        leaf.prop_recursive(4, 32, 5, |inner| {
            prop_oneof![
                proptest::collection::vec(inner.clone(), 0..5).prop_map(Value::Array),
                proptest::collection::btree_map(text(), inner, 0..5)
                    .prop_map(|m| Value::Object(m.into_iter().collect())),
            ]
        })
    }

    fn event() -> impl Strategy<Value = AuditEvent> {
        let field = || proptest::option::of(text());
        (
            (text(), text(), field(), field(), field(), field(), field()),
            (field(), field(), field(), field(), field(), field(), field()),
            (field(), field(), field(), field(), field(), proptest::option::of(value())),
        )
            .prop_map(|((time, event, a, b, c, d, e), (f, g, h, i, j, k, l), (m, n, o, p, q, detail))| {
                AuditEvent {
                    time,
                    event,
                    request_id: a,
                    actor: b,
                    exchange_id: c,
                    issuer: d,
                    subject: e,
                    repository: f,
                    workflow: g,
                    run_id: h,
                    capability: i,
                    agent: j,
                    decision: k,
                    reason: l,
                    policy_hash: m,
                    credential_id: n,
                    backend: o,
                    fingerprint: p,
                    expiry: q,
                    detail,
                }
            })
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(2000))]

        /// Wherever it writes an event, it writes the generic canonicalizer's bytes.
        #[test]
        fn it_agrees_with_the_generic_canonicalizer(e in event()) {
            if let Some(body) = fast(&e) {
                prop_assert_eq!(body, generic(&e));
            }
        }

        /// It declines only for numbers outside the exact integers.
        #[test]
        fn it_writes_every_event_whose_numbers_are_exact_integers(e in event()) {
            let inexact = e.detail.as_ref().is_some_and(has_inexact_number);
            prop_assert_eq!(fast(&e).is_some(), !inexact);
        }
    }

    fn has_inexact_number(v: &Value) -> bool {
        match v {
            Value::Number(n) => {
                !(n.as_i64().is_some_and(|i| i.unsigned_abs() <= EXACT_INTEGER)
                    || n.as_u64().is_some_and(|u| u <= EXACT_INTEGER))
            }
            Value::Array(items) => items.iter().any(has_inexact_number),
            Value::Object(map) => map.values().any(has_inexact_number),
            _ => false,
        }
    }

    #[test]
    fn an_exchange_event_is_written_in_member_order_with_its_trace() {
        let e = AuditEvent {
            exchange_id: Some("x".into()),
            agent: Some("a".into()),
            detail: Some(json!({"trace": [{"rule": "r", "ok": true, "n": 3}], "credentials": []})),
            ..AuditEvent::new("exchange.allowed", chrono::DateTime::UNIX_EPOCH)
        };
        let body = fast(&e).expect("no inexact number");
        assert_eq!(
            body,
            r#"{"agent":"a","detail":{"credentials":[],"trace":[{"n":3,"ok":true,"rule":"r"}]},"event":"exchange.allowed","exchange_id":"x","time":"1970-01-01T00:00:00.000Z"}"#
        );
        assert_eq!(body, generic(&e));
    }

    #[test]
    fn keys_above_the_basic_plane_sort_before_private_use_ones() {
        // UTF-8 puts U+E000 first; UTF-16 (RFC 8785) puts the surrogate pair of U+10000 first.
        let detail = json!({"\u{e000}": 1, "\u{10000}": 2});
        let e = AuditEvent { detail: Some(detail), ..AuditEvent::new("t", chrono::DateTime::UNIX_EPOCH) };
        let body = fast(&e).unwrap();
        assert!(body.contains("{\"\u{10000}\":2,\"\u{e000}\":1}"), "{body}");
        assert_eq!(body, generic(&e));
    }
}
