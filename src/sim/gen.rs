//! Base data: every contact and child is a pure function of (seed, location, slot), built on
//! demand and thrown away after serialising. About one contact in ten is adversarial (see
//! [`NASTY`]); the rest look like a real CRM.

use super::model::*;
use super::rng::{hash, hex_id, opaque_id, IdCodec, Rng};

/// Share of contacts whose values are chosen to break naive clients.
const ADVERSARIAL: f64 = 0.10;

const FIRST: &[&str] = &[
    "James",
    "Mary",
    "Robert",
    "Patricia",
    "John",
    "Jennifer",
    "Michael",
    "Linda",
    "David",
    "Elizabeth",
    "William",
    "Barbara",
    "Richard",
    "Susan",
    "Joseph",
    "Jessica",
    "Thomas",
    "Sarah",
    "Carlos",
    "María",
    "José",
    "Sofía",
    "Lucas",
    "Chloé",
    "Mohammed",
    "Aisha",
    "Wei",
    "Yuki",
    "Olga",
    "Raj",
];
const LAST: &[&str] = &[
    "Smith",
    "Johnson",
    "Williams",
    "Brown",
    "Jones",
    "Garcia",
    "Miller",
    "Davis",
    "Rodriguez",
    "Martinez",
    "Hernandez",
    "Lopez",
    "Gonzalez",
    "Wilson",
    "Anderson",
    "Thomas",
    "Taylor",
    "Moore",
    "Jackson",
    "Martin",
    "Lee",
    "Nguyen",
    "O'Brien",
    "Müller",
    "Kowalski",
    "Dubois",
    "Rossi",
    "Tanaka",
    "Khan",
    "Silva",
];
/// (city, state, country, timezone)
const PLACES: &[(&str, &str, &str, &str)] = &[
    ("Austin", "TX", "US", "America/Chicago"),
    ("Denver", "CO", "US", "America/Denver"),
    ("Miami", "FL", "US", "America/New_York"),
    ("Seattle", "WA", "US", "America/Los_Angeles"),
    ("Boston", "MA", "US", "America/New_York"),
    ("Phoenix", "AZ", "US", "America/Phoenix"),
    ("Toronto", "ON", "CA", "America/Toronto"),
    ("London", "England", "GB", "Europe/London"),
    ("Sydney", "NSW", "AU", "Australia/Sydney"),
    ("Chicago", "IL", "US", "America/Chicago"),
];
const STREETS: &[&str] = &[
    "Main St",
    "Oak Ave",
    "Maple Dr",
    "Cedar Ln",
    "Pine St",
    "Elm St",
    "Washington Blvd",
    "Lake Rd",
];
const DOMAINS: &[&str] = &[
    "gmail.com",
    "yahoo.com",
    "outlook.com",
    "example.com",
    "icloud.com",
    "hotmail.com",
];
const COMPANIES: &[&str] = &[
    "Acme Inc",
    "Globex",
    "Initech",
    "Umbrella LLC",
    "Stark Industries",
    "Wayne Enterprises",
    "Hooli",
    "Pied Piper",
    "Vandelay Industries",
    "Soylent Corp",
];
const SOURCES: &[&str] = &[
    "website form",
    "facebook ads",
    "google ads",
    "referral",
    "import",
    "manual",
    "chat widget",
    "Calendar booking",
];
const TAGS: &[&str] = &[
    "vip",
    "newsletter",
    "lead-hot",
    "lead-cold",
    "customer",
    "webinar-2024",
    "do-not-call",
    "facebook",
    "referral",
    "trial",
];
const TASK_TITLES: &[&str] = &[
    "Call back",
    "Send proposal",
    "Follow up",
    "Book demo",
    "Collect payment",
    "Check in",
];
const NOTE_BODIES: &[&str] = &[
    "Called, left a voicemail.",
    "Interested in the premium plan.\nWants a quote by Friday.",
    "Met at the trade show; prefers email.",
    "Asked to be contacted after the holidays.",
];

