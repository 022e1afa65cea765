//! docs/protocol.md's examples decode as the types they claim to be: the doc cannot drift from
//! the code without this failing.

use planner_core::codec;
use planner_svc::protocol::{
    CancelMessage, ClaimRequest, ClientCommand, CommandReply, ErrorNotice, HeartbeatRequest,
    LeaseReply, OfferReply, QuarantineReply, QuarantineRequest, QuestionMessage, ReportMessage,
    ReportReply, TaskMessage,
};

#[test]
fn every_example_in_the_protocol_doc_decodes_as_its_type() {
    let doc = std::fs::read_to_string(concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/../../docs/protocol.md"
    ))
    .unwrap();
    let mut checked = std::collections::BTreeMap::<String, usize>::new();
    let mut lines = doc.lines();
    while let Some(line) = lines.next() {
        let Some(kind) = line.strip_prefix("```json ") else {
            continue;
        };
        let body: String = lines
            .by_ref()
            .take_while(|l| !l.starts_with("```"))
            .collect::<Vec<_>>()
            .join("\n");
        let result: Result<(), String> = match kind {
            "command" => serde_json::from_str::<ClientCommand>(&body)
                .map(drop)
                .map_err(|e| e.to_string()),
            "reply" => serde_json::from_str::<CommandReply>(&body)
                .map(drop)
                .map_err(|e| e.to_string()),
            "task" => serde_json::from_str::<TaskMessage>(&body)
                .map(drop)
                .map_err(|e| e.to_string()),
            "report" => serde_json::from_str::<ReportMessage>(&body)
                .map(drop)
                .map_err(|e| e.to_string()),
            "report_reply" => serde_json::from_str::<ReportReply>(&body)
                .map(drop)
                .map_err(|e| e.to_string()),
            "notice" => serde_json::from_str::<ErrorNotice>(&body)
                .map(drop)
                .map_err(|e| e.to_string()),
            "question" => serde_json::from_str::<QuestionMessage>(&body)
                .map(drop)
                .map_err(|e| e.to_string()),
            "cancel" => serde_json::from_str::<CancelMessage>(&body)
                .map(drop)
                .map_err(|e| e.to_string()),
            "claim" => serde_json::from_str::<ClaimRequest>(&body)
                .map(drop)
                .map_err(|e| e.to_string()),
            "heartbeat" => serde_json::from_str::<HeartbeatRequest>(&body)
                .map(drop)
                .map_err(|e| e.to_string()),
            "lease_reply" => serde_json::from_str::<LeaseReply>(&body)
                .map(drop)
                .map_err(|e| e.to_string()),
            "offer_reply" => serde_json::from_str::<OfferReply>(&body)
                .map(drop)
                .map_err(|e| e.to_string()),
            "quarantine_request" => serde_json::from_str::<QuarantineRequest>(&body)
                .map(drop)
                .map_err(|e| e.to_string()),
            "quarantine_reply" => serde_json::from_str::<QuarantineReply>(&body)
                .map(drop)
                .map_err(|e| e.to_string()),
            "batch" => codec::decode_batch(body.as_bytes())
                .map(drop)
                .map_err(|e| e.to_string()),
            other => Err(format!("unknown example type {other}")),
        };
        if let Err(e) = result {
            panic!("docs/protocol.md example `{kind}` does not decode: {e}\n{body}");
        }
        *checked.entry(kind.to_owned()).or_default() += 1;
    }
    for kind in [
        "command",
        "reply",
        "task",
        "report",
        "report_reply",
        "notice",
        "question",
        "cancel",
        "batch",
        "claim",
        "heartbeat",
        "lease_reply",
        "offer_reply",
        "quarantine_request",
        "quarantine_reply",
    ] {
        assert!(
            checked.contains_key(kind),
            "no `{kind}` example checked: {checked:?}"
        );
    }
}

/// docs/schemas/ holds the JSON Schemas generated from the Rust types; this fails when they
/// drift. Regenerate with `PLANNER_WRITE_SCHEMAS=1 cargo test -p planner-svc --test it schemas`.
#[test]
fn the_published_json_schemas_match_the_types() {
    let dir = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../../docs/schemas");
    let write = std::env::var_os("PLANNER_WRITE_SCHEMAS").is_some();
    if write {
        std::fs::create_dir_all(&dir).unwrap();
    }
    for (name, schema) in planner_svc::protocol::schemas() {
        let text = serde_json::to_string_pretty(&schema).unwrap() + "\n";
        let path = dir.join(name);
        if write {
            std::fs::write(&path, &text).unwrap();
        }
        let on_disk = std::fs::read_to_string(&path).unwrap_or_default();
        assert!(
            on_disk == text,
            "docs/schemas/{name} differs from the types; regenerate with PLANNER_WRITE_SCHEMAS=1 cargo test -p planner-svc --test it schemas"
        );
    }
}

/// docs/openapi.json is the OpenAPI document the HTTP API serves, generated from the types;
/// this fails when they drift. Regenerate with
/// `PLANNER_WRITE_SCHEMAS=1 cargo test -p planner-svc --test it openapi`.
#[test]
fn the_published_openapi_document_matches_the_types() {
    let path = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../../docs/openapi.json");
    let text =
        serde_json::to_string_pretty(&planner_svc::http::openapi::document()).unwrap() + "\n";
    if std::env::var_os("PLANNER_WRITE_SCHEMAS").is_some() {
        std::fs::write(&path, &text).unwrap();
    }
    let on_disk = std::fs::read_to_string(&path).unwrap_or_default();
    assert!(
        on_disk == text,
        "docs/openapi.json differs from the types; regenerate with PLANNER_WRITE_SCHEMAS=1 cargo test -p planner-svc --test it openapi"
    );
    // Every $ref resolves.
    let doc: serde_json::Value = serde_json::from_str(&text).unwrap();
    let mut refs = Vec::new();
    fn collect(value: &serde_json::Value, refs: &mut Vec<String>) {
        match value {
            serde_json::Value::Object(o) => {
                for (k, v) in o {
                    match (k.as_str(), v) {
                        ("$ref", serde_json::Value::String(r)) => refs.push(r.clone()),
                        _ => collect(v, refs),
                    }
                }
            }
            serde_json::Value::Array(a) => a.iter().for_each(|v| collect(v, refs)),
            _ => {}
        }
    }
    collect(&doc, &mut refs);
    assert!(!refs.is_empty());
    for r in refs {
        let pointer = r.strip_prefix('#').unwrap().replace("~1", "/");
        assert!(doc.pointer(&pointer).is_some(), "{r} does not resolve");
    }
    assert_eq!(
        doc.pointer(
            "/paths/~1api~1sessions/post/requestBody/content/application~1json/schema/$ref"
        )
        .and_then(|v| v.as_str()),
        Some("#/components/schemas/ClientCommand")
    );
}
