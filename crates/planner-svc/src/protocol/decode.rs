//! Hand-written decoders for the messages every task crosses the wire in: an executor's
//! [`ReportMessage`] (read by the planner), the planner's [`ReportReply`] and the [`TaskMessage`]
//! in it or on its own (read by the executor).
//!
//! Their JSON is flat (a report's with a `status` tag), which serde's derive reads by first
//! buffering the whole object into an intermediate tree (`#[serde(flatten)]` and internally tagged
//! enums both do), then reading that tree again. Reading them was 7% of the daemon's perf samples
//! and 11% of the pool's at half load; `benches/wire.rs` puts the decoders at 0.74× (a report) and
//! 0.41× (a reply with a task) of the derived reading. These read each field once, in any order,
//! and accept and refuse what the derived code does: fields that the tag does not use are ignored
//! whatever they hold, unknown fields are ignored, a missing or unknown tag and a missing or ill-
//! typed field of the tag's variant are refused. The differences, all in what serde's buffer
//! happened to take and no sender of this protocol sends: a reply's `next` that is not a task is
//! refused whatever the tag (the derived code ignored it beside `refused` or `retry`); a tag must
//! be its name, not the variant's number (`"status": 1`); a reply must be an object, not an array;
//! a unit enum value must be its name, not `{"name": {}}`. `tests` hold both to the derived
//! reading.

use std::fmt;

use planner_core::{DispatchContext, ExecutorEvent, ExecutorOutcome, TaskAssignment, TaskId};
use serde::de::{self, IgnoredAny, MapAccess, Visitor};
use serde::{Deserialize, Deserializer};

use super::{lenient_next_value, ErrorBody, ErrorKind, NextRequest, NextTask};
use super::{ReportMessage, ReportReply, TaskMessage};

/// The fields of a report, its executor event's and its outcome's together.
#[derive(Deserialize)]
#[serde(field_identifier, rename_all = "snake_case")]
enum ReportField {
    TaskId,
    Attempt,
    Status,
    Output,
    TokensUsed,
    Error,
    Retryable,
    Question,
    Lease,
    Next,
    #[serde(other)]
    Unknown,
}

const OUTCOMES: &[&str] = &["started", "completed", "failed", "needs_clarification"];

/// Sets a field once: a second occurrence is refused, as the derived code refuses it.
fn once<T, E: de::Error>(slot: &mut Option<T>, value: T, name: &'static str) -> Result<(), E> {
    if slot.is_some() {
        return Err(E::duplicate_field(name));
    }
    *slot = Some(value);
    Ok(())
}

/// A field that only some variants have, kept unread until the tag is known: fields of the
/// other variants are kept too (as the derived code's buffer keeps them) but never read, so
/// what they hold, or whether they come twice, does not matter.
#[derive(Default)]
struct Kept {
    value: Option<serde_json::Value>,
    repeated: bool,
}

impl Kept {
    fn keep(&mut self, value: serde_json::Value) {
        if self.value.is_some() {
            self.repeated = true;
        } else {
            self.value = Some(value);
        }
    }

    /// The field, required by the tag's variant.
    fn take<'de, T: Deserialize<'de>, E: de::Error>(self, name: &'static str) -> Result<T, E> {
        match self.read(name)? {
            Some(value) => Ok(value),
            None => Err(E::missing_field(name)),
        }
    }

    /// The field, optional in the tag's variant: absent reads as `default`, as
    /// `#[serde(default)]` does.
    fn take_or<'de, T: Deserialize<'de>, E: de::Error>(
        self,
        name: &'static str,
        default: T,
    ) -> Result<T, E> {
        Ok(self.read(name)?.unwrap_or(default))
    }

    fn read<'de, T: Deserialize<'de>, E: de::Error>(
        self,
        name: &'static str,
    ) -> Result<Option<T>, E> {
        if self.repeated {
            return Err(E::duplicate_field(name));
        }
        self.value
            .map(|value| T::deserialize(value).map_err(E::custom))
            .transpose()
    }
}

struct ReportVisitor;

impl<'de> Visitor<'de> for ReportVisitor {
    type Value = ReportMessage;

    fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
        f.write_str("an executor report (a JSON object)")
    }

    fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<ReportMessage, A::Error> {
        let mut task_id: Option<TaskId> = None;
        let mut attempt: Option<u32> = None;
        let mut status: Option<String> = None;
        let mut lease: Option<Option<String>> = None;
        let mut next: Option<Option<NextRequest>> = None;
        let mut output = Kept::default();
        let mut tokens_used = Kept::default();
        let mut error = Kept::default();
        let mut retryable = Kept::default();
        let mut question = Kept::default();
        while let Some(field) = map.next_key::<ReportField>()? {
            match field {
                ReportField::TaskId => once(&mut task_id, map.next_value()?, "task_id")?,
                ReportField::Attempt => once(&mut attempt, map.next_value()?, "attempt")?,
                ReportField::Status => once(&mut status, map.next_value()?, "status")?,
                ReportField::Lease => once(&mut lease, map.next_value()?, "lease")?,
                ReportField::Next => {
                    let value: serde_json::Value = map.next_value()?;
                    once(&mut next, lenient_next_value(value), "next")?;
                }
                ReportField::Output => output.keep(map.next_value()?),
                ReportField::TokensUsed => tokens_used.keep(map.next_value()?),
                ReportField::Error => error.keep(map.next_value()?),
                ReportField::Retryable => retryable.keep(map.next_value()?),
                ReportField::Question => question.keep(map.next_value()?),
                ReportField::Unknown => {
                    map.next_value::<IgnoredAny>()?;
                }
            }
        }
        let status = status.ok_or_else(|| de::Error::missing_field("status"))?;
        let outcome = match status.as_str() {
            "started" => ExecutorOutcome::Started,
            "completed" => ExecutorOutcome::Completed {
                output: output.take("output")?,
                tokens_used: tokens_used.take_or("tokens_used", None)?,
            },
            "failed" => ExecutorOutcome::Failed {
                error: error.take("error")?,
                retryable: retryable.take_or("retryable", true)?,
                tokens_used: tokens_used.take_or("tokens_used", None)?,
            },
            "needs_clarification" => ExecutorOutcome::NeedsClarification {
                question: question.take("question")?,
            },
            other => return Err(de::Error::unknown_variant(other, OUTCOMES)),
        };
        Ok(ReportMessage {
            event: ExecutorEvent {
                task_id: task_id.ok_or_else(|| de::Error::missing_field("task_id"))?,
                attempt: attempt.ok_or_else(|| de::Error::missing_field("attempt"))?,
                outcome,
            },
            lease: lease.flatten(),
            next: next.flatten(),
        })
    }
}

impl<'de> Deserialize<'de> for ReportMessage {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        deserializer.deserialize_map(ReportVisitor)
    }
}

/// The fields of a report's reply, every variant's together.
#[derive(Deserialize)]
#[serde(field_identifier, rename_all = "snake_case")]
enum ReplyField {
    Status,
    Next,
    Kind,
    Message,
    #[serde(other)]
    Unknown,
}

const REPLIES: &[&str] = &["ok", "refused", "retry"];

struct ReplyVisitor;

impl<'de> Visitor<'de> for ReplyVisitor {
    type Value = ReportReply;

    fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
        f.write_str("a report's reply (a JSON object)")
    }

    fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<ReportReply, A::Error> {
        let mut status: Option<String> = None;
        // The task handed over is most of a reply: read once, into its type, and kept only
        // when the tag says `ok` (no other reply carries one).
        let mut next: Option<Option<Box<NextTask>>> = None;
        let mut kind = Kept::default();
        let mut message = Kept::default();
        while let Some(field) = map.next_key::<ReplyField>()? {
            match field {
                ReplyField::Status => once(&mut status, map.next_value()?, "status")?,
                ReplyField::Next => once(&mut next, map.next_value()?, "next")?,
                ReplyField::Kind => kind.keep(map.next_value()?),
                ReplyField::Message => message.keep(map.next_value()?),
                ReplyField::Unknown => {
                    map.next_value::<IgnoredAny>()?;
                }
            }
        }
        let status = status.ok_or_else(|| de::Error::missing_field("status"))?;
        let error = |kind: Kept, message: Kept| -> Result<ErrorBody, A::Error> {
            Ok(ErrorBody {
                kind: kind.take::<ErrorKind, _>("kind")?,
                message: message.take("message")?,
            })
        };
        match status.as_str() {
            "ok" => Ok(ReportReply::Ok {
                next: next.flatten(),
            }),
            "refused" => Ok(ReportReply::Refused(error(kind, message)?)),
            "retry" => Ok(ReportReply::Retry(error(kind, message)?)),
            other => Err(de::Error::unknown_variant(other, REPLIES)),
        }
    }
}