/// Values chosen to break naive clients: unicode of every kind, line breaks, quotes and
/// separators, CSV formula prefixes, empty and blank strings. All valid UTF-8, no NUL.
pub(crate) const NASTY: &[&str] = &[
    "Zoë Ångström-Øre",
    "李小龍",
    "東京都渋谷区神南1-2-3",
    "👩‍👩‍👧‍👦 Family",
    "🏳️‍🌈🇺🇸 flags 👍🏽",
    "مرحبا بالعالم",
    "שלום עולם",
    "line one\nline two",
    "carriage\rreturn",
    "windows\r\nline",
    "He said \"hi\", then; left\tnow",
    "C:\\path\\to\\file\\",
    "=HYPERLINK(\"http://evil.example\",\"click\")",
    "+1+2",
    "-2+3",
    "@SUM(A1:A9)",
    "",
    "  padded  ",
    "\u{200B}zero\u{200B}width",
    "\u{202E}txet desrever",
    "𝄞 music ☃ snow",
    "null",
    "<script>alert(1)</script>",
    "'; DROP TABLE contacts;--",
];

/// A ~10 KB value with line breaks, quotes and separators in it.
pub(crate) fn long_text() -> String {
    "Lorem ipsum ✓ dolor, \"sit\"; amet\r\n".repeat(320)
}

/// Everything generation needs about one location; built once.
pub(crate) struct LocationGen {
    pub seed: u64,
    pub codec: IdCodec,
    pub loc: u32,
    pub location_id: String,
    pub businesses: Vec<String>,
    users: Vec<String>,
    calendars: Vec<String>,
    custom: Vec<CfDef>,
}

#[derive(Clone, Copy)]
enum CfKind {
    Text,
    LargeText,
    Int,
    Float,
    List,
    Money,
    Bool,
}

/// Name, email and phone of a base contact.
pub(crate) struct Identity {
    pub nasty: bool,
    pub first: &'static str,
    pub last: &'static str,
    pub email: F<Text>,
    pub phone: F<Text>,
}

/// A custom field definition: id, key (`contact.<name>`), display name, value kind.
pub(crate) struct CfDef {
    pub id: String,
    pub key: String,
    pub name: &'static str,
    kind: CfKind,
}

/// The options of the list field, also its picklist.
const INTERESTS: &[&str] = &["golf", "tennis", "chess", "café ☕"];

impl CfDef {
    /// The API's `dataType` for the values this field holds.
    pub(crate) fn data_type(&self) -> &'static str {
        match self.kind {
            CfKind::Text => "TEXT",
            CfKind::LargeText => "LARGE_TEXT",
            CfKind::Int => "NUMERICAL",
            CfKind::Float => "FLOAT",
            CfKind::List => "MULTIPLE_OPTIONS",
            // Sic: the API spells it so.
            CfKind::Money => "MONETORY",
            CfKind::Bool => "CHECKBOX",
        }
    }

    /// The picklist of an options field; empty for the others.
    pub(crate) fn picklist(&self) -> &'static [&'static str] {
        match self.kind {
            CfKind::List => INTERESTS,
            _ => &[],
        }
    }
}

impl LocationGen {
    pub(crate) fn new(seed: u64, loc: u32, location_id: &str, businesses: usize) -> LocationGen {
        let l = u64::from(loc);
        // Key, display name (one with a comma and quotes, one with non-ASCII), value kind.
        let kinds = [
            ("favourite_color", "Favourite colour", CfKind::Text),
            ("notes_long", "Notes, long \"free\" text", CfKind::LargeText),
            ("employees", "Employees", CfKind::Int),
            ("score", "Score (0–1000)", CfKind::Float),
            ("interests", "Interests", CfKind::List),
            ("budget", "Budget", CfKind::Money),
            ("opted_in", "Opted in?", CfKind::Bool),
        ];
        LocationGen {
            seed,
            codec: IdCodec::new(seed),
            loc,
            location_id: location_id.to_string(),
            businesses: (0..businesses as u64)
                .map(|b| hex_id(hash(&[seed, 20, l, b]), 24))
                .collect(),
            users: (0..5).map(|u| opaque_id(hash(&[seed, 21, l, u]))).collect(),
            calendars: (0..3).map(|c| opaque_id(hash(&[seed, 22, l, c]))).collect(),
            custom: kinds
                .iter()
                .enumerate()
                .map(|(i, &(key, name, kind))| CfDef {
                    id: opaque_id(hash(&[seed, 23, l, i as u64])),
                    key: format!("contact.{key}"),
                    name,
                    kind,
                })
                .collect(),
        }
    }

