//! The persisted form of events: a version envelope, and upcasters that read older versions.
//!
//! Every stored event is `{"v": <schema version>, "event": {...}}`. Reading an event of the
//! current version decodes it directly. An older one is first rewritten as JSON by the chain of
//! [`Upcaster`]s, each taking one version to the next, then decoded; so the Rust types only ever
//! describe today's schema, and history is never rewritten in the store.
//!
//! How to change the schema: add fields with `#[serde(default)]` when old events can do without
//! them (no version bump needed). For anything else (a rename, a split, a changed meaning), bump
//! [`EVENT_SCHEMA_VERSION`], and add to [`UPCASTERS`] a function from the previous version's JSON
//! to the new one's, with a fixture of the old form in the tests.

use std::fmt;

use serde::de::{self, DeserializeSeed, Deserializer, IgnoredAny, MapAccess, SeqAccess, Visitor};
use serde::{Deserialize, Serialize};
use serde_json::Value;
use thiserror::Error;

use crate::event::{Event, EVENT_SCHEMA_VERSION};

/// Rewrites the JSON of an event from `from_version` to `from_version + 1`.
#[derive(Debug, Clone, Copy)]
pub struct Upcaster {
    /// The version it reads.
    pub from_version: u32,
    /// The rewrite. An `Err` names what it could not make sense of.
    pub upcast: fn(Value) -> Result<Value, String>,
}

/// The upcasters of this build, one per past version. Empty while the schema is at version 1.
pub const UPCASTERS: &[Upcaster] = &[];

/// Why stored bytes could not be read as an event.
#[derive(Debug, Error)]
#[non_exhaustive]
pub enum DecodeError {
    /// Not JSON, or not an event of its version.
    #[error("malformed event: {0}")]
    Json(#[from] serde_json::Error),
    /// Written by a newer build than this one.
    #[error("event schema version {found} is newer than this build supports ({supported})")]
    FutureVersion {
        /// The version found.
        found: u32,
        /// The newest this build reads.
        supported: u32,
    },
    /// No upcaster reads this version, or one failed.
    #[error("cannot upcast event from schema version {from}: {message}")]
    Upcast {
        /// The version it was at.
        from: u32,
        /// What went wrong.
        message: String,
    },
}

#[derive(Serialize)]
struct EnvelopeOut<'a> {
    v: u32,
    event: &'a Event,
}

/// What the envelope held: an event of the current version decoded in the same pass, or the
/// JSON of another version (or of an envelope written with `event` before `v`).
enum Decoded {
    Current(Event),
    Raw {
        version: Option<u32>,
        event: Option<Value>,
    },
}

/// Decodes the envelope in one pass: when `v` comes first (as [`encode`] writes it) and is the
/// current version, the event is decoded straight into its type, without an intermediate tree.
struct EnvelopeVisitor {
    current_version: u32,
}

#[derive(Deserialize)]
#[serde(field_identifier, rename_all = "snake_case")]
enum Field {
    V,
    Event,
    #[serde(other)]
    Other,
}

impl<'de> Visitor<'de> for EnvelopeVisitor {
    type Value = Decoded;

    fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(r#"an event envelope {"v": <version>, "event": {...}}"#)
    }

    fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<Decoded, A::Error> {
        let mut version: Option<u32> = None;
        let mut raw: Option<Value> = None;
        let mut current: Option<Event> = None;
        while let Some(field) = map.next_key::<Field>()? {
            match field {
                Field::V => version = Some(map.next_value()?),
                Field::Event if version == Some(self.current_version) => {
                    current = Some(map.next_value()?);
                }
                Field::Event => raw = Some(map.next_value()?),
                Field::Other => {
                    map.next_value::<IgnoredAny>()?;
                }
            }
        }
        match (version, current) {
            (Some(_), Some(event)) => Ok(Decoded::Current(event)),
            (None, _) => Err(de::Error::missing_field("v")),
            (version, None) => Ok(Decoded::Raw {
                version,
                event: raw,
            }),
        }
    }
}

