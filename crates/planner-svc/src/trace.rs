//! W3C trace context across the bus, and the spans that follow it.
//!
//! A `traceparent` header (`00-<trace id>-<span id>-<flags>`) on a command or a report is
//! carried, while the engine handles it, on every dispatch and question it publishes and on
//! the append of its events; a request without one starts a new trace. The daemon's log lines
//! for the request carry its `trace_id`.
//!
//! The context lives in a task-local set by the edge (`serve.rs`, `http/api.rs`) around the
//! handling ([`scope`]), so the core stays pure and the engine's signatures do not change: the
//! bus (`bus.rs`) and the driver read it when they publish and append. Work no message started
//! (a tick at a retry's backoff or a deadline, an LLM revision) runs in the trace of the
//! session's latest command (the engine remembers it, `Engine::handle`).
//!
//! When spans are exported (`otel.rs`), the edge's span is the child of the incoming context,
//! and what goes out carries the span that sent it (a dispatch's own span, the append's), so
//! the exported spans form one tree across the daemon and its executors. When they are not,
//! what goes out carries the same trace with a span id of its own.

use std::fmt;
use std::sync::atomic::{AtomicBool, Ordering};

use opentelemetry::trace::{
    SpanContext, SpanId, TraceContextExt as _, TraceFlags, TraceId, TraceState,
};
use tracing_opentelemetry::OpenTelemetrySpanExt as _;

/// The header name, as W3C Trace Context spells it.
pub const HEADER: &str = "traceparent";

static ENABLED: AtomicBool = AtomicBool::new(true);
static EXPORTING: AtomicBool = AtomicBool::new(false);

/// Turns propagation on or off for the process (`metrics.trace_context`).
pub fn set_enabled(enabled: bool) {
    ENABLED.store(enabled, Ordering::Relaxed);
}

/// Whether propagation is on.
pub fn enabled() -> bool {
    ENABLED.load(Ordering::Relaxed)
}

/// Says that spans are exported (the OpenTelemetry layer is installed): set once by `otel.rs`.
pub(crate) fn set_exporting() {
    EXPORTING.store(true, Ordering::Relaxed);
}

/// Whether spans are exported.
pub fn exporting() -> bool {
    EXPORTING.load(Ordering::Relaxed)
}

/// The context of a message with `headers`: theirs, or a new trace; `None` when propagation
/// is off.
pub fn context_of(headers: Option<&async_nats::HeaderMap>) -> Option<TraceParent> {
    enabled().then(|| TraceParent::from_headers(headers))
}

/// The context of an executor's message (a claim, a heartbeat, a report) with `headers`: the
/// one it carries (a new trace for an invalid one), or `None` when it carries none, so that the
/// engine handles it in the trace its attempt was dispatched in (`Engine::handle`): executors
/// carry the trace only for sampled traces. `None` too when propagation is off.
pub fn carried_by(headers: Option<&async_nats::HeaderMap>) -> Option<TraceParent> {
    let carried = headers.is_some_and(|h| h.get(HEADER).is_some());
    if carried {
        context_of(headers)
    } else {
        None
    }
}

/// The context of a request whose `traceparent` is `value` (an HTTP header, say): it, or a
/// new trace; `None` when propagation is off.
pub fn context_of_value(value: Option<&str>) -> Option<TraceParent> {
    enabled().then(|| {
        value
            .and_then(TraceParent::parse)
            .unwrap_or_else(TraceParent::new_root)
    })
}

tokio::task_local! {
    static CURRENT: Current;
}

