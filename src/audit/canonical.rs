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

use serde_json::{Map, Number, Value};

use super::AuditEvent;

/// The largest integer magnitude an IEEE double holds exactly; RFC 8785 numbers are doubles.
const EXACT_INTEGER: u64 = 1 << 53;

/// Appends the canonical JSON of `event` to `out`; false (with `out` left partly written) when
/// the event holds a number this writer does not format.
pub(super) fn write_event<'a>(event: &'a AuditEvent, out: &mut String) -> bool {
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
    // Members in RFC 8785 order (by UTF-16 code units; these names are ASCII); `None` fields
    // are omitted, as serde omits them.
    let text = |field: &'a Option<String>| field.as_deref().map(Member::Text);
    let members: [(&str, Option<Member<'a>>); 20] = [
        ("actor", text(actor)),
        ("agent", text(agent)),
        ("backend", text(backend)),
        ("capability", text(capability)),
        ("credential_id", text(credential_id)),
        ("decision", text(decision)),
        ("detail", detail.as_ref().map(Member::Value)),
        ("event", Some(Member::Text(event))),
        ("exchange_id", text(exchange_id)),
        ("expiry", text(expiry)),
        ("fingerprint", text(fingerprint)),
        ("issuer", text(issuer)),
        ("policy_hash", text(policy_hash)),
        ("reason", text(reason)),
        ("repository", text(repository)),
        ("request_id", text(request_id)),
        ("run_id", text(run_id)),
        ("subject", text(subject)),
        ("time", Some(Member::Text(time))),
        ("workflow", text(workflow)),
    ];
    debug_assert!(members.is_sorted_by(|a, b| a.0 < b.0));
    out.push('{');
    for (i, (name, member)) in members.into_iter().filter_map(|(name, m)| Some((name, m?))).enumerate() {
        if i > 0 {
            out.push(',');
        }
        write_str(name, out);
        out.push(':');
        match member {
            Member::Text(s) => write_str(s, out),
            Member::Value(v) => {
                if !write_value(v, out) {
                    return false;
                }
            }
        }
    }
    out.push('}');
    true
}

/// A member of the event: one of its text fields, or its `detail`.
enum Member<'a> {
    Text(&'a str),
    Value(&'a Value),
}

/// `n` as an integer an IEEE double holds exactly, the only numbers written here.
fn exact_integer(n: &Number) -> Option<i128> {
    let i = n.as_i64().map(i128::from).or_else(|| n.as_u64().map(i128::from))?;
    (i.unsigned_abs() <= u128::from(EXACT_INTEGER)).then_some(i)
}

fn write_value(value: &Value, out: &mut String) -> bool {
    match value {
        Value::Null => out.push_str("null"),
        Value::Bool(b) => out.push_str(if *b { "true" } else { "false" }),
        Value::Number(n) => match exact_integer(n) {
            Some(i) => {
                let _ = write!(out, "{i}");
            }
            None => return false,
        },
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
        if !matches!(byte, b'"' | b'\\' | 0x00..=0x1f) {
            continue;
        }
        out.push_str(&s[start..i]);
        start = i + 1;
        let _ = match byte {
            b'"' => out.write_str("\\\""),
            b'\\' => out.write_str("\\\\"),
            0x08 => out.write_str("\\b"),
            b'\t' => out.write_str("\\t"),
            b'\n' => out.write_str("\\n"),
            0x0c => out.write_str("\\f"),
            b'\r' => out.write_str("\\r"),
            _ => write!(out, "\\u{byte:04x}"),
        };
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
