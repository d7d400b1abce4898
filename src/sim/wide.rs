//! Location-wide reads: the custom field definitions, and (see below) the children of every
//! contact of a location without one request per contact.

use serde::Serialize;

use super::http::{ApiError, Reply, Req};
use super::store::read;

#[derive(Serialize)]
#[serde(rename_all = "camelCase")]
struct CustomFieldDef<'a> {
    id: &'a str,
    name: &'a str,
    field_key: &'a str,
    placeholder: &'a str,
    data_type: &'static str,
    position: usize,
    picklist_options: &'static [&'static str],
    location_id: &'a str,
    model: &'static str,
}

/// `GET /locations/:locationId/customFields?model=contact`: every field the location's
/// contacts carry in `customFields` (all generated contacts draw from these definitions).
/// `model=opportunity` lists none: the simulator has no opportunities.
pub(crate) fn custom_fields(req: &Req<'_>) -> Result<Reply, ApiError> {
    let contact = match req.param("model").filter(|m| !m.is_empty()) {
        None | Some("contact" | "all") => true,
        Some("opportunity") => false,
        Some(_) => {
            return Err(ApiError::invalid(
                "model must be one of the following values: contact, opportunity, all",
            ))
        }
    };
    let lock = req
        .sim
        .store
        .location(&req.route.id)
        .ok_or(ApiError::Forbidden)?;
    let l = read(lock);
    let defs = l.gen.custom_fields();
    let fields: Vec<CustomFieldDef<'_>> = defs
        .iter()
        .enumerate()
        .filter(|_| contact)
        .map(|(i, d)| CustomFieldDef {
            id: &d.id,
            name: d.name,
            field_key: &d.key,
            placeholder: d.name,
            data_type: d.data_type(),
            position: i * 50,
            picklist_options: d.picklist(),
            location_id: l.id(),
            model: "contact",
        })
        .collect();
    Ok(Reply::ok(&super::http::Env1 {
        key: "customFields",
        value: &fields,
    }))
}
