//! Borrowing JSON readers for the row decoder's hot path.
//!
//! An object is walked once as `(key, &RawValue)` pairs; each value is then looked at only as
//! far as its column needs. Nothing here builds a `serde_json::Value`: strings without escapes
//! are borrowed from the input, and lists are decoded into scratch buffers the builder reuses
//! from row to row, so a typical contact costs no allocation beyond the column buffers.

use std::borrow::Cow;
use std::fmt;

use serde::de::{self, DeserializeSeed, Deserializer, MapAccess, SeqAccess, Visitor};
use serde_json::value::RawValue;

/// The coarse JSON type of a raw value, read from its first byte.
#[derive(Copy, Clone, Debug, PartialEq, Eq)]
pub(crate) enum Shape {
    Null,
    Bool(bool),
    Number,
    String,
    Array,
    Object,
}

/// The shape of a value `serde_json` has already validated.
pub(crate) fn shape(raw: &str) -> Shape {
    match raw.as_bytes().first() {
        Some(b'n') => Shape::Null,
        Some(b't') => Shape::Bool(true),
        Some(b'f') => Shape::Bool(false),
        Some(b'"') => Shape::String,
        Some(b'[') => Shape::Array,
        Some(b'{') => Shape::Object,
        // Digits and '-'. A RawValue is never empty.
        _ => Shape::Number,
    }
}

/// Decodes a raw JSON string (with its quotes), borrowing when it holds no escape.
pub(crate) fn decode_str(raw: &str) -> Option<Cow<'_, str>> {
    let inner = raw.strip_prefix('"')?.strip_suffix('"')?;
    if !inner.as_bytes().contains(&b'\\') {
        // A validated JSON string without backslashes is its own decoded text.
        return Some(Cow::Borrowed(inner));
    }
    serde_json::from_str::<String>(raw).ok().map(Cow::Owned)
}

/// An object key, borrowed from the input unless it had escapes.
pub(crate) struct Key<'de>(pub(crate) Cow<'de, str>);

impl<'de> de::Deserialize<'de> for Key<'de> {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct V;
        impl<'de> Visitor<'de> for V {
            type Value = Key<'de>;
            fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str("a string")
            }
            fn visit_borrowed_str<E: de::Error>(self, v: &'de str) -> Result<Self::Value, E> {
                Ok(Key(Cow::Borrowed(v)))
            }
            fn visit_str<E: de::Error>(self, v: &str) -> Result<Self::Value, E> {
                Ok(Key(Cow::Owned(v.to_owned())))
            }
        }
        d.deserialize_str(V)
    }
}

impl Key<'_> {
    /// The key as JSON text. A borrowed key had no escapes, so this is exactly as received.
    pub(crate) fn write_json(&self, out: &mut String) {
        match &self.0 {
            Cow::Borrowed(k) => {
                out.push('"');
                out.push_str(k);
                out.push('"');
            }
            Cow::Owned(k) => push_json_string(out, k),
        }
    }
}

/// Appends `s` as a JSON string literal: `"`, `\` and control characters escaped, everything
/// else (non-ASCII included) as is.
pub(crate) fn push_json_string(out: &mut String, s: &str) {
    use std::fmt::Write;
    out.push('"');
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
        out.push_str(&s[plain..i]);
        if escape.is_empty() {
            let _ = write!(out, "\\u{b:04x}");
        } else {
            out.push_str(escape);
        }
        plain = i + 1;
    }
    out.push_str(&s[plain..]);
    out.push('"');
}

/// Calls `f` for each member of the JSON object `text`, in input order (duplicates included).
pub(crate) fn for_each_member<'de, F>(text: &'de str, f: F) -> Result<(), serde_json::Error>
where
    F: FnMut(Key<'de>, &'de RawValue),
{
    struct V<F>(F);
    impl<'de, F: FnMut(Key<'de>, &'de RawValue)> Visitor<'de> for V<F> {
        type Value = ();
        fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
            f.write_str("a JSON object")
        }
        fn visit_map<A: MapAccess<'de>>(mut self, mut map: A) -> Result<(), A::Error> {
            while let Some(key) = map.next_key::<Key<'de>>()? {
                let value: &'de RawValue = map.next_value()?;
                (self.0)(key, value);
            }
            Ok(())
        }
    }
    let mut de = serde_json::Deserializer::from_str(text);
    de.deserialize_map(V(f))?;
    de.end()
}

/// Decoded strings of one list, stored end to end in one reusable buffer.
#[derive(Default)]
pub(crate) struct StrScratch {
    buf: String,
    ends: Vec<usize>,
}

impl StrScratch {
    /// The decoded elements, in order.
    pub(crate) fn iter(&self) -> impl Iterator<Item = &str> + '_ {
        let mut start = 0;
        self.ends.iter().map(move |&end| {
            let s = &self.buf[start..end];
            start = end;
            s
        })
    }
}