/// What [`scope`] holds for the work in progress: its context, which an executor's message
/// without one gets later ([`adopt`]), and the span naming its trace id.
struct Current {
    context: std::cell::Cell<Option<TraceParent>>,
    span: tracing::Span,
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

/// The value of one hex digit (either case).
fn nibble(digit: u8) -> Option<u8> {
    match digit {
        b'0'..=b'9' => Some(digit - b'0'),
        b'a'..=b'f' => Some(digit - b'a' + 10),
        b'A'..=b'F' => Some(digit - b'A' + 10),
        _ => None,
    }
}

fn hex<const N: usize>(text: &str) -> Option<[u8; N]> {
    let digits = text.as_bytes();
    if digits.len() != N * 2 {
        return None;
    }
    let mut out = [0u8; N];
    for (byte, pair) in out.iter_mut().zip(digits.chunks_exact(2)) {
        let [high, low] = pair else { return None };
        *byte = nibble(*high)? << 4 | nibble(*low)?;
    }
    Some(out)
}

fn random<const N: usize>() -> [u8; N] {
    let mut out = [0u8; N];
    let bytes = uuid::Uuid::new_v4().into_bytes();
    out.copy_from_slice(&bytes[..N]);
    out
}

/// A trace id: two words of this thread's generator (seeded from the OS once, like
/// [`span_id`]). A `getrandom` system call per trace was 1% of the daemon's CPU (perf).
fn trace_id() -> [u8; 16] {
    let mut out = [0u8; 16];
    out[..8].copy_from_slice(&span_id());
    out[8..].copy_from_slice(&span_id());
    out
}

std::thread_local! {
    /// The state of this thread's span ids: seeded once from the OS, then SplitMix64.
    static SPAN_IDS: std::cell::Cell<u64> =
        std::cell::Cell::new(u64::from_le_bytes(random::<8>()));
}

/// A span id, not zero: a span id only has to be unique within its trace, so the ids of the
/// messages and appends of every command come from a fast generator seeded once per thread
/// rather than from the OS each time.
fn span_id() -> [u8; 8] {
    SPAN_IDS.with(|state| loop {
        let next = state.get().wrapping_add(0x9E37_79B9_7F4A_7C15);
        state.set(next);
        let mut z = next;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^= z >> 31;
        if z != 0 {
            return z.to_le_bytes();
        }
    })
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

    /// A new trace: sampled when spans are exported (this process records it), else not,
    /// as W3C defines the flag; an unsampled trace is carried only where it continues work
    /// (see [`sampled`]).
    pub fn new_root() -> Self {
        TraceParent {
            trace_id: trace_id(),
            span_id: span_id(),
            flags: u8::from(exporting()),
        }
    }

    /// Whether the trace is sampled (flags bit 0).
    pub fn is_sampled(&self) -> bool {
        self.flags & 1 == 1
    }

    /// The same trace with a new span id: what a message published in this context carries.
    pub fn child(&self) -> Self {
        TraceParent {
            span_id: span_id(),
            ..*self
        }
    }

    /// The trace id in hex, as logs show it.
    pub fn trace_id(&self) -> String {
        let mut out = String::with_capacity(32);
        push_hex(&mut out, &self.trace_id);
        out
    }

    /// The context in `headers`, or a new trace when they carry none (or an invalid one).
    pub fn from_headers(headers: Option<&async_nats::HeaderMap>) -> Self {
        headers
            .and_then(|h| h.get(HEADER))
            .and_then(|v| TraceParent::parse(v.as_str()))
            .unwrap_or_else(TraceParent::new_root)
    }

    /// The context of an OpenTelemetry span; `None` for an invalid one (no span).
    pub fn of_span(context: &SpanContext) -> Option<Self> {
        context.is_valid().then(|| TraceParent {
            trace_id: context.trace_id().to_bytes(),
            span_id: context.span_id().to_bytes(),
            flags: context.trace_flags().to_u8(),
        })
    }

    /// As the remote parent of the spans started under it.
    pub fn as_parent(&self) -> opentelemetry::Context {
        opentelemetry::Context::new().with_remote_span_context(SpanContext::new(
            TraceId::from_bytes(self.trace_id),
            SpanId::from_bytes(self.span_id),
            TraceFlags::new(self.flags),
            true,
            TraceState::default(),
        ))
    }
}

/// Appends `bytes` as lowercase hex. Every message and append of a traced request formats a
/// `traceparent`: a `format!` per byte (24 allocations each) was a few percent of the
/// daemon's CPU at saturation (perf, 1,000 sessions).
fn push_hex(out: &mut String, bytes: &[u8]) {
    const DIGITS: &[u8; 16] = b"0123456789abcdef";
    for byte in bytes {
        out.push(char::from(DIGITS[usize::from(byte >> 4)]));
        out.push(char::from(DIGITS[usize::from(byte & 0x0f)]));
    }
}

impl fmt::Display for TraceParent {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let mut out = String::with_capacity(55);
        out.push_str("00-");
        push_hex(&mut out, &self.trace_id);
        out.push('-');
        push_hex(&mut out, &self.span_id);
        out.push('-');
        push_hex(&mut out, &[self.flags]);
        f.write_str(&out)
    }
}

