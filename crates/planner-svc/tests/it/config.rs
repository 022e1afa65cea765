//! Loading the configuration.

use planner_svc::config::{Config, StoreKind};

fn env(pairs: &[(&str, &str)]) -> Vec<(String, String)> {
    pairs
        .iter()
        .map(|(k, v)| ((*k).to_owned(), (*v).to_owned()))
        .collect()
}

#[test]
fn the_shipped_config_file_parses_and_equals_the_defaults() {
    let path = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../../config/planner.toml");
    let config = Config::load(Some(&path), env(&[]), &[]).unwrap();
    assert_eq!(
        config,
        Config::default(),
        "config/planner.toml must document the defaults"
    );
}

#[test]
fn environment_and_flags_override_in_order() {
    let config = Config::load(
        None,
        env(&[
            ("PLANNER_NATS__URL", "nats://a:4222"),
            ("PLANNER_SESSIONS__MAX_LOADED", "7"),
            ("PLANNER_PLANNER__RETRY__MAX_ATTEMPTS", "9"),
            ("UNRELATED", "x"),
        ]),
        &[
            "sessions.max_loaded=8".to_owned(),
            "store.kind=\"file\"".to_owned(),
        ],
    )
    .unwrap();
    assert_eq!(config.nats.url, "nats://a:4222");
    assert_eq!(
        config.sessions.max_loaded, 8,
        "a flag wins over the environment"
    );
    assert_eq!(config.planner.retry.max_attempts, 9);
    assert_eq!(config.store.kind, StoreKind::File);
}

#[test]
fn problems_name_their_keys() {
    let err =
        Config::load(None, env(&[]), &["sessions.max_loaded=\"many\"".to_owned()]).unwrap_err();
    assert!(err.to_string().contains("max_loaded"), "{err}");
    let err = Config::load(
        None,
        env(&[]),
        &[
            "subjects.prefix=\"a b\"".to_owned(),
            "store.replicas=2".to_owned(),
            "planner.max_parallel=0".to_owned(),
        ],
    )
    .unwrap_err();
    assert_eq!(err.problems.len(), 3, "{err}");
    assert!(
        err.to_string().contains("store.replicas must be 1, 3 or 5"),
        "{err}"
    );
    assert!(err.to_string().contains("planner.max_parallel"), "{err}");
    // Unknown keys, a bad type and a bad value, all in one report.
    let err = Config::load(
        None,
        env(&[("PLANNER_NATS__BOGUS", "1")]),
        &["store.replicas=2".to_owned(), "nope.x=1".to_owned()],
    )
    .unwrap_err();
    assert!(
        err.problems
            .iter()
            .any(|p| p.contains("unknown key nats.bogus")),
        "{err}"
    );
    assert!(err.problems.iter().any(|p| p.contains("\"nope\"")), "{err}");
    assert!(
        err.problems.iter().any(|p| p.contains("store.replicas")),
        "{err}"
    );
    let err = Config::load(None, env(&[]), &["nats.user=\"me\"".to_owned()]).unwrap_err();
    assert!(err.to_string().contains("nats.password"), "{err}");
}

/// Loading stopped at the first value serde refused: with a bad store kind, a negative budget
/// and a zero parallelism, only the budget was reported.
#[test]
fn every_bad_value_is_reported_in_one_run() {
    let err = Config::load(
        None,
        env(&[]),
        &[
            "store.kind=postgres".to_owned(),
            "planner.token_budget=-5".to_owned(),
            "planner.max_parallel=0".to_owned(),
        ],
    )
    .unwrap_err();
    assert_eq!(err.problems.len(), 3, "{err}");
    for expected in [
        "store.kind",
        "postgres",
        "planner.token_budget",
        "-5",
        "planner.max_parallel must be at least 1",
    ] {
        assert!(err.to_string().contains(expected), "{expected}: {err}");
    }
}

/// A problem in an environment variable named the key as the file spells it, never the
/// variable the user has to change.
#[test]
fn problems_from_the_environment_name_the_variable() {
    let err = Config::load(
        None,
        env(&[
            ("PLANNER_PLANNER__TOKEN_BUDGET", "-5"),
            ("PLANNER_STORE__REPLICAS", "2"),
        ]),
        &[],
    )
    .unwrap_err();
    assert_eq!(err.problems.len(), 2, "{err}");
    assert!(
        err.problems
            .iter()
            .any(|p| p.contains("planner.token_budget")
                && p.contains("environment variable PLANNER_PLANNER__TOKEN_BUDGET")),
        "{err}"
    );
    assert!(
        err.problems.iter().any(|p| p.contains("store.replicas")
            && p.contains("environment variable PLANNER_STORE__REPLICAS")),
        "{err}"
    );
}

/// `log.level=verbose` was accepted (as a target name) and turned every log off.
#[test]
fn a_log_level_that_is_no_level_is_refused_with_the_valid_ones() {
    let err = Config::load(None, env(&[]), &["log.level=verbose".to_owned()]).unwrap_err();
    let text = err.to_string();
    assert!(
        text.contains("log.level") && text.contains("verbose"),
        "{text}"
    );
    for level in ["trace", "debug", "info", "warn", "error", "off"] {
        assert!(text.contains(level), "{level} missing: {text}");
    }
    for good in [
        "debug",
        "WARN",
        "planner_svc=debug,info",
        "info,async_nats=warn",
    ] {
        let config = Config::load(None, env(&[]), &[format!("log.level={good:?}")]);
        assert!(config.is_ok(), "{good}: {config:?}");
    }
}

/// A string setting given digits stays a string.
#[test]
fn a_string_setting_takes_a_value_that_looks_like_a_number() {
    let config = Config::load(None, env(&[("PLANNER_NATS__NAME", "1234")]), &[]).unwrap();
    assert_eq!(config.nats.name, "1234");
}

#[test]
fn the_cli_variable_naming_the_file_is_not_read_as_a_setting() {
    let config = Config::load(None, env(&[("PLANNER_CONFIG", "/etc/planner.toml")]), &[]);
    assert_eq!(config.map_err(|e| e.to_string()), Ok(Config::default()));
    // A variable that is neither a setting nor the CLI's is still refused, by name.
    let error = Config::load(None, env(&[("PLANNER_CONFIGG", "x")]), &[]).unwrap_err();
    assert!(error.to_string().contains("PLANNER_CONFIGG"), "{error}");
}

#[test]
fn the_otlp_endpoint_is_set_by_the_environment_or_a_flag_and_must_be_an_http_url() {
    let config = Config::load(
        None,
        env(&[("PLANNER_TRACING__OTLP_ENDPOINT", "http://collector:4318")]),
        &[],
    )
    .unwrap();
    assert_eq!(config.tracing.otlp_endpoint, "http://collector:4318");
    let config = Config::load(
        None,
        env(&[]),
        &["tracing.otlp_endpoint=\"https://traces.example:4318\"".to_owned()],
    )
    .unwrap();
    assert_eq!(config.tracing.otlp_endpoint, "https://traces.example:4318");
    let err = Config::load(
        None,
        env(&[("PLANNER_TRACING__OTLP_ENDPOINT", "collector:4318")]),
        &["tracing.service_name=\"\"".to_owned()],
    )
    .unwrap_err();
    assert!(
        err.problems
            .iter()
            .any(|p| p.contains("tracing.otlp_endpoint")
                && p.contains("PLANNER_TRACING__OTLP_ENDPOINT")),
        "{err}"
    );
    assert!(
        err.problems
            .iter()
            .any(|p| p.contains("tracing.service_name")),
        "{err}"
    );
}
