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