    pub(crate) fn custom_fields(&self) -> &[CfDef] {
        &self.custom
    }

    /// The business index of a base contact, if it has one (about one in three).
    pub(crate) fn business_of(&self, slot: u32) -> Option<usize> {
        let h = hash(&[self.seed, 30, u64::from(self.loc), u64::from(slot)]);
        (!self.businesses.is_empty() && h.is_multiple_of(3))
            .then(|| ((h >> 8) % self.businesses.len() as u64) as usize)
    }

    /// E.164, unique per slot below 10^7.
    fn phone(&self, slot: u32) -> String {
        let area = 201 + hash(&[self.seed, 31, u64::from(self.loc)]) % 700;
        let n = (u64::from(slot) * 7_919 + 1_234_567) % 10_000_000;
        format!("+1{area}{n:07}")
    }

    /// The fields duplicate detection needs, from their own random stream so that scanning a
    /// location for an email or phone does not build whole contacts.
    pub(crate) fn identity(&self, slot: u32) -> Identity {
        let s = u64::from(slot);
        let r = &mut Rng::new(hash(&[self.seed, 41, u64::from(self.loc), s]));
        let nasty = r.chance(ADVERSARIAL);
        let first = r.pick(FIRST);
        let last = r.pick(LAST);
        let email = match r.below(20) {
            0 => F::Absent,
            1 => F::Null,
            2 => F::Val(Text::Borrowed("")),
            3 if nasty => F::Val(format!("用户{s}@例子.广告").into()),
            4 if nasty => F::Val(format!("o'brien+\"tag\"{s}@example.com").into()),
            5 => F::Val(format!("{first}.{last}{s}@{}", r.pick(DOMAINS)).into()),
            _ => F::Val(format!("{}.{}{s}@{}", ascii(first), ascii(last), r.pick(DOMAINS)).into()),
        };
        let phone = match r.below(20) {
            0 | 1 => F::Absent,
            2 => F::Null,
            _ => F::Val(Text::Owned(self.phone(slot))),
        };
        Identity {
            nasty,
            first,
            last,
            email,
            phone,
        }
    }