/// Whether `value` is a valid `traceparent` of a sampled trace: what a claim or a heartbeat
/// carries on (an executor's lease-keeping requests decide no work, and the planner files one
/// without a trace under its session's latest; the trace id in every log line is the same).
pub fn sampled(value: &str) -> bool {
    TraceParent::parse(value).is_some_and(|parsed| parsed.is_sampled())
}

/// Where a piece of work entered the daemon: names the span [`scope`] opens for it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Edge {
    /// A client command (`{p}.cmd.<session>`, or the HTTP API).
    Command,
    /// An executor's claim.
    Claim,
    /// An executor's heartbeat.
    Heartbeat,
    /// An executor's report (`{p}.report.<session>` from the stream, or `{p}.result.<session>`
    /// sent directly).
    Report,
    /// Work the daemon started itself: a tick, a revision, a summary, recovery.
    Internal,
}

impl Edge {
    /// The span's name in an exported trace.
    pub fn name(self) -> &'static str {
        match self {
            Edge::Command => "receive command",
            Edge::Claim => "receive claim",
            Edge::Heartbeat => "receive heartbeat",
            Edge::Report => "process report",
            Edge::Internal => "internal",
        }
    }

    /// The span's kind in an exported trace.
    fn kind(self) -> &'static str {
        match self {
            Edge::Command | Edge::Claim | Edge::Heartbeat => "server",
            Edge::Report => "consumer",
            Edge::Internal => "internal",
        }
    }
}

/// Runs `work` with `context` as the current trace, inside a span naming its trace id.
/// Exported, that span is the child of `context`, named after `edge`.
///
/// Without a context (an executor's message that carries none, [`carried_by`]) the work runs
/// with the context pending: the engine adopts the trace the attempt was dispatched in once it
/// holds the session ([`adopt`]), without wrapping the handling in a scope of its own (moving
/// that large future was 3% of the daemon's CPU). With propagation off, just `work`.
pub async fn scope<F: std::future::Future>(
    context: Option<TraceParent>,
    edge: Edge,
    work: F,
) -> F::Output {
    use tracing::Instrument as _;
    if !enabled() {
        return work.await;
    }
    let span = match context {
        Some(context) if exporting() => {
            let span = tracing::info_span!(
                "trace",
                trace_id = %context.trace_id(),
                otel.name = edge.name(),
                otel.kind = edge.kind(),
            );
            // Only fails for a span no layer records: then nothing is exported anyway.
            let _ = span.set_parent(context.as_parent());
            span
        }
        Some(context) => tracing::info_span!("trace", trace_id = %context.trace_id()),
        // Exported, a span of a trace not yet known would be a root of its own: the engine
        // opens the edge's span when it knows the trace (`Engine::handle`).
        None if exporting() => tracing::Span::none(),
        None => tracing::info_span!("trace", trace_id = tracing::field::Empty),
    };
    let current = Current {
        context: std::cell::Cell::new(context),
        span: span.clone(),
    };
    CURRENT.scope(current, work.instrument(span)).await
}

