//! The JetStream store against a real nats-server: restarts, duplicates, bad snapshots.

use planner_store::*;
use planner_testkit::NatsServer;

use crate::support::events;

async fn connect(server: &NatsServer) -> JetStreamStore {
    let client = async_nats::ConnectOptions::new()
        .retry_on_initial_connect()
        .connect(server.url())
        .await
        .unwrap();
    JetStreamStore::connect(client, JetStreamConfig::default())
        .await
        .unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn no_acknowledged_event_is_lost_when_the_server_is_killed_and_restarted() {
    let mut server = NatsServer::start().unwrap();
    let store = connect(&server).await;
    let mut acknowledged = Vec::new();
    for i in 0..50 {
        let batch = events(3, &format!("k{i}_"));
        store
            .append("survivor", acknowledged.len() as u64, &batch)
            .await
            .unwrap();
        acknowledged.extend(batch);
    }
    drop(store);
    server.kill();
    server.restart().unwrap();
    let store = connect(&server).await;
    assert_eq!(store.load_all("survivor").await.unwrap(), acknowledged);
    // And appends go on where they stopped.
    let next = events(1, "after");
    assert_eq!(store.append("survivor", 150, &next).await.unwrap(), 151);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_retried_append_is_deduplicated_and_a_different_one_conflicts() {
    let server = NatsServer::start().unwrap();
    let first = connect(&server).await;
    let retrying = connect(&server).await;
    let stale = connect(&server).await;
    // Both learn that the session is empty, as an instance does before its append.
    assert_eq!(retrying.version("dup").await.unwrap(), 0);
    assert_eq!(stale.version("dup").await.unwrap(), 0);
    let batch = events(2, "x");
    assert_eq!(first.append("dup", 0, &batch).await.unwrap(), 2);
    // The same batch sent again at the same position (an append whose ack was lost, retried):
    // the store recognises its batch as the session's last message and nothing is stored twice.
    assert_eq!(retrying.append("dup", 0, &batch).await.unwrap(), 2);
    assert_eq!(first.load_all("dup").await.unwrap(), batch);
    // A different batch from an instance that has not seen the append is refused by the
    // server's sequence check: a conflict, not an overwrite.
    let err = stale.append("dup", 0, &events(1, "y")).await.unwrap_err();
    assert!(
        matches!(
            err,
            StoreError::Conflict {
                expected: 0,
                actual: 2,
                ..
            }
        ),
        "{err}"
    );
    assert_eq!(first.load_all("dup").await.unwrap(), batch);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_undecodable_snapshot_is_ignored() {
    let server = NatsServer::start().unwrap();
    let store = connect(&server).await;
    store.append("s", 0, &events(3, "a")).await.unwrap();
    let client = async_nats::connect(server.url()).await.unwrap();
    let bucket = async_nats::jetstream::new(client)
        .get_object_store("planner_snapshots")
        .await
        .unwrap();
    bucket.put("s", &mut &b"not a snapshot"[..]).await.unwrap();
    assert_eq!(store.load_snapshot("s").await.unwrap(), None);
    assert_eq!(load_planner(&store, "s").await.unwrap().version(), 3);
}
