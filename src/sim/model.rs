//! The records the simulator serves, serialised straight to bytes with serde derive (no
//! `serde_json::Value` on the read path). Field order and names follow real API replies.

use std::borrow::Cow;

use serde::{Serialize, Serializer};

/// Text that is usually a static word, sometimes built per contact.
pub(crate) type Text = Cow<'static, str>;

/// A field that may be missing from the object, present as `null`, or carry a value: the
/// API does all three, and clients must cope with each.
#[derive(Clone, Debug, Default, PartialEq)]
pub(crate) enum F<T> {
    #[default]
    Absent,
    Null,
    Val(T),
}

impl<T> F<T> {
    pub(crate) fn is_absent(&self) -> bool {
        matches!(self, F::Absent)
    }

    pub(crate) fn get(&self) -> Option<&T> {
        match self {
            F::Val(v) => Some(v),
            _ => None,
        }
    }
}

impl<T: Serialize> Serialize for F<T> {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        match self {
            F::Val(v) => v.serialize(s),
            _ => s.serialize_none(),
        }
    }
}

/// Epoch milliseconds, serialised as `2021-07-02T05:18:26.704Z`.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, PartialOrd, Ord)]
pub(crate) struct Ms(pub(crate) i64);

impl Serialize for Ms {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(&crate::timefmt::format_iso_millis(self.0))
    }
}

/// A generated value, or the JSON a client wrote in its place.
#[derive(Clone, Debug, Serialize)]
#[serde(untagged)]
pub(crate) enum OrJson<T> {
    Gen(T),
    Json(serde_json::Value),
}

#[derive(Clone, Debug, Default, Serialize)]
#[serde(rename_all = "camelCase")]
pub(crate) struct Contact {
    pub id: String,
    pub date_added: Ms,
    pub date_updated: Ms,
    pub location_id: String,
    #[serde(skip_serializing_if = "F::is_absent")]
    pub contact_name: F<Text>,
    #[serde(skip_serializing_if = "F::is_absent")]
    pub first_name: F<Text>,
    #[serde(skip_serializing_if = "F::is_absent")]
    pub last_name: F<Text>,
    #[serde(skip_serializing_if = "F::is_absent")]
    pub first_name_lower_case: F<Text>,
    #[serde(skip_serializing_if = "F::is_absent")]
    pub last_name_lower_case: F<Text>,
    #[serde(skip_serializing_if = "F::is_absent")]
    pub full_name_lower_case: F<Text>,
    #[serde(skip_serializing_if = "F::is_absent")]
    pub company_name: F<Text>,
    #[serde(skip_serializing_if = "F::is_absent")]
    pub email: F<Text>,
    #[serde(skip_serializing_if = "F::is_absent")]
    pub email_lower_case: F<Text>,
    #[serde(skip_serializing_if = "F::is_absent")]
    pub phone: F<Text>,
    #[serde(skip_serializing_if = "F::is_absent")]
    pub dnd: F<bool>,
    #[serde(skip_serializing_if = "F::is_absent")]
    pub dnd_settings: F<OrJson<DndSettings>>,
    #[serde(rename = "type")]
    #[serde(skip_serializing_if = "F::is_absent")]
    pub kind: F<Text>,
    #[serde(skip_serializing_if = "F::is_absent")]
    pub source: F<Text>,
    #[serde(skip_serializing_if = "F::is_absent")]
    pub assigned_to: F<Text>,
    #[serde(skip_serializing_if = "F::is_absent")]
    pub address1: F<Text>,
    #[serde(skip_serializing_if = "F::is_absent")]
    pub city: F<Text>,
    #[serde(skip_serializing_if = "F::is_absent")]
    pub state: F<Text>,
    #[serde(skip_serializing_if = "F::is_absent")]
    pub country: F<Text>,
    #[serde(skip_serializing_if = "F::is_absent")]
    pub postal_code: F<Text>,
    #[serde(skip_serializing_if = "F::is_absent")]
    pub website: F<Text>,
    #[serde(skip_serializing_if = "F::is_absent")]
    pub timezone: F<Text>,
    #[serde(skip_serializing_if = "F::is_absent")]
    pub tags: F<Vec<Text>>,
    #[serde(skip_serializing_if = "F::is_absent")]
    pub date_of_birth: F<Text>,
    #[serde(skip_serializing_if = "F::is_absent")]
    pub last_activity: F<Ms>,
    #[serde(skip_serializing_if = "F::is_absent")]
    pub custom_fields: F<Vec<CustomField>>,
    #[serde(skip_serializing_if = "F::is_absent")]
    pub business_id: F<Text>,
    #[serde(skip_serializing_if = "F::is_absent")]
    pub attributions: F<Vec<Attribution>>,
    #[serde(skip_serializing_if = "F::is_absent")]
    pub followers: F<Vec<Text>>,
    #[serde(skip_serializing_if = "F::is_absent")]
    pub additional_emails: F<Vec<Text>>,
    #[serde(skip_serializing_if = "F::is_absent")]
    pub additional_phones: F<Vec<Text>>,
    /// Not in the spec: clients must keep or ignore unknown fields, not fail.
    #[serde(skip_serializing_if = "F::is_absent")]
    pub visitor_id: F<Text>,
    #[serde(skip_serializing_if = "F::is_absent")]
    pub opportunities_count: F<u32>,
    #[serde(skip_serializing_if = "F::is_absent")]
    pub some_future_field: F<FutureField>,
}