impl<'de> Deserialize<'de> for ReportReply {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        deserializer.deserialize_map(ReplyVisitor)
    }
}

/// The fields of a dispatch: its session and its assignment's.
#[derive(Deserialize)]
#[serde(field_identifier, rename_all = "snake_case")]
enum TaskField {
    Session,
    TaskId,
    Attempt,
    Kind,
    Target,
    Description,
    Attachments,
    Inputs,
    Answer,
    ContextRef,
    Context,
    #[serde(other)]
    Unknown,
}

struct TaskVisitor;

impl<'de> Visitor<'de> for TaskVisitor {
    type Value = TaskMessage;

    fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
        f.write_str("a dispatch (a JSON object)")
    }

    fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<TaskMessage, A::Error> {
        let mut session = None;
        let mut task_id = None;
        let mut attempt = None;
        let mut kind = None;
        let mut target = None;
        let mut description = None;
        let mut attachments = None;
        let mut inputs = None;
        let mut answer: Option<Option<String>> = None;
        let mut context_ref = None;
        let mut context: Option<Option<DispatchContext>> = None;
        while let Some(field) = map.next_key::<TaskField>()? {
            match field {
                TaskField::Session => once(&mut session, map.next_value()?, "session")?,
                TaskField::TaskId => once(&mut task_id, map.next_value()?, "task_id")?,
                TaskField::Attempt => once(&mut attempt, map.next_value()?, "attempt")?,
                TaskField::Kind => once(&mut kind, map.next_value()?, "kind")?,
                TaskField::Target => once(&mut target, map.next_value()?, "target")?,
                TaskField::Description => {
                    once(&mut description, map.next_value()?, "description")?;
                }
                TaskField::Attachments => {
                    once(&mut attachments, map.next_value()?, "attachments")?;
                }
                TaskField::Inputs => once(&mut inputs, map.next_value()?, "inputs")?,
                TaskField::Answer => once(&mut answer, map.next_value()?, "answer")?,
                TaskField::ContextRef => {
                    once(&mut context_ref, map.next_value()?, "context_ref")?;
                }
                TaskField::Context => once(&mut context, map.next_value()?, "context")?,
                TaskField::Unknown => {
                    map.next_value::<IgnoredAny>()?;
                }
            }
        }
        fn required<T, E: de::Error>(value: Option<T>, name: &'static str) -> Result<T, E> {
            value.ok_or_else(|| E::missing_field(name))
        }
        Ok(TaskMessage {
            session: required(session, "session")?,
            assignment: TaskAssignment {
                task_id: required(task_id, "task_id")?,
                attempt: required(attempt, "attempt")?,
                kind: required(kind, "kind")?,
                target: required(target, "target")?,
                description: required(description, "description")?,
                attachments: required(attachments, "attachments")?,
                inputs: required(inputs, "inputs")?,
                answer: answer.flatten(),
                context_ref: context_ref.unwrap_or_default(),
                context: context.flatten(),
            },
        })
    }
}

impl<'de> Deserialize<'de> for TaskMessage {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        deserializer.deserialize_map(TaskVisitor)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    /// The derived reading these decoders replace, kept here as the reference.
    #[derive(Deserialize, Debug, PartialEq)]
    struct DerivedReport {
        #[serde(flatten)]
        event: ExecutorEvent,
        #[serde(default)]
        lease: Option<String>,
        #[serde(default, deserialize_with = "derived_next")]
        next: Option<NextRequest>,
    }

    fn derived_next<'de, D: Deserializer<'de>>(d: D) -> Result<Option<NextRequest>, D::Error> {
        Ok(lenient_next_value(serde_json::Value::deserialize(d)?))
    }

