//! W3C trace context across the bus: a `traceparent` header (`00-<trace id>-<span id>-<flags>`)
//! on a command or a report is carried, while the engine handles it, on every dispatch and
//! question it publishes; a request without one starts a new trace. The daemon's log lines
//! for the request carry its `trace_id`.
//!
//! The context lives in a task-local set by the edge (`serve.rs`) around the handling, so the
//! core stays pure and the engine's signatures do not change: the bus (`bus.rs`) reads it when
//! it publishes. Each published message gets a child span id of its own.

use std::fmt;
use std::sync::atomic::{AtomicBool, Ordering};

/// The header name, as W3C Trace Context spells it.
pub const HEADER: &str = "traceparent";

static ENABLED: AtomicBool = AtomicBool::new(true);

/// Turns propagation on or off for the process (`metrics.trace_context`).
pub fn set_enabled(enabled: bool) {
    ENABLED.store(enabled, Ordering::Relaxed);
}

/// The context of a message with `headers`: theirs, or a new trace; `None` when propagation
/// is off.
pub fn context_of(headers: Option<&async_nats::HeaderMap>) -> Option<TraceParent> {
    ENABLED
        .load(Ordering::Relaxed)
        .then(|| TraceParent::from_headers(headers))
}

tokio::task_local! {
    static CURRENT: TraceParent;
}

/// One `traceparent` value.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct TraceParent {
    /// The trace: 16 bytes, not all zero.
    pub trace_id: [u8; 16],
    /// The parent span: 8 bytes, not all zero.
    pub span_id: [u8; 8],
    /// Trace flags (bit 0: sampled).
    pub flags: u8,
}

fn hex<const N: usize>(text: &str) -> Option<[u8; N]> {
    if text.len() != N * 2 || !text.bytes().all(|b| b.is_ascii_hexdigit()) {
        return None;
    }
    let mut out = [0u8; N];
    for (i, byte) in out.iter_mut().enumerate() {
        *byte = u8::from_str_radix(text.get(i * 2..i * 2 + 2)?, 16).ok()?;
    }
    Some(out)
}

fn random<const N: usize>() -> [u8; N] {
    let mut out = [0u8; N];
    let bytes = uuid::Uuid::new_v4().into_bytes();
    out.copy_from_slice(&bytes[..N]);
    out
}

impl TraceParent {
    /// Parses a `traceparent` value; `None` when it is not a valid version-00 one.
    pub fn parse(value: &str) -> Option<Self> {
        let mut parts = value.trim().split('-');
        let (version, trace, span, flags) =
            (parts.next()?, parts.next()?, parts.next()?, parts.next()?);
        if version != "00" || parts.next().is_some() {
            return None;
        }
        let trace_id = hex::<16>(trace)?;
        let span_id = hex::<8>(span)?;
        let [flags] = hex::<1>(flags)?;
        if trace_id == [0; 16] || span_id == [0; 8] {
            return None;
        }
        Some(TraceParent {
            trace_id,
            span_id,
            flags,
        })
    }

    /// A new trace (sampled).
    pub fn new_root() -> Self {
        TraceParent {
            trace_id: random(),
            span_id: random(),
            flags: 1,
        }
    }

    /// The same trace with a new span id: what a message published in this context carries.
    pub fn child(&self) -> Self {
        TraceParent {
            span_id: random(),
            ..*self
        }
    }

    /// The trace id in hex, as logs show it.
    pub fn trace_id(&self) -> String {
        self.trace_id.iter().map(|b| format!("{b:02x}")).collect()
    }

    /// The context in `headers`, or a new trace when they carry none (or an invalid one).
    pub fn from_headers(headers: Option<&async_nats::HeaderMap>) -> Self {
        headers
            .and_then(|h| h.get(HEADER))
            .and_then(|v| TraceParent::parse(v.as_str()))
            .unwrap_or_else(TraceParent::new_root)
    }
}

impl fmt::Display for TraceParent {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let span: String = self.span_id.iter().map(|b| format!("{b:02x}")).collect();
        write!(f, "00-{}-{span}-{:02x}", self.trace_id(), self.flags)
    }
}

/// Runs `work` with `context` as the current trace, inside a span naming its trace id (just
/// `work` when there is none).
pub async fn scope<F: std::future::Future>(context: Option<TraceParent>, work: F) -> F::Output {
    use tracing::Instrument as _;
    match context {
        Some(context) => {
            let span = tracing::info_span!("trace", trace_id = %context.trace_id());
            CURRENT.scope(context, work.instrument(span)).await
        }
        None => work.await,
    }
}

/// The `traceparent` for a message published now: a child of the current context, if any.
pub fn outgoing() -> Option<String> {
    CURRENT.try_with(|current| current.child().to_string()).ok()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_what_it_prints_and_refuses_what_w3c_refuses() {
        let value = "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01";
        let parsed = TraceParent::parse(value).unwrap();
        assert_eq!(parsed.to_string(), value);
        assert_eq!(parsed.trace_id(), "4bf92f3577b34da6a3ce929d0e0e4736");
        let child = parsed.child();
        assert_eq!(child.trace_id, parsed.trace_id);
        assert_ne!(child.span_id, parsed.span_id);
        for bad in [
            "",
            "01-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01",
            "00-00000000000000000000000000000000-00f067aa0ba902b7-01",
            "00-4bf92f3577b34da6a3ce929d0e0e4736-0000000000000000-01",
            "00-4bf92f3577b34da6a3ce929d0e0e473-00f067aa0ba902b7-01",
            "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01-x",
            "00-zzf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01",
        ] {
            assert_eq!(TraceParent::parse(bad), None, "{bad}");
        }
    }
}
