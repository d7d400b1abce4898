//! Lenient models of the API's objects: every field optional, unknown fields kept in `extra`.
//!
//! The export path does not use these (it decodes raw JSON straight into Arrow columns, see
//! [`crate::schema`]); they serve single-record calls and the writes.

use serde::{Deserialize, Serialize};
use serde_json::{Map, Value};

/// A contact as the API returns it.
#[derive(Clone, Debug, Default, Deserialize, Serialize, PartialEq)]
#[serde(rename_all = "camelCase")]
pub struct Contact {
    pub id: Option<String>,
    pub location_id: Option<String>,
    pub first_name: Option<String>,
    pub last_name: Option<String>,
    pub email: Option<String>,
    pub phone: Option<String>,
    pub tags: Option<Vec<String>>,
    pub date_added: Option<String>,
    pub date_updated: Option<String>,
    pub custom_fields: Option<Vec<Value>>,
    /// Everything else, as received.
    #[serde(flatten)]
    pub extra: Map<String, Value>,
}

#[derive(Clone, Debug, Default, Deserialize, Serialize, PartialEq)]
#[serde(rename_all = "camelCase")]
pub struct Task {
    pub id: Option<String>,
    pub title: Option<String>,
    pub body: Option<String>,
    pub assigned_to: Option<String>,
    pub due_date: Option<String>,
    pub completed: Option<bool>,
    pub contact_id: Option<String>,
    #[serde(flatten)]
    pub extra: Map<String, Value>,
}

#[derive(Clone, Debug, Default, Deserialize, Serialize, PartialEq)]
#[serde(rename_all = "camelCase")]
pub struct Note {
    pub id: Option<String>,
    pub body: Option<String>,
    pub user_id: Option<String>,
    pub date_added: Option<String>,
    pub contact_id: Option<String>,
    #[serde(flatten)]
    pub extra: Map<String, Value>,
}

/// The `meta` block of `GET /contacts/` (absent from the spec; see API-NOTES).
#[derive(Clone, Debug, Default, Deserialize, PartialEq)]
#[serde(rename_all = "camelCase")]
pub struct ListMeta {
    #[serde(default, deserialize_with = "lenient_number")]
    pub total: Option<f64>,
    #[serde(default, deserialize_with = "lenient_text")]
    pub next_page_url: Option<String>,
    #[serde(default, deserialize_with = "lenient_text")]
    pub start_after_id: Option<String>,
    #[serde(default, deserialize_with = "lenient_number")]
    pub start_after: Option<f64>,
    #[serde(default, deserialize_with = "lenient_number")]
    pub current_page: Option<f64>,
    /// `None` when absent, `Some(Null)` when explicitly null (the last page).
    #[serde(default, deserialize_with = "present")]
    pub next_page: Option<Value>,
}

/// A number, or a string holding one; anything else is `None`. A `meta` field of another type
/// must not make a whole page unreadable.
pub(crate) fn lenient_number<'de, D: serde::Deserializer<'de>>(
    d: D,
) -> Result<Option<f64>, D::Error> {
    Ok(match Value::deserialize(d)? {
        Value::Number(n) => n.as_f64(),
        Value::String(s) => s.trim().parse().ok(),
        _ => None,
    })
}

/// A string, or a number written as text; anything else is `None`.
fn lenient_text<'de, D: serde::Deserializer<'de>>(d: D) -> Result<Option<String>, D::Error> {
    Ok(match Value::deserialize(d)? {
        Value::String(s) => Some(s),
        Value::Number(n) => Some(n.to_string()),
        _ => None,
    })
}

/// Deserialises a field that is present (even as `null`) as `Some`.
fn present<'de, D: serde::Deserializer<'de>>(d: D) -> Result<Option<Value>, D::Error> {
    Value::deserialize(d).map(Some)
}

/// The body of an error reply: `message` is a string, or an array for 422; the OAuth
/// endpoints may instead answer OAuth's `error_description` and `error`.
#[derive(Debug, Default, Deserialize)]
#[serde(rename_all = "camelCase")]
pub(crate) struct ErrorBody {
    #[serde(default)]
    pub message: Option<Value>,
    #[serde(default, rename = "error_description")]
    pub error_description: Option<Value>,
    #[serde(default)]
    pub error: Option<Value>,
    #[serde(default)]
    pub meta: Option<ErrorMeta>,
    /// A string, or a number; anything else is dropped rather than losing the message.
    #[serde(default, deserialize_with = "lenient_text")]
    pub trace_id: Option<String>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(rename_all = "camelCase")]
pub(crate) struct ErrorMeta {
    pub contact_id: Option<String>,
    pub matching_field: Option<String>,
}

impl ErrorBody {
    pub fn messages(&self) -> Vec<String> {
        match &self.message {
            Some(Value::String(s)) => vec![s.clone()],
            Some(Value::Array(a)) => a
                .iter()
                .map(|m| m.as_str().map_or_else(|| m.to_string(), str::to_owned))
                .collect(),
            Some(other) => vec![other.to_string()],
            None => [&self.error_description, &self.error]
                .into_iter()
                .flatten()
                .find_map(|v| v.as_str().map(str::to_owned))
                .into_iter()
                .collect(),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn meta_fields_of_unexpected_types_do_not_break_the_page() {
        let m: ListMeta = serde_json::from_str(r#"{"total":"1990","startAfter":"1751320500532","startAfterId":12,"currentPage":{"x":1}}"#).unwrap();
        assert_eq!(m.total, Some(1990.0));
        assert_eq!(m.start_after, Some(1_751_320_500_532.0));
        assert_eq!(m.start_after_id.as_deref(), Some("12"));
        assert_eq!(m.current_page, None);
    }

    #[test]
    fn next_page_tells_absent_from_null() {
        let m: ListMeta = serde_json::from_str(r#"{"total":3,"nextPage":null}"#).unwrap();
        assert_eq!(m.next_page, Some(Value::Null));
        let m: ListMeta = serde_json::from_str(r#"{"total":3}"#).unwrap();
        assert_eq!(m.next_page, None);
        let m: ListMeta = serde_json::from_str(r#"{"nextPage":2}"#).unwrap();
        assert_eq!(m.next_page, Some(Value::from(2)));
    }

    #[test]
    fn contact_keeps_unknown_fields() {
        let c: Contact =
            serde_json::from_str(r#"{"id":"a","email":null,"someNewField":{"x":1}}"#).unwrap();
        assert_eq!(c.id.as_deref(), Some("a"));
        assert_eq!(c.extra["someNewField"]["x"], 1);
    }

    #[test]
    fn an_error_body_with_a_trace_id_that_is_not_text_keeps_its_message() {
        let b: ErrorBody =
            serde_json::from_str(r#"{"message":"Forbidden","traceId":{"id":"x"}}"#).unwrap();
        assert_eq!(b.messages(), ["Forbidden"]);
        assert_eq!(b.trace_id, None);
        let b: ErrorBody = serde_json::from_str(r#"{"message":"x","traceId":12}"#).unwrap();
        assert_eq!(b.trace_id.as_deref(), Some("12"));
    }
}