/// The trace context of the work in progress, as the edge set it (or the engine adopted it);
/// `None` outside [`scope`] or while pending.
pub fn current() -> Option<TraceParent> {
    CURRENT
        .try_with(|current| current.context.get())
        .ok()
        .flatten()
}

/// Whether the work in progress runs in a [`scope`] whose context is pending, which
/// [`adopt`] can set: an executor's message without a trace, while spans are not exported.
pub fn pending() -> bool {
    !exporting()
        && CURRENT
            .try_with(|current| current.context.get().is_none())
            .unwrap_or(false)
}

/// Makes `context` the pending context of the work in progress (see [`pending`]), and names
/// its trace id on the edge's span; false when there is none pending.
pub fn adopt(context: TraceParent) -> bool {
    pending()
        && CURRENT
            .try_with(|current| {
                current.context.set(Some(context));
                if !current.span.is_disabled() {
                    current
                        .span
                        .record("trace_id", tracing::field::display(context.trace_id()));
                }
            })
            .is_ok()
}

/// What a message sent or an append made from inside `span` carries: `span`'s own context
/// when spans are exported (the receiver's spans become its children), else the current
/// trace with a span id of its own; `None` outside a trace or with propagation off.
pub fn outgoing_from(span: &tracing::Span) -> Option<String> {
    if !enabled() {
        return None;
    }
    if exporting() {
        let context = span.context();
        if let Some(own) = TraceParent::of_span(context.span().span_context()) {
            return Some(own.to_string());
        }
    }
    current().map(|current| current.child().to_string())
}

/// The `traceparent` for a message published now: see [`outgoing_from`], for the current
/// span.
pub fn outgoing() -> Option<String> {
    outgoing_from(&tracing::Span::current())
}

/// The context of the work in progress, for later work to continue it (the session's latest
/// command, remembered for its ticks): the current span's when spans are exported, else the
/// edge's.
pub fn here() -> Option<TraceParent> {
    if !enabled() {
        return None;
    }
    if exporting() {
        let context = tracing::Span::current().context();
        if let Some(own) = TraceParent::of_span(context.span().span_context()) {
            return Some(own);
        }
    }
    current()
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
        let ids: std::collections::BTreeSet<[u8; 8]> = (0..10_000).map(|_| span_id()).collect();
        assert_eq!(ids.len(), 10_000);
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

    #[tokio::test]
    async fn an_executors_message_without_a_trace_adopts_one_once_inside_its_scope() {
        let dispatched =
            TraceParent::parse("00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-00").unwrap();
        // Outside any scope: nothing pending, nothing adopted.
        assert!(!pending());
        assert!(!adopt(dispatched));
        // An executor's message that carries none: pending until the engine adopts one.
        scope(carried_by(None), Edge::Claim, async {
            assert!(pending());
            assert_eq!(current(), None);
            assert!(adopt(dispatched));
            assert_eq!(current(), Some(dispatched));
            assert!(!pending());
            let other = TraceParent::new_root();
            assert!(!adopt(other), "adopted once");
            assert_eq!(current(), Some(dispatched));
            // What goes out carries its trace.
            let out = TraceParent::parse(&outgoing().unwrap()).unwrap();
            assert_eq!(out.trace_id, dispatched.trace_id);
        })
        .await;
        // One that carries its own is not pending.
        let mut headers = async_nats::HeaderMap::new();
        headers.insert(
            HEADER,
            "00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-00",
        );
        scope(carried_by(Some(&headers)), Edge::Claim, async {
            assert!(!pending());
            assert_eq!(
                current().map(|c| c.trace_id()).as_deref(),
                Some("0af7651916cd43dd8448eb211c80319c")
            );
        })
        .await;
        // New traces do not repeat, and are unsampled while nothing is exported.
        let roots: std::collections::BTreeSet<[u8; 16]> = (0..10_000)
            .map(|_| TraceParent::new_root().trace_id)
            .collect();
        assert_eq!(roots.len(), 10_000);
        assert!(!TraceParent::new_root().is_sampled());
    }
}