struct Envelope {
    current_version: u32,
}

impl<'de> DeserializeSeed<'de> for Envelope {
    type Value = Decoded;

    fn deserialize<D: Deserializer<'de>>(self, deserializer: D) -> Result<Decoded, D::Error> {
        deserializer.deserialize_map(EnvelopeVisitor {
            current_version: self.current_version,
        })
    }
}

/// Encodes `event` in its versioned envelope.
pub fn encode(event: &Event) -> Vec<u8> {
    // Serializing these types cannot fail: every map key is a string and no field is a
    // non-finite float. An empty vector here would be a bug, caught by the round-trip tests.
    serde_json::to_vec(&EnvelopeOut {
        v: event.event_version(),
        event,
    })
    .unwrap_or_default()
}

/// Decodes an event written by [`encode`] in this or any earlier version.
pub fn decode(bytes: &[u8]) -> Result<Event, DecodeError> {
    decode_with(bytes, EVENT_SCHEMA_VERSION, UPCASTERS)
}

/// Decodes with an explicit current version and upcaster chain (for tests of a schema change).
pub fn decode_with(
    bytes: &[u8],
    current_version: u32,
    upcasters: &[Upcaster],
) -> Result<Event, DecodeError> {
    let mut deserializer = serde_json::Deserializer::from_slice(bytes);
    let decoded = Envelope { current_version }.deserialize(&mut deserializer)?;
    deserializer.end()?;
    finish(decoded, current_version, upcasters)
}

/// Encodes the events of one `process()` call as one record: a JSON array of envelopes. Stores
/// write a batch atomically, so a command's events land together or not at all.
pub fn encode_batch(events: &[Event]) -> Vec<u8> {
    let envelopes: Vec<EnvelopeOut<'_>> = events
        .iter()
        .map(|event| EnvelopeOut {
            v: event.event_version(),
            event,
        })
        .collect();
    // As in `encode`, serializing these types cannot fail.
    serde_json::to_vec(&envelopes).unwrap_or_default()
}

/// Decodes a batch written by [`encode_batch`], upcasting older events.
pub fn decode_batch(bytes: &[u8]) -> Result<Vec<Event>, DecodeError> {
    let mut deserializer = serde_json::Deserializer::from_slice(bytes);
    let decoded = deserializer.deserialize_seq(BatchVisitor {
        current_version: EVENT_SCHEMA_VERSION,
    })?;
    deserializer.end()?;
    decoded
        .into_iter()
        .map(|d| finish(d, EVENT_SCHEMA_VERSION, UPCASTERS))
        .collect()
}

struct BatchVisitor {
    current_version: u32,
}

impl<'de> Visitor<'de> for BatchVisitor {
    type Value = Vec<Decoded>;

    fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("an array of event envelopes")
    }

    fn visit_seq<A: SeqAccess<'de>>(self, mut seq: A) -> Result<Vec<Decoded>, A::Error> {
        let mut out = Vec::with_capacity(seq.size_hint().unwrap_or(0).min(4_096));
        while let Some(decoded) = seq.next_element_seed(Envelope {
            current_version: self.current_version,
        })? {
            out.push(decoded);
        }
        Ok(out)
    }
}

