//! Start-up steps against JetStream, retried while the failure can pass and reported at once
//! when it cannot.
//!
//! A cluster that just formed (its meta leader elected a moment ago), a server restarting, or
//! several instances creating the same R3 streams at once answer with timeouts, "no
//! responders" and "cluster not available" for a while: reasons to wait (`nats.startup_wait_s`),
//! not to exit (under an orchestrator that is a crash loop). A stream that exists with another
//! configuration, a changed `ownership.partitions`, a replica count the cluster cannot hold, a
//! limit or a permission the server refuses fail the same way however long one waits: the
//! daemon says so at once, naming what to change.

use std::sync::{Arc, Mutex, PoisonError};
use std::time::Duration;

use crate::config::Config;

/// A start-up error only a change of configuration fixes (of the daemon, the server or the
/// stream), with what to change.
#[derive(Debug, thiserror::Error)]
#[error("{0}")]
pub struct Misconfigured(pub String);

/// The last publish the server refused this connection (`Permissions Violation for Publish to
/// "<subject>"`): a start-up request it refused is never answered, so the step only times out,
/// and this says why.
#[derive(Debug, Clone, Default)]
pub struct PublishDenials(Arc<Mutex<Option<String>>>);

impl PublishDenials {
    /// Records a refusal.
    pub fn record(&self, denial: &str) {
        *self.0.lock().unwrap_or_else(PoisonError::into_inner) = Some(denial.to_owned());
    }

    /// The refusal recorded since the last call, if any.
    pub fn take(&self) -> Option<String> {
        self.0.lock().unwrap_or_else(PoisonError::into_inner).take()
    }
}

/// JetStream API error codes that pass by waiting: the cluster or a stream's peers are not
/// ready yet (nats-server's `JSClusterNotAvail`, `JSClusterIncomplete`, `JSClusterNoPeers`,
/// `JSClusterNotActive`, `JSClusterNotAssigned`, `JSClusterNotLeader`, `JSRaftGeneral`,
/// `JSInsufficientResources` while peers join, `JSStreamOffline`, `JSConsumerOffline`).
const TRANSIENT_CODES: [u32; 10] = [
    10008, 10004, 10005, 10006, 10007, 10009, 10041, 10023, 10118, 10119,
];

/// The JetStream API error code in an error's text (`... (code 400, error code 10058)`).
fn api_error_code(text: &str) -> Option<u32> {
    let (_, after) = text.split_once("error code ")?;
    let digits: String = after.chars().take_while(char::is_ascii_digit).collect();
    digits.parse().ok()
}

/// What to change for a JetStream API error that waiting does not fix.
fn hint(code: u32) -> &'static str {
    match code {
        10074 => "the stream asks for more replicas than the server has (a single server holds 1): check store.replicas, dispatch.replicas, reports.replicas and ownership.replicas",
        10065 => "another stream already captures these subjects: check subjects.prefix and the stream names (store.stream_name, dispatch.stream_name, reports.stream_name, reports.dead_letter_stream)",
        10058 => "a stream of that name exists with another configuration: check the stream names (store.stream_name, dispatch.stream_name, reports.stream_name, reports.dead_letter_stream) or update the stream",
        10039 | 10076 => "JetStream is not enabled on the NATS server or for this account: start the server with JetStream (-js, or jetstream {} in its config)",
        10002 | 10027 | 10028 | 10047 | 10053 | 10113 | 10122 => "an account or server limit refuses it: check store.max_bytes and the JetStream limits of the server and the account",
        _ => "the server refuses it for good: check the settings of this step",
    }
}

/// `None` when `error` may pass by waiting; else why it will not, and what to change.
pub fn permanent(error: &anyhow::Error) -> Option<String> {
    for cause in error.chain() {
        if let Some(Misconfigured(why)) = cause.downcast_ref::<Misconfigured>() {
            return Some(why.clone());
        }
        if let Some(store @ planner_store::StoreError::UnsupportedServer { .. }) =
            cause.downcast_ref()
        {
            return Some(store.to_string());
        }
    }
    let text = crate::report(error);
    if text.to_lowercase().contains("permissions violation") {
        return Some(
            "the NATS server refused a request of the daemon's: allow it in the permissions of the daemon's NATS user (deploy/nats/nats-server.conf, user planner)".into(),
        );
    }
    let code = api_error_code(&text)?;
    (!TRANSIENT_CODES.contains(&code))
        .then(|| format!("{} (JetStream error code {code})", hint(code)))
}