    /// The base contact in `slot`, added at `added` (epoch ms).
    pub(crate) fn contact(&self, slot: u32, added: i64) -> Contact {
        let s = u64::from(slot);
        let Identity {
            nasty,
            first,
            last,
            email,
            phone,
        } = self.identity(slot);
        let r = &mut Rng::new(hash(&[self.seed, 40, u64::from(self.loc), s]));
        let first_name = tx(r, nasty, first.into());
        let last_name = tx(r, nasty, last.into());
        let (city, state, country, tz) = r.pick(PLACES);
        let company = r.pick(COMPANIES);
        let company_name = if r.chance(0.5) {
            tx(r, nasty, company.into())
        } else {
            F::Absent
        };
        let dnd_settings = if r.chance(0.5) {
            let sms = r.chance(0.3).then(|| DndChannel {
                status: "inactive",
                message: "Updated by user".into(),
                code: "".into(),
            });
            let email = Some(DndChannel {
                status: "active",
                message: "".into(),
                code: "".into(),
            });
            F::Val(OrJson::Gen(DndSettings {
                email,
                sms,
                ..DndSettings::default()
            }))
        } else {
            F::Absent
        };
        let source = r.pick(SOURCES);
        let source = if r.chance(0.8) {
            tx(r, nasty, source.into())
        } else {
            F::Null
        };
        let street = format!("{} {}", r.range(1, 9999), r.pick(STREETS));
        let address1 = tx(r, nasty, street.into());
        let city = tx(r, nasty, city.into());
        let website = format!("https://www.example{s}.com");
        let website = if r.chance(0.3) {
            tx(r, nasty, website.into())
        } else {
            F::Absent
        };
        let (y, m, d) = (r.range(1940, 2005), r.range(1, 12), r.range(1, 28));
        let date_of_birth = match r.below(10) {
            0..=3 => F::Val(format!("{y}-{m:02}-{d:02}").into()),
            4 | 5 => F::Val(format!("{y}-{m:02}-{d:02}T00:00:00.000Z").into()),
            6 | 7 => F::Null,
            _ => F::Absent,
        };
        let last_activity = match r.below(10) {
            0..=5 => F::Val(Ms(added + r.range(0, 120 * 86_400_000))),
            6 => F::Null,
            _ => F::Absent,
        };
        let mut c = Contact {
            id: self.codec.encode(self.loc, slot),
            date_added: Ms(added),
            date_updated: Ms(added + r.range(0, 90 * 86_400_000)),
            location_id: self.location_id.clone(),
            contact_name: F::Absent,
            first_name,
            last_name,
            first_name_lower_case: F::Absent,
            last_name_lower_case: F::Absent,
            full_name_lower_case: F::Absent,
            company_name,
            email,
            email_lower_case: F::Absent,
            phone,
            dnd: F::Val(r.chance(0.1)),
            dnd_settings,
            kind: F::Val(if r.chance(0.7) { "lead" } else { "customer" }.into()),
            source,
            assigned_to: if r.chance(0.6) {
                F::Val(self.user(r))
            } else {
                F::Absent
            },
            address1,
            city,
            state: F::Val(state.into()),
            country: F::Val(country.into()),
            postal_code: F::Val(format!("{:05}", r.below(99_999)).into()),
            website,
            timezone: F::Val(tz.into()),
            tags: F::Val(self.tags(r, nasty)),
            date_of_birth,
            last_activity,
            custom_fields: F::Val(self.custom_values(r, nasty)),
            business_id: match self.business_of(slot) {
                Some(b) => F::Val(Text::Owned(self.businesses[b].clone())),
                None => F::Absent,
            },
            attributions: if r.chance(0.6) {
                F::Val(self.attributions(r, s))
            } else {
                F::Absent
            },
            followers: F::Val((0..r.below(3)).map(|_| self.user(r)).collect()),
            additional_emails: F::Val(if r.chance(0.1) {
                vec![format!("alt{s}@example.org").into()]
            } else {
                Vec::new()
            }),
            additional_phones: F::Val(if r.chance(0.1) {
                vec![format!("+4420{:08}", s % 100_000_000).into()]
            } else {
                Vec::new()
            }),
            visitor_id: if r.chance(0.3) {
                F::Val(hex_id(r.next(), 24).into())
            } else {
                F::Absent
            },
            opportunities_count: if r.chance(0.2) {
                F::Val(r.below(6) as u32)
            } else {
                F::Absent
            },
            some_future_field: if r.chance(0.05) {
                let nested = Nested {
                    deep: true,
                    score: 0.25,
                };
                F::Val(FutureField {
                    version: 2,
                    flags: vec!["beta", "x-sync"],
                    nested,
                })
            } else {
                F::Absent
            },
        };
        c.refresh_derived();
        c
    }

    fn user(&self, r: &mut Rng) -> Text {
        Text::Owned(self.users[r.below(self.users.len() as u64) as usize].clone())
    }

    fn tags(&self, r: &mut Rng, nasty: bool) -> Vec<Text> {
        let mut tags: Vec<Text> = Vec::new();
        for _ in 0..r.below(5) {
            let t = r.pick(TAGS);
            if !tags.iter().any(|x| x == t) {
                tags.push(t.into());
            }
        }
        if nasty && r.chance(0.5) {
            tags.push(r.pick(NASTY).into());
        }
        tags
    }