fn finish(
    decoded: Decoded,
    current_version: u32,
    upcasters: &[Upcaster],
) -> Result<Event, DecodeError> {
    let (version, value) = match decoded {
        Decoded::Current(event) => return Ok(event),
        Decoded::Raw {
            version: Some(version),
            event: Some(value),
        } => (version, value),
        Decoded::Raw { .. } => {
            return Err(DecodeError::Json(de::Error::missing_field("event")));
        }
    };
    if version > current_version {
        return Err(DecodeError::FutureVersion {
            found: version,
            supported: current_version,
        });
    }
    let mut value = value;
    let mut at = version;
    while at < current_version {
        let upcaster = upcasters
            .iter()
            .find(|u| u.from_version == at)
            .ok_or_else(|| DecodeError::Upcast {
                from: at,
                message: "no upcaster for this version".to_owned(),
            })?;
        value = (upcaster.upcast)(value)
            .map_err(|message| DecodeError::Upcast { from: at, message })?;
        at += 1;
    }
    Ok(serde_json::from_value(value)?)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::types::{TaskId, TaskStatus, Timestamp};

    fn completed() -> Event {
        Event::TaskStatusUpdated {
            task_id: TaskId::from("t1"),
            attempt: 1,
            status: TaskStatus::Completed,
            output: Some("42".into()),
            error: None,
            tokens_used: Some(7),
            at: Timestamp(5),
        }
    }

    #[test]
    fn events_round_trip_through_the_envelope() {
        let bytes = encode(&completed());
        assert!(bytes.starts_with(br#"{"v":1,"event":{"type":"task_status_updated""#));
        assert_eq!(decode(&bytes).expect("decodes"), completed());
    }

    /// A schema change, played out: suppose version 2 had renamed `output` to `result`... the
    /// other way round. Here today's types are "version 2"; a stored "version 1" event used the
    /// name `result`. The upcaster renames the field and the old event reads as today's.
    #[test]
    fn an_older_version_is_upcast_before_decoding() {
        fn rename_result_to_output(mut v: Value) -> Result<Value, String> {
            let obj = v.as_object_mut().ok_or("event is not an object")?;
            if let Some(result) = obj.remove("result") {
                obj.insert("output".to_owned(), result);
            }
            Ok(v)
        }
        let v1 = br#"{"v":1,"event":{"type":"task_status_updated","task_id":"t1","attempt":1,"status":"completed","result":"42","tokens_used":7,"at":5}}"#;
        let chain = [Upcaster {
            from_version: 1,
            upcast: rename_result_to_output,
        }];
        assert_eq!(decode_with(v1, 2, &chain).expect("upcast"), completed());
        // Without the upcaster the old field is not silently dropped: `output` is simply absent,
        // and a version gap with no upcaster is an error.
        assert!(matches!(
            decode_with(v1, 2, &[]),
            Err(DecodeError::Upcast { from: 1, .. })
        ));
    }

    #[test]
    fn batches_round_trip_and_refuse_bad_bytes() {
        let events = vec![completed(), Event::PlanCompleted { at: Timestamp(6) }];
        let bytes = encode_batch(&events);
        assert_eq!(decode_batch(&bytes).expect("decodes"), events);
        assert_eq!(decode_batch(b"[]").expect("empty"), vec![]);
        for bad in [&b"["[..], b"{}", b"[{\"v\":1}]", b"[1]", b"[] x"] {
            assert!(decode_batch(bad).is_err(), "{bad:?}");
        }
    }

    #[test]
    fn an_envelope_written_in_another_key_order_still_decodes() {
        let bytes = br#"{"event":{"type":"plan_completed","at":9},"extra":[1,2],"v":1}"#;
        assert_eq!(
            decode(bytes).expect("decodes"),
            Event::PlanCompleted { at: Timestamp(9) }
        );
    }

    #[test]
    fn bad_bytes_are_errors_not_panics() {
        for bytes in [
            &b""[..],
            b"{",
            b"null",
            br#"{"v":1}"#,
            br#"{"v":1,"event":{"type":"no_such_event"}}"#,
            br#"{"v":"1","event":{}}"#,
            br#"{"v":1,"event":{"type":"plan_completed","at":1}} trailing"#,
            br#"{"event":{"type":"plan_completed","at":1}}"#,
        ] {
            assert!(
                matches!(decode(bytes), Err(DecodeError::Json(_))),
                "{bytes:?}"
            );
        }
        assert!(matches!(
            decode(br#"{"v":99,"event":{}}"#),
            Err(DecodeError::FutureVersion {
                found: 99,
                supported: 1
            })
        ));
    }
}
