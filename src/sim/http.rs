//! What a simulated request and its reply are, shared by the pipeline (`routes`) and the
//! handlers (`read`, `write`, `oauth`): the route kinds, the parsed request, the reply and
//! the API's error replies. Handlers import this module, and `routes` imports the handlers,
//! so the arrows run one way.

use std::collections::HashMap;

use axum::http::StatusCode;
use serde::ser::SerializeMap;
use serde::{Serialize, Serializer};
use serde_json::json;

use super::Sim;

macro_rules! kinds {
    ($($kind:ident => $name:literal,)*) => {
        /// Each route the simulator knows, for dispatch and per-route counts.
        #[derive(Clone, Copy, Debug, PartialEq, Eq)]
        pub(crate) enum Kind { $($kind,)* }
        impl Kind {
            pub(crate) const ALL: &'static [Kind] = &[$(Kind::$kind,)*];
            pub(crate) const COUNT: usize = Kind::ALL.len();
            pub(crate) fn name(self) -> &'static str {
                match self { $(Kind::$kind => $name,)* }
            }
        }
    };
}

kinds! {
    List => "GET /contacts/",
    Create => "POST /contacts/",
    Upsert => "POST /contacts/upsert",
    Duplicate => "GET /contacts/search/duplicate",
    Search => "POST /contacts/search",
    Business => "GET /contacts/business/:businessId",
    Get => "GET /contacts/:id",
    Update => "PUT /contacts/:id",
    Delete => "DELETE /contacts/:id",
    Tasks => "GET /contacts/:id/tasks",
    CreateTask => "POST /contacts/:id/tasks",
    GetTask => "GET /contacts/:id/tasks/:taskId",
    UpdateTask => "PUT /contacts/:id/tasks/:taskId",
    CompleteTask => "PUT /contacts/:id/tasks/:taskId/completed",
    DeleteTask => "DELETE /contacts/:id/tasks/:taskId",
    Notes => "GET /contacts/:id/notes",
    CreateNote => "POST /contacts/:id/notes",
    GetNote => "GET /contacts/:id/notes/:id",
    UpdateNote => "PUT /contacts/:id/notes/:id",
    DeleteNote => "DELETE /contacts/:id/notes/:id",
    Appointments => "GET /contacts/:id/appointments",
    AddTags => "POST /contacts/:id/tags",
    RemoveTags => "DELETE /contacts/:id/tags",
    Location => "GET /locations/:locationId",
    CustomFields => "GET /locations/:locationId/customFields",
    LocationTasks => "POST /locations/:locationId/tasks/search",
    Calendars => "GET /calendars/",
    CalendarEvents => "GET /calendars/events",
    Authorize => "GET /oauth/chooselocation",
    OAuthToken => "POST /oauth/token",
    LocationToken => "POST /oauth/locationToken",
    InstalledLocations => "GET /oauth/installedLocations",
    Unknown => "unknown",
}

/// A parsed request path: the route and its ids (empty when the route has none).
pub(crate) struct Route {
    pub kind: Kind,
    /// Contact id, business id for [`Kind::Business`], location id for [`Kind::Location`]
    /// and the other `/locations/:locationId/...` routes.
    pub id: String,
    /// Task or note id.
    pub child: String,
}

/// A finished JSON reply before headers and faults.
pub(crate) struct Reply {
    pub status: StatusCode,
    pub body: Vec<u8>,
}

impl Reply {
    pub(crate) fn new<T: Serialize>(status: StatusCode, value: &T) -> Reply {
        match serde_json::to_vec(value) {
            Ok(body) => Reply { status, body },
            Err(e) => Reply {
                status: StatusCode::INTERNAL_SERVER_ERROR,
                body: format!("{{\"statusCode\":500,\"message\":\"serialisation failed: {e}\"}}")
                    .into_bytes(),
            },
        }
    }

    pub(crate) fn ok<T: Serialize>(value: &T) -> Reply {
        Reply::new(StatusCode::OK, value)
    }
}

/// A one-key JSON object `{key: value}` serialised without building a `Value`.
pub(crate) struct Env1<'a, T: ?Sized> {
    pub key: &'static str,
    pub value: &'a T,
}

impl<T: Serialize + ?Sized> Serialize for Env1<'_, T> {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        let mut map = s.serialize_map(Some(1))?;
        map.serialize_entry(self.key, self.value)?;
        map.end()
    }
}

/// The error replies of the API, each with its real status and body shape.
#[derive(Debug)]
pub(crate) enum ApiError {
    /// 400 with a string message.
    BadRequest(String),
    Unauthorized,
    /// 401: a valid token without the scope the route needs.
    Scope,
    /// 403: the location is not one this token may use.
    Forbidden,
    NoRoute(String),
    /// 422 with an array of messages.
    Invalid(Vec<String>),
    /// 400 for a create whose email or phone exists already.
    Duplicate {
        contact_id: String,
        name: String,
        field: &'static str,
    },
}

impl ApiError {
    /// The API answers 400, not 404, for an unknown contact id.
    pub(crate) fn contact_not_found(id: &str) -> ApiError {
        ApiError::BadRequest(format!("Contact with id {id} not found"))
    }

    pub(crate) fn invalid(msg: impl Into<String>) -> ApiError {
        ApiError::Invalid(vec![msg.into()])
    }

    pub(crate) fn reply(self, trace_id: String) -> Reply {
        let (status, body) = match self {
            ApiError::BadRequest(m) => (
                StatusCode::BAD_REQUEST,
                json!({"statusCode": 400, "message": m, "traceId": trace_id}),
            ),
            ApiError::Unauthorized => (
                StatusCode::UNAUTHORIZED,
                json!({"statusCode": 401, "message": "Invalid JWT", "error": "Unauthorized", "traceId": trace_id}),
            ),
            ApiError::Scope => (
                StatusCode::UNAUTHORIZED,
                json!({"statusCode": 401, "message": "The token is not authorized for this scope.", "error": "Unauthorized", "traceId": trace_id}),
            ),
            ApiError::Forbidden => (
                StatusCode::FORBIDDEN,
                json!({"statusCode": 403, "message": "The token does not have access to this location", "traceId": trace_id}),
            ),
            ApiError::NoRoute(m) => (
                StatusCode::NOT_FOUND,
                json!({"statusCode": 404, "message": m, "error": "Not Found", "traceId": trace_id}),
            ),
            ApiError::Invalid(m) => (
                StatusCode::UNPROCESSABLE_ENTITY,
                json!({"statusCode": 422, "message": m, "error": "Unprocessable Entity", "traceId": trace_id}),
            ),
            ApiError::Duplicate {
                contact_id,
                name,
                field,
            } => (
                StatusCode::BAD_REQUEST,
                json!({
                    "statusCode": 400,
                    "message": "This location does not allow duplicated contacts.",
                    "meta": {"contactId": contact_id, "contactName": name, "matchingField": field},
                    "traceId": trace_id,
                }),
            ),
        };
        Reply::new(status, &body)
    }
}

/// Query parameters, decoded.
pub(crate) type Params = HashMap<String, String>;

/// Everything a handler needs about one request.
pub(crate) struct Req<'a> {
    pub sim: &'a Sim,
    pub route: &'a Route,
    pub params: &'a Params,
    pub body: &'a [u8],
    pub host: &'a str,
}

impl Req<'_> {
    pub(crate) fn param(&self, name: &str) -> Option<&str> {
        self.params.get(name).map(String::as_str)
    }
}