    fn custom_values(&self, r: &mut Rng, nasty: bool) -> Vec<CustomField> {
        let mut out = Vec::new();
        for def in &self.custom {
            if !r.chance(0.5) {
                continue;
            }
            let value = match def.kind {
                CfKind::Text if nasty => CfValue::Str(r.pick(NASTY).into()),
                CfKind::Text => CfValue::Str(r.pick(&["red", "green", "blue", "teal"]).into()),
                CfKind::LargeText if nasty && r.chance(0.1) => CfValue::Str(long_text().into()),
                CfKind::LargeText => CfValue::Str(r.pick(NOTE_BODIES).into()),
                CfKind::Int => CfValue::Int(r.range(-5, 5000)),
                CfKind::Float => CfValue::Float(r.below(100_000) as f64 / 100.0),
                CfKind::List => {
                    CfValue::List((0..r.below(4)).map(|_| r.pick(INTERESTS).into()).collect())
                }
                CfKind::Money => CfValue::Money {
                    currency: r.pick(&["USD", "EUR", "GBP"]),
                    amount: r.below(1_000_000) as f64 / 100.0,
                },
                CfKind::Bool => CfValue::Bool(r.chance(0.5)),
            };
            out.push(CustomField {
                id: def.id.clone().into(),
                value,
            });
        }
        out
    }

    fn attributions(&self, r: &mut Rng, s: u64) -> Vec<Attribution> {
        (0..r.range(1, 2))
            .map(|i| Attribution {
                url: format!("https://www.example.com/landing?ref={s}").into(),
                utm_session_source: r.pick(&[
                    "Direct traffic",
                    "Paid Search",
                    "Social media",
                    "Referral",
                ]),
                medium: r.pick(&["direct", "form", "calendar", "chat"]),
                medium_id: if r.chance(0.5) {
                    Some(opaque_id(r.next()).into())
                } else {
                    None
                },
                is_first: i == 0,
                is_last: (i == 1).then_some(true),
                referrer: r.chance(0.5).then_some("https://www.google.com/"),
                gclid: r.chance(0.2).then(|| hex_id(r.next(), 40).into()),
            })
            .collect()
    }

    /// How many tasks [`LocationGen::children`] gives `slot`, without building them: the
    /// first draws of the same stream.
    pub(crate) fn task_count(&self, slot: u32) -> usize {
        let mut r = Rng::new(hash(&[self.seed, 50, u64::from(self.loc), u64::from(slot)]));
        r.chance(ADVERSARIAL);
        child_count(&mut r, 3) as usize
    }

    /// The location's calendars; every generated appointment is in one of them.
    pub(crate) fn calendars(&self) -> &[String] {
        &self.calendars
    }

    /// The calendar group of every calendar and appointment of the location.
    pub(crate) fn group_id(&self) -> String {
        opaque_id(hash(&[self.seed, 54, u64::from(self.loc)]))
    }

