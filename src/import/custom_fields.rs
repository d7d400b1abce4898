//! `customField.<name>` columns name a custom field by id, by key (its `fieldKey` without
//! `contact.`) or by the whole `fieldKey`. The API takes ids, so a file with such columns
//! makes the import read the location's definitions once
//! (`GET /locations/:id/customFields?model=contact`) and map every name to its id before any
//! row is checked. A name that is neither an id nor a key of the location is a problem of the
//! header, which names the column and lists the known keys.
//!
//! A token that may not read the definitions (scope `locations/customFields.readonly`) gets a
//! warning and the names are sent as ids, as before keys were accepted.

use serde_json::Value;

use crate::api::{ApiError, Client, CUSTOM_FIELDS_SCOPE};

/// The location's custom fields, to look names up in.
#[derive(Clone, Debug, Default)]
pub(crate) struct FieldIndex {
    /// `(id, fieldKey)` of each definition with a string id.
    defs: Vec<(String, Option<String>)>,
}

impl FieldIndex {
    pub(crate) fn new(definitions: &[Value]) -> FieldIndex {
        FieldIndex {
            defs: definitions
                .iter()
                .filter_map(|d| {
                    let id = d.get("id")?.as_str()?.to_owned();
                    let key = d.get("fieldKey").and_then(Value::as_str).map(str::to_owned);
                    Some((id, key))
                })
                .collect(),
        }
    }

    /// The id `name` stands for: an id itself, a `fieldKey`, or a key (`fieldKey` without
    /// `contact.`), exactly; else the one key or `fieldKey` equal to it ignoring case.
    pub(crate) fn resolve(&self, name: &str) -> Option<&str> {
        let short = |k: &str| k.strip_prefix("contact.").unwrap_or(k).to_owned();
        if let Some((id, _)) = self.defs.iter().find(|(id, _)| id == name) {
            return Some(id);
        }
        let by_key = |eq: &dyn Fn(&str, &str) -> bool| -> Vec<&str> {
            let mut ids: Vec<&str> = self
                .defs
                .iter()
                .filter(|(_, k)| {
                    k.as_deref()
                        .is_some_and(|k| eq(k, name) || eq(&short(k), name))
                })
                .map(|(id, _)| id.as_str())
                .collect();
            ids.dedup();
            ids
        };
        match by_key(&|a, b| a == b).as_slice() {
            [id] => return Some(id),
            [] => {}
            // Two fields with one key: not a real location; ambiguous, so unknown.
            _ => return None,
        }
        match by_key(&|a, b| a.eq_ignore_ascii_case(b)).as_slice() {
            [id] => Some(id),
            _ => None,
        }
    }

    /// The keys a `customField.<key>` column may use, sorted, for a message.
    pub(crate) fn known_keys(&self) -> String {
        let mut keys: Vec<&str> = self
            .defs
            .iter()
            .filter_map(|(_, k)| k.as_deref())
            .map(|k| k.strip_prefix("contact.").unwrap_or(k))
            .collect();
        keys.sort_unstable();
        keys.dedup();
        if keys.is_empty() {
            return "none (the location has no contact custom fields)".into();
        }
        const SHOWN: usize = 40;
        let more = keys.len().saturating_sub(SHOWN);
        let mut list = keys
            .iter()
            .take(SHOWN)
            .map(|k| crate::term::escape(k))
            .collect::<Vec<_>>()
            .join(", ");
        if more > 0 {
            list.push_str(&format!(" and {more} more"));
        }
        list
    }
}

/// The location's custom fields, or `None` (with a warning) when the token may not read them.
pub(crate) async fn load(client: &Client, location: &str) -> Result<Option<FieldIndex>, ApiError> {
    match client.custom_fields(location).await {
        Ok(raw) => {
            let defs: Vec<Value> = serde_json::from_str(raw.get()).unwrap_or_default();
            Ok(Some(FieldIndex::new(&defs)))
        }
        Err(e) if e.is_scope_refusal() => {
            tracing::warn!(error = %e, "cannot read the location's custom field definitions (the token lacks the {CUSTOM_FIELDS_SCOPE} scope): customField.<name> columns are sent as ids, so a key there will be refused by the API; grant the scope, or name the fields by id");
            Ok(None)
        }
        Err(e) => Err(e),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn index() -> FieldIndex {
        FieldIndex::new(
            &serde_json::from_str::<Vec<Value>>(
                r#"[{"id":"A1","fieldKey":"contact.pincode"},{"id":"B2","fieldKey":"contact.Favourite_Color"},{"id":"C3"},{"fieldKey":"contact.noid"},"junk"]"#,
            )
            .unwrap(),
        )
    }

    #[test]
    fn a_custom_field_name_is_an_id_a_key_or_a_field_key() {
        let i = index();
        assert_eq!(i.resolve("A1"), Some("A1"));
        assert_eq!(i.resolve("C3"), Some("C3"));
        assert_eq!(i.resolve("pincode"), Some("A1"));
        assert_eq!(i.resolve("contact.pincode"), Some("A1"));
        assert_eq!(i.resolve("favourite_color"), Some("B2"));
        assert_eq!(i.resolve("a1"), None);
        assert_eq!(i.resolve("noid"), None);
        assert_eq!(i.resolve("zip"), None);
        assert_eq!(i.known_keys(), "Favourite_Color, pincode");
        assert!(FieldIndex::default().known_keys().starts_with("none"));
    }
}