impl Contact {
    /// Recomputes the derived lower-case copies and `contactName` after a name or email edit.
    pub(crate) fn refresh_derived(&mut self) {
        let lower = |f: &F<Text>| match f {
            F::Val(v) => F::Val(Text::Owned(v.to_lowercase())),
            F::Null => F::Null,
            F::Absent => F::Absent,
        };
        self.first_name_lower_case = lower(&self.first_name);
        self.last_name_lower_case = lower(&self.last_name);
        self.email_lower_case = lower(&self.email);
        let parts: Vec<&str> = [self.first_name.get(), self.last_name.get()]
            .into_iter()
            .flatten()
            .map(|s| s.as_ref())
            .filter(|s| !s.is_empty())
            .collect();
        if !parts.is_empty() {
            let full = parts.join(" ");
            self.full_name_lower_case = F::Val(Text::Owned(full.to_lowercase()));
            self.contact_name = F::Val(Text::Owned(full));
        }
    }

    pub(crate) fn email_matches(&self, lower_email: &str) -> bool {
        self.email
            .get()
            .is_some_and(|e| !e.is_empty() && e.to_lowercase() == lower_email)
    }

    pub(crate) fn phone_matches(&self, phone: &str) -> bool {
        self.phone
            .get()
            .is_some_and(|p| !p.is_empty() && p == phone)
    }

    pub(crate) fn display_name(&self) -> String {
        self.contact_name
            .get()
            .map(|s| s.to_string())
            .unwrap_or_default()
    }
}

#[derive(Clone, Debug, Default, Serialize)]
pub(crate) struct DndSettings {
    #[serde(rename = "Call", skip_serializing_if = "Option::is_none")]
    pub call: Option<DndChannel>,
    #[serde(rename = "Email", skip_serializing_if = "Option::is_none")]
    pub email: Option<DndChannel>,
    #[serde(rename = "SMS", skip_serializing_if = "Option::is_none")]
    pub sms: Option<DndChannel>,
    #[serde(rename = "WhatsApp", skip_serializing_if = "Option::is_none")]
    pub whatsapp: Option<DndChannel>,
}

#[derive(Clone, Debug, Serialize)]
pub(crate) struct DndChannel {
    pub status: &'static str,
    pub message: Text,
    pub code: Text,
}

#[derive(Clone, Debug, Serialize)]
pub(crate) struct CustomField {
    pub id: Text,
    pub value: CfValue,
}

/// Custom field values come in every JSON shape.
#[derive(Clone, Debug, Serialize)]
#[serde(untagged)]
pub(crate) enum CfValue {
    Str(Text),
    Int(i64),
    Float(f64),
    Bool(bool),
    List(Vec<Text>),
    Money { currency: &'static str, amount: f64 },
    Json(serde_json::Value),
}

#[derive(Clone, Debug, Serialize)]
#[serde(rename_all = "camelCase")]
pub(crate) struct Attribution {
    pub url: Text,
    pub utm_session_source: &'static str,
    pub medium: &'static str,
    pub medium_id: Option<Text>,
    pub is_first: bool,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub is_last: Option<bool>,
    pub referrer: Option<&'static str>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub gclid: Option<Text>,
}

#[derive(Clone, Debug, Serialize)]
pub(crate) struct FutureField {
    pub version: u32,
    pub flags: Vec<&'static str>,
    pub nested: Nested,
}

#[derive(Clone, Debug, Serialize)]
pub(crate) struct Nested {
    pub deep: bool,
    pub score: f64,
}

#[derive(Clone, Debug, Serialize)]
#[serde(rename_all = "camelCase")]
pub(crate) struct Task {
    pub id: String,
    #[serde(skip_serializing_if = "F::is_absent")]
    pub title: F<Text>,
    #[serde(skip_serializing_if = "F::is_absent")]
    pub body: F<Text>,
    #[serde(skip_serializing_if = "F::is_absent")]
    pub assigned_to: F<Text>,
    #[serde(skip_serializing_if = "F::is_absent")]
    pub due_date: F<Text>,
    pub completed: bool,
    pub contact_id: String,
}

#[derive(Clone, Debug, Serialize)]
#[serde(rename_all = "camelCase")]
pub(crate) struct Note {
    pub id: String,
    #[serde(skip_serializing_if = "F::is_absent")]
    pub body: F<Text>,
    #[serde(skip_serializing_if = "F::is_absent")]
    pub user_id: F<Text>,
    pub date_added: Ms,
    pub contact_id: String,
    #[serde(skip_serializing_if = "F::is_absent")]
    pub title: F<Text>,
    #[serde(skip_serializing_if = "F::is_absent")]
    pub color: F<Text>,
    #[serde(skip_serializing_if = "F::is_absent")]
    pub pinned: F<bool>,
}

#[derive(Clone, Debug, Serialize)]
#[serde(rename_all = "camelCase")]
pub(crate) struct Event {
    pub id: String,
    pub calendar_id: String,
    pub status: &'static str,
    pub title: Text,
    #[serde(skip_serializing_if = "F::is_absent")]
    pub assigned_user_id: F<Text>,
    #[serde(skip_serializing_if = "F::is_absent")]
    pub notes: F<Text>,
    pub start_time: String,
    pub end_time: String,
    #[serde(skip_serializing_if = "F::is_absent")]
    pub address: F<Text>,
    pub location_id: String,
    pub contact_id: String,
    pub group_id: String,
    pub appointment_status: &'static str,
    pub users: Vec<Text>,
    pub date_added: Ms,
    pub date_updated: Ms,
    pub assigned_resources: Vec<Text>,
}

/// The children of one contact.
#[derive(Clone, Debug, Default)]
pub(crate) struct Children {
    pub tasks: Vec<Task>,
    pub notes: Vec<Note>,
    pub events: Vec<Event>,
}