    /// The base children of the contact in `slot`; `added` is the contact's dateAdded.
    pub(crate) fn children(&self, slot: u32, added: i64) -> Children {
        let (l, s) = (u64::from(self.loc), u64::from(slot));
        let mut r = Rng::new(hash(&[self.seed, 50, l, s]));
        let nasty = r.chance(ADVERSARIAL);
        let contact_id = self.codec.encode(self.loc, slot);
        let text = |r: &mut Rng, normal: &'static str| -> F<Text> {
            match (nasty, r.below(12)) {
                (true, 0..=3) => F::Val(r.pick(NASTY).into()),
                (true, 4) => F::Val(long_text().into()),
                (true, 5 | 6) => F::Null,
                _ => F::Val(normal.into()),
            }
        };
        let tasks = (0..child_count(&mut r, 3))
            .map(|j| Task {
                id: opaque_id(hash(&[self.seed, 51, l, s, j])),
                title: {
                    let t = r.pick(TASK_TITLES);
                    text(&mut r, t)
                },
                body: if r.chance(0.7) {
                    text(&mut r, "Discuss renewal terms")
                } else {
                    F::Absent
                },
                assigned_to: self.maybe_user(&mut r),
                due_date: F::Val(
                    crate::timefmt::format_iso_millis(added + r.range(0, 60 * 86_400_000)).into(),
                ),
                completed: r.chance(0.4),
                contact_id: contact_id.clone(),
            })
            .collect();
        let notes = (0..child_count(&mut r, 3))
            .map(|j| Note {
                id: opaque_id(hash(&[self.seed, 52, l, s, j])),
                body: {
                    let b = r.pick(NOTE_BODIES);
                    text(&mut r, b)
                },
                user_id: self.maybe_user(&mut r),
                date_added: Ms(added + r.range(0, 30 * 86_400_000)),
                contact_id: contact_id.clone(),
                title: if r.chance(0.3) {
                    F::Val("Follow-up summary".into())
                } else {
                    F::Absent
                },
                color: if r.chance(0.2) {
                    F::Val("#FFAA00".into())
                } else {
                    F::Absent
                },
                pinned: if r.chance(0.3) {
                    F::Val(r.chance(0.5))
                } else {
                    F::Absent
                },
            })
            .collect();
        let events = (0..child_count(&mut r, 2))
            .map(|j| {
                let start =
                    added + r.range(1, 90) * 86_400_000 / 24 * 24 + r.range(8, 17) * 3_600_000;
                let start = start - start % 1_800_000;
                let zoned = r.chance(0.3);
                let time = |ms: i64| {
                    let iso = crate::timefmt::format_iso_millis(ms);
                    if zoned {
                        iso
                    } else {
                        // `2021-07-16 11:00:00`: no zone, as in the spec.
                        format!(
                            "{} {}",
                            iso.get(..10).unwrap_or(""),
                            iso.get(11..19).unwrap_or("")
                        )
                    }
                };
                let status = r.pick(&["booked", "confirmed", "cancelled", "showed", "noshow"]);
                Event {
                    id: opaque_id(hash(&[self.seed, 53, l, s, j])),
                    calendar_id: self.calendars[r.below(self.calendars.len() as u64) as usize]
                        .clone(),
                    status,
                    title: match text(&mut r, "Discovery call") {
                        F::Val(t) => t,
                        _ => "".into(),
                    },
                    assigned_user_id: self.maybe_user(&mut r),
                    notes: if r.chance(0.4) {
                        text(&mut r, "Bring the contract")
                    } else {
                        F::Absent
                    },
                    start_time: time(start),
                    end_time: time(start + 1_800_000),
                    address: if r.chance(0.5) {
                        F::Val("https://meet.example.com/abc-defg-hij".into())
                    } else {
                        F::Absent
                    },
                    location_id: self.location_id.clone(),
                    contact_id: contact_id.clone(),
                    group_id: self.group_id(),
                    appointment_status: if status == "booked" {
                        "confirmed"
                    } else {
                        status
                    },
                    users: Vec::new(),
                    date_added: Ms(added + 1000),
                    date_updated: Ms(added + 2000 + r.range(0, 86_400_000)),
                    assigned_resources: Vec::new(),
                }
            })
            .collect();
        Children {
            tasks,
            notes,
            events,
        }
    }

    fn maybe_user(&self, r: &mut Rng) -> F<Text> {
        if r.chance(0.8) {
            F::Val(
                self.users[r.below(self.users.len() as u64) as usize]
                    .clone()
                    .into(),
            )
        } else {
            F::Absent
        }
    }
}

/// How many children of one kind a contact has: none, one, two or `max`.
fn child_count(r: &mut Rng, max: u64) -> u64 {
    match r.below(20) {
        0..=5 => 0,
        6..=12 => 1,
        13..=16 => 2.min(max),
        _ => max,
    }
}

/// For adversarial contacts, any text field may turn nasty, 10 KB long, null or missing.
fn tx(r: &mut Rng, nasty: bool, normal: Text) -> F<Text> {
    if !nasty {
        return F::Val(normal);
    }
    match r.below(40) {
        0..=11 => F::Val(Text::Borrowed(r.pick(NASTY))),
        12 => F::Val(Text::Owned(long_text())),
        13..=16 => F::Null,
        17 | 18 => F::Absent,
        _ => F::Val(normal),
    }
}

fn ascii(w: &str) -> String {
    w.chars()
        .filter(char::is_ascii_alphanumeric)
        .collect::<String>()
        .to_lowercase()
}