    #[derive(Deserialize, Debug, PartialEq)]
    #[serde(tag = "status", rename_all = "snake_case")]
    enum DerivedReply {
        Ok {
            #[serde(default)]
            next: Option<Box<NextTask>>,
        },
        Refused(ErrorBody),
        Retry(ErrorBody),
    }

    fn reports() -> Vec<serde_json::Value> {
        let next = json!({"serves": ["planner.task.>"], "claim_id": "0123456789abcdef"});
        vec![
            json!({"task_id": "t1", "attempt": 1, "status": "started"}),
            json!({"status": "completed", "attempt": 2, "task_id": "t1", "output": "done"}),
            json!({"task_id": "t1", "attempt": 1, "status": "completed", "output": "x", "tokens_used": 12}),
            json!({"task_id": "t1", "attempt": 1, "status": "completed", "output": "x", "tokens_used": null}),
            json!({"task_id": "t1", "attempt": 1, "status": "completed", "output": "x", "error": null, "question": 5}),
            json!({"task_id": "t1", "attempt": 1, "status": "completed", "output": "x", "lease": "l", "next": next}),
            json!({"task_id": "t1", "attempt": 1, "status": "completed", "output": "x", "next": {"serves": 5}}),
            json!({"task_id": "t1", "attempt": 1, "status": "completed", "output": "x", "next": null, "lease": null}),
            json!({"task_id": "t1", "attempt": 1, "status": "completed", "output": "x", "mine": {"a": [1, 2]}}),
            json!({"task_id": "t1", "attempt": 1, "status": "failed", "error": "boom"}),
            json!({"task_id": "t1", "attempt": 1, "status": "failed", "error": "boom", "retryable": false, "tokens_used": 3}),
            json!({"task_id": "t1", "attempt": 1, "status": "failed", "error": "boom", "retryable": null}),
            json!({"task_id": "t1", "attempt": 1, "status": "needs_clarification", "question": "which?"}),
            // What users send: any script, escapes, and an output near a report's size limit.
            json!({"task_id": "t1", "attempt": 1, "status": "completed", "output": "完成 ✓ — Ünïcödé \"quoted\" \n\u{1F600}"}),
            json!({"task_id": "задача-1", "attempt": 1, "status": "needs_clarification", "question": "¿Cuál? どれ？"}),
            json!({"task_id": "t1", "attempt": 1, "status": "completed", "output": "é".repeat(120_000)}),
            json!({"task_id": "t1", "attempt": 1, "status": "needs_clarification"}),
            json!({"task_id": "t1", "attempt": 1, "status": "completed"}),
            json!({"task_id": "t1", "attempt": 1, "status": "completed", "output": 5}),
            json!({"task_id": "t1", "attempt": 1, "status": "done", "output": "x"}),
            json!({"task_id": "t1", "attempt": 1, "status": 3}),
            json!({"task_id": "t1", "attempt": 1}),
            json!({"task_id": "t1", "status": "started"}),
            json!({"attempt": 1, "status": "started"}),
            json!({"task_id": "t1", "attempt": -1, "status": "started"}),
            json!({"task_id": "t1", "attempt": "1", "status": "started"}),
            json!({"task_id": 7, "attempt": 1, "status": "started"}),
            json!({"task_id": "t1", "attempt": 1, "status": "started", "lease": 4}),
            json!([1, 2]),
            json!("report"),
            json!(null),
            json!({}),
        ]
    }

    #[test]
    fn a_report_reads_as_the_derived_code_reads_it() {
        let (mut read, mut refused) = (0, 0);
        for report in reports() {
            let text = report.to_string();
            let fast = serde_json::from_str::<ReportMessage>(&text);
            let derived = serde_json::from_str::<DerivedReport>(&text);
            match (fast, derived) {
                (Ok(fast), Ok(derived)) => {
                    assert_eq!(fast.event, derived.event, "{text}");
                    assert_eq!(fast.lease, derived.lease, "{text}");
                    assert_eq!(fast.next, derived.next, "{text}");
                    read += 1;
                }
                (Err(_), Err(_)) => refused += 1,
                (fast, derived) => panic!("{text}: decoded {fast:?}, derived {derived:?}"),
            }
        }
        assert_eq!((read, refused), (15, 17));
    }