/// Runs a start-up step until it succeeds, for up to `nats.startup_wait_s` with a growing delay
/// and a log line per failure, while its failure can pass (see the module docs). A failure that
/// cannot, or a publish the server refused meanwhile (`denials`), ends it at once, saying what
/// to change; what still fails once the wait is over is reported then.
pub async fn patiently<T, E, F, Fut>(
    config: &Config,
    denials: &PublishDenials,
    what: &str,
    mut step: F,
) -> anyhow::Result<T>
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = Result<T, E>>,
    E: Into<anyhow::Error>,
{
    let deadline = tokio::time::Instant::now() + Duration::from_secs(config.nats.startup_wait_s);
    let mut delay = Duration::from_millis(250);
    loop {
        let error = match step().await.map_err(Into::into) {
            Ok(value) => return Ok(value),
            Err(error) => error,
        };
        let refused = denials.take().map(|denial| {
            format!("the NATS server refused the daemon's request ({denial}): allow it in the permissions of the daemon's NATS user (deploy/nats/nats-server.conf, user planner)")
        });
        if let Some(why) = refused.or_else(|| permanent(&error)) {
            return Err(error.context(format!("{what} failed, and waiting will not help: {why}")));
        }
        if tokio::time::Instant::now() + delay >= deadline {
            return Err(error.context(format!(
                "{what} still failing after nats.startup_wait_s = {} s",
                config.nats.startup_wait_s
            )));
        }
        tracing::warn!(error = %crate::report(&error), retry_in = ?delay, "{what} failed; trying again");
        tokio::time::sleep(delay).await;
        delay = (delay * 2).min(Duration::from_secs(5));
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn class(text: &str) -> Option<String> {
        permanent(&anyhow::anyhow!(text.to_owned()).context("creating the reports stream"))
    }

    #[test]
    fn waiting_is_for_what_can_pass_and_the_rest_names_what_to_change() {
        // Transient: timeouts, no responders, a cluster not ready.
        for text in [
            "jetstream request timed out",
            "JetStream creating the event stream failed: jetstream unavailable",
            "no responders",
            "jetstream error: JetStream system temporarily unavailable (code 503, error code 10008)",
            "jetstream error: insufficient resources (code 503, error code 10023)",
            "jetstream error: stream is offline (code 500, error code 10118)",
        ] {
            assert_eq!(class(text), None, "{text}");
        }
        let replicas = class("jetstream error: replicas > 1 not supported in non-clustered mode (code 500, error code 10074)").unwrap();
        assert!(replicas.contains("store.replicas"), "{replicas}");
        assert!(replicas.contains("10074"), "{replicas}");
        let overlap =
            class("jetstream error: subjects overlap with an existing stream (code 400, error code 10065)")
                .unwrap();
        assert!(overlap.contains("subjects.prefix"), "{overlap}");
        assert!(class("jetstream error: something new (code 400, error code 10999)").is_some());
        let denied =
            class(r#"Permissions Violation for Publish to "$JS.API.STREAM.CREATE.X""#).unwrap();
        assert!(denied.contains("permissions"), "{denied}");
        let partitions = permanent(
            &anyhow::Error::new(Misconfigured("ownership.partitions must not change".into()))
                .context("creating the daemon's streams"),
        );
        assert_eq!(
            partitions.as_deref(),
            Some("ownership.partitions must not change")
        );
        assert_eq!(
            api_error_code("x (code 400, error code 10058)"),
            Some(10058)
        );
        assert_eq!(api_error_code("no code here"), None);
    }

    #[test]
    fn a_refusal_recorded_is_taken_once() {
        let denials = PublishDenials::default();
        assert_eq!(denials.take(), None);
        denials.record("Permissions Violation for Publish to \"$JS.API.INFO\"");
        assert!(denials.clone().take().is_some());
        assert_eq!(denials.take(), None);
    }
}
