//! A command whose caller gives up half way (an HTTP request past its time limit, a client
//! gone) leaves no planner ahead of the store: the session's next command is judged against
//! what was stored.

use std::sync::Arc;
use std::time::Duration;

use planner_core::{Planner, PlannerConfig};
use planner_store::EventStore;
use planner_svc::bus::ChannelPublisher;
use planner_svc::engine::{Engine, EngineConfig};

use crate::engine_support::{request, Gate, HeldStore};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_command_abandoned_during_its_append_leaves_no_planner_ahead_of_the_store() {
    let (open_appends, appends) = Gate::closed();
    let store = Arc::new(HeldStore::new(appends, Gate::open()));
    let (publisher, _bus) = ChannelPublisher::new();
    let (engine, _timers) = Engine::new(
        Arc::clone(&store),
        Arc::new(publisher),
        EngineConfig::default(),
    );
    // A request whose append is held; its caller gives up.
    let abandoned = tokio::time::timeout(
        Duration::from_millis(300),
        engine.handle("s", request("fetch the weather")),
    )
    .await;
    assert!(abandoned.is_err(), "the append was held, yet it returned");
    // Meanwhile another instance started the session: as many events as the abandoned
    // command decided, so that versions alone cannot tell the two apart.
    let decided = |input: &str| {
        Planner::with_config(PlannerConfig::default())
            .unwrap()
            .process(request(input))
            .unwrap()
    };
    let elsewhere = decided("fetch the news");
    assert_eq!(elsewhere.len(), decided("fetch the weather").len());
    store.inner.append("s", 0, &elsewhere).await.unwrap();
    open_appends.send(true).unwrap();

    let next = engine
        .handle("s", request("and then summarize it"))
        .await
        .unwrap();
    let stored = store.inner.load_all("s").await.unwrap();
    assert_eq!(next.version, stored.len() as u64);
    // The session as this instance holds it is the session as stored.
    let held = engine.read("s").await.unwrap();
    let folded = Planner::fold(&stored);
    assert_eq!(held.state(), folded.state());
    assert_eq!(
        folded.state().requests,
        ["fetch the news", "and then summarize it"]
    );
}