    #[test]
    fn a_field_twice_is_refused_only_when_the_tag_reads_it() {
        let reports = [
            (
                r#"{"task_id":"t","attempt":1,"status":"started","error":"a","error":"b"}"#,
                true,
            ),
            (
                r#"{"task_id":"t","attempt":1,"status":"failed","error":"a","error":"b"}"#,
                false,
            ),
            (
                r#"{"task_id":"t","attempt":1,"status":"completed","output":"x","question":1,"question":2}"#,
                true,
            ),
            (
                r#"{"task_id":"t","attempt":1,"status":"completed","output":"x","output":"y"}"#,
                false,
            ),
        ];
        for (text, read) in reports {
            assert_eq!(
                serde_json::from_str::<ReportMessage>(text).is_ok(),
                read,
                "{text}"
            );
            assert_eq!(
                serde_json::from_str::<DerivedReport>(text).is_ok(),
                read,
                "{text}"
            );
        }
        let replies = [
            (r#"{"status":"ok","kind":"busy","kind":"busy"}"#, true),
            (
                r#"{"status":"retry","kind":"busy","kind":"busy","message":"m"}"#,
                false,
            ),
        ];
        for (text, read) in replies {
            assert_eq!(
                serde_json::from_str::<ReportReply>(text).is_ok(),
                read,
                "{text}"
            );
            assert_eq!(
                serde_json::from_str::<DerivedReply>(text).is_ok(),
                read,
                "{text}"
            );
        }
    }

    /// The differences the module's documentation names, held to it.
    #[test]
    fn what_only_the_derived_code_took_is_refused() {
        let numbered = r#"{"task_id":"t","attempt":1,"status":1,"output":"x"}"#;
        assert!(serde_json::from_str::<DerivedReport>(numbered).is_ok());
        assert!(serde_json::from_str::<ReportMessage>(numbered).is_err());
        let listed = r#"["retry","busy","later"]"#;
        assert!(serde_json::from_str::<DerivedReply>(listed).is_ok());
        assert!(serde_json::from_str::<ReportReply>(listed).is_err());
        let bad_next = r#"{"status":"refused","kind":"busy","message":"m","next":3}"#;
        assert!(serde_json::from_str::<DerivedReply>(bad_next).is_ok());
        assert!(serde_json::from_str::<ReportReply>(bad_next).is_err());
    }

    #[test]
    fn a_report_names_what_is_wrong_with_it() {
        let error = |v: serde_json::Value| {
            serde_json::from_str::<ReportMessage>(&v.to_string())
                .unwrap_err()
                .to_string()
        };
        assert!(
            error(json!({"task_id": "t", "attempt": 1, "status": "completed"}))
                .contains("missing field `output`")
        );
        assert!(
            error(json!({"task_id": "t", "attempt": 1, "status": "done"}))
                .contains("unknown variant `done`")
        );
        assert!(error(json!({"task_id": "t", "attempt": 1})).contains("missing field `status`"));
        assert!(
            error(json!({"attempt": 1, "status": "started"})).contains("missing field `task_id`")
        );
        let twice = r#"{"task_id":"t","attempt":1,"status":"started","status":"failed"}"#;
        assert!(serde_json::from_str::<ReportMessage>(twice)
            .unwrap_err()
            .to_string()
            .contains("duplicate field `status`"));
    }

    #[derive(Deserialize, Debug, PartialEq)]
    struct DerivedTask {
        session: String,
        #[serde(flatten)]
        assignment: TaskAssignment,
    }

    #[test]
    fn a_dispatch_reads_as_the_derived_code_reads_it() {
        // Every field named, none defaulted: a field added to the assignment fails to build
        // here until the decoder reads it too.
        let full = TaskMessage {
            session: "s1".into(),
            assignment: TaskAssignment {
                task_id: TaskId::from("t1"),
                attempt: 2,
                kind: planner_core::NodeKind::ToolCall,
                target: "web_search".into(),
                description: "find \"it\" ✓".into(),
                attachments: vec![planner_core::Attachment {
                    name: "a.csv".into(),
                    uri: "file:///a.csv".into(),
                    media_type: Some("text/csv".into()),
                }],
                inputs: vec![planner_core::TaskOutput {
                    task_id: TaskId::from("t0"),
                    output: "out".into(),
                }],
                answer: Some("yes".into()),
                context_ref: "abc".into(),
                context: Some(DispatchContext {
                    request: "r".into(),
                    summary: Some("s".into()),
                    system_prompt: None,
                    profile: Default::default(),
                }),
            },
        };
        let mut full_json = serde_json::to_value(&full).unwrap();
        let mut cases = vec![full_json.clone()];
        for absent in [
            "answer",
            "context_ref",
            "context",
            "session",
            "kind",
            "inputs",
        ] {
            let mut without = full_json.clone();
            without.as_object_mut().unwrap().remove(absent);
            cases.push(without);
        }
        for (field, value) in [
            ("answer", json!(null)),
            ("context", json!(null)),
            ("context_ref", json!(null)),
            ("attempt", json!("2")),
            ("kind", json!("teleport")),
            ("mine", json!({"x": 1})),
        ] {
            let mut with = full_json.clone();
            with[field] = value;
            cases.push(with);
        }
        full_json["context"]["summary"] = json!(null);
        cases.push(full_json);
        let (mut read, mut refused) = (0, 0);
        for case in cases {
            let text = case.to_string();
            match (
                serde_json::from_str::<TaskMessage>(&text),
                serde_json::from_str::<DerivedTask>(&text),
            ) {
                (Ok(fast), Ok(derived)) => {
                    assert_eq!(fast.session, derived.session, "{text}");
                    assert_eq!(fast.assignment, derived.assignment, "{text}");
                    read += 1;
                }
                (Err(_), Err(_)) => refused += 1,
                (fast, derived) => panic!("{text}: decoded {fast:?}, derived {derived:?}"),
            }
        }
        assert_eq!((read, refused), (8, 6));
        let round = serde_json::to_string(&full).unwrap();
        assert_eq!(serde_json::from_str::<TaskMessage>(&round).unwrap(), full);
    }

    #[test]
    fn a_reply_reads_as_the_derived_code_reads_it() {
        let task = json!({
            "session": "s1", "task_id": "t2", "attempt": 1, "kind": "processing", "target": "llm",
            "description": "d", "attachments": [], "inputs": [], "context_ref": "c1"
        });
        let next =
            json!({"task": task, "lease": "0123456789abcdef", "heartbeat_interval_ms": 1000});
        let replies = vec![
            json!({"status": "ok"}),
            json!({"status": "ok", "next": null}),
            json!({"next": next, "status": "ok"}),
            json!({"status": "ok", "next": next, "kind": 5}),
            json!({"status": "refused", "kind": "malformed", "message": "no"}),
            json!({"status": "retry", "kind": "busy", "message": "later", "extra": true}),
            json!({"status": "retry", "kind": "busy"}),
            json!({"status": "refused", "kind": "nonsense", "message": "no"}),
            json!({"status": "maybe"}),
            json!({"kind": "busy", "message": "later"}),
            json!({"status": "ok", "next": 3}),
            json!(null),
        ];
        let (mut read, mut refused) = (0, 0);
        for reply in replies {
            let text = reply.to_string();
            let fast = serde_json::from_str::<ReportReply>(&text);
            let derived = serde_json::from_str::<DerivedReply>(&text);
            match (fast, derived) {
                (Ok(ReportReply::Ok { next: a }), Ok(DerivedReply::Ok { next: b })) => {
                    assert_eq!(a, b, "{text}");
                    read += 1;
                }
                (Ok(ReportReply::Refused(a)), Ok(DerivedReply::Refused(b)))
                | (Ok(ReportReply::Retry(a)), Ok(DerivedReply::Retry(b))) => {
                    assert_eq!(a, b, "{text}");
                    read += 1;
                }
                (Err(_), Err(_)) => refused += 1,
                (fast, derived) => panic!("{text}: decoded {fast:?}, derived {derived:?}"),
            }
        }
        assert_eq!((read, refused), (6, 6));
    }
}