/// Decodes a JSON array of strings into `out`. Any other element (null included) fails.
pub(crate) fn str_list(text: &str, out: &mut StrScratch) -> Result<(), serde_json::Error> {
    out.buf.clear();
    out.ends.clear();

    struct Elem<'a>(&'a mut StrScratch);
    impl<'de> DeserializeSeed<'de> for Elem<'_> {
        type Value = ();
        fn deserialize<D: Deserializer<'de>>(self, d: D) -> Result<(), D::Error> {
            d.deserialize_str(self)
        }
    }
    impl<'de> Visitor<'de> for Elem<'_> {
        type Value = ();
        fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
            f.write_str("a string")
        }
        fn visit_str<E: de::Error>(self, v: &str) -> Result<(), E> {
            self.0.buf.push_str(v);
            self.0.ends.push(self.0.buf.len());
            Ok(())
        }
    }

    struct List<'a>(&'a mut StrScratch);
    impl<'de> Visitor<'de> for List<'_> {
        type Value = ();
        fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
            f.write_str("an array of strings")
        }
        fn visit_seq<A: SeqAccess<'de>>(self, mut seq: A) -> Result<(), A::Error> {
            while seq.next_element_seed(Elem(&mut *self.0))?.is_some() {}
            Ok(())
        }
    }

    let mut de = serde_json::Deserializer::from_str(text);
    de.deserialize_seq(List(out))?;
    de.end()
}

/// One decoded custom field: ends of its id and (raw JSON) value in [`FieldScratch::buf`].
struct FieldEnds {
    id_end: usize,
    /// `None` when the element had no `value` key.
    value_end: Option<usize>,
}

/// Decoded custom fields of one row, stored end to end in one reusable buffer.
#[derive(Default)]
pub(crate) struct FieldScratch {
    buf: String,
    ends: Vec<FieldEnds>,
}

impl FieldScratch {
    /// `(id, raw JSON value)` pairs, in order.
    pub(crate) fn iter(&self) -> impl Iterator<Item = (&str, Option<&str>)> + '_ {
        let mut start = 0;
        self.ends.iter().map(move |e| {
            let id = &self.buf[start..e.id_end];
            start = e.id_end;
            let value = e.value_end.map(|end| {
                let v = &self.buf[start..end];
                start = end;
                v
            });
            (id, value)
        })
    }
}

/// Decodes a `customFields` array: objects with a string `id` and any `value`.
///
/// Returns whether the array was taken in full: `false` when an element had other or repeated
/// keys, which the decoded form drops (the caller then keeps the raw array as well). Fails when
/// the value is not such an array (not an array, an element not an object, no string `id`).
pub(crate) fn custom_fields(text: &str, out: &mut FieldScratch) -> Result<bool, serde_json::Error> {
    out.buf.clear();
    out.ends.clear();

    struct Elem<'a> {
        out: &'a mut FieldScratch,
        complete: &'a mut bool,
    }
    impl<'de> DeserializeSeed<'de> for Elem<'_> {
        type Value = ();
        fn deserialize<D: Deserializer<'de>>(self, d: D) -> Result<(), D::Error> {
            d.deserialize_map(self)
        }
    }
    impl<'de> Visitor<'de> for Elem<'_> {
        type Value = ();
        fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
            f.write_str("a custom field object")
        }
        fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<(), A::Error> {
            let mut id: Option<Cow<'de, str>> = None;
            let mut value: Option<&'de RawValue> = None;
            while let Some(Key(key)) = map.next_key::<Key<'de>>()? {
                match key.as_ref() {
                    "id" if id.is_none() => {
                        let raw: &'de RawValue = map.next_value()?;
                        match decode_str(raw.get()) {
                            Some(s) => id = Some(s),
                            None => {
                                return Err(de::Error::custom("custom field id is not a string"))
                            }
                        }
                    }
                    "value" if value.is_none() => value = Some(map.next_value()?),
                    _ => {
                        map.next_value::<de::IgnoredAny>()?;
                        *self.complete = false;
                    }
                }
            }
            let id = id.ok_or_else(|| de::Error::missing_field("id"))?;
            self.out.buf.push_str(&id);
            let id_end = self.out.buf.len();
            let value_end = value.map(|v| {
                self.out.buf.push_str(v.get());
                self.out.buf.len()
            });
            self.out.ends.push(FieldEnds { id_end, value_end });
            Ok(())
        }
    }

    struct List<'a>(&'a mut FieldScratch, &'a mut bool);
    impl<'de> Visitor<'de> for List<'_> {
        type Value = ();
        fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
            f.write_str("an array of custom fields")
        }
        fn visit_seq<A: SeqAccess<'de>>(self, mut seq: A) -> Result<(), A::Error> {
            while seq
                .next_element_seed(Elem {
                    out: &mut *self.0,
                    complete: &mut *self.1,
                })?
                .is_some()
            {}
            Ok(())
        }
    }

    let mut complete = true;
    let mut de = serde_json::Deserializer::from_str(text);
    de.deserialize_seq(List(out, &mut complete))?;
    de.end()?;
    Ok(complete)
}
