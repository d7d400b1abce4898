//! `GET /locations/:locationId/customFields?model=contact`: the location's custom field
//! definitions (scope `locations/customFields.readonly`).
//!
//! Contacts carry their custom field values by id only (`customFields: [{id, value}]`); these
//! definitions give each id its `name`, `fieldKey` (`contact.<key>`) and `dataType`. The export
//! writes them as the `custom_fields` table (and, with `--custom-fields wide`, one column per
//! field); the import maps `customField.<key>` columns to ids with them.

use reqwest::Method;
use serde::Deserialize;
use serde_json::value::RawValue;

use super::error::{ApiError, RequestLabel};
use super::stats::RequestKind;
use super::transport::path_and_query;
use super::{Client, API_VERSION};

/// The scope `GET /locations/:locationId/customFields` needs.
pub const CUSTOM_FIELDS_SCOPE: &str = "locations/customFields.readonly";

/// Path and query of the contact custom fields of a location.
fn custom_fields_path(location_id: &str) -> String {
    path_and_query(
        &["locations", location_id, "customFields"],
        &[("model", "contact")],
    )
}

impl Client {
    /// `GET /locations/:locationId/customFields?model=contact`: the reply's `customFields`,
    /// as received (lenient: any JSON value, `[]` when the key is missing or null; the caller
    /// decides what to do with elements it cannot read).
    pub async fn custom_fields(&self, location_id: &str) -> Result<Box<RawValue>, ApiError> {
        /// `{"customFields": [...]}`; other keys of the reply are ignored.
        #[derive(Deserialize)]
        struct Env {
            #[serde(default, rename = "customFields")]
            custom_fields: Option<Box<RawValue>>,
        }
        let env: Env = self
            .read_json(
                RequestKind::Other,
                Method::GET,
                custom_fields_path(location_id),
                None,
                API_VERSION,
            )
            .await?;
        Ok(env.custom_fields.unwrap_or_else(empty_list))
    }

    /// The request [`Client::custom_fields`] sends, as errors name it.
    pub fn custom_fields_label(location_id: &str) -> RequestLabel {
        RequestLabel::new(&Method::GET, &custom_fields_path(location_id))
    }
}

fn empty_list() -> Box<RawValue> {
    RawValue::from_string("[]".into()).expect("[] is JSON")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_location_id_is_one_encoded_path_segment_and_the_model_is_contact() {
        assert_eq!(
            custom_fields_path("L/1"),
            "/locations/L%2F1/customFields?model=contact"
        );
        assert_eq!(
            Client::custom_fields_label("L1").0,
            "GET /locations/L1/customFields?model=contact"
        );
    }
}
