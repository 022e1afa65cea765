//! What can be checked offline of deploy/: the nats-server config parses with the pinned
//! server and its roles work, the YAML parses, the daemon's config in k8s loads.

use std::process::Command;

use planner_testkit::NatsServer;

use crate::support;

fn repo(path: &str) -> std::path::PathBuf {
    std::path::Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("../..")
        .join(path)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_shipped_nats_config_starts_and_each_role_can_do_its_job() {
    let conf = repo("deploy/nats/nats-server.conf");
    // Ports and the store directory come from the test server's flags, as in docker-compose.
    let server = NatsServer::start_with_args(&["-c", conf.to_str().unwrap()]).unwrap();
    let connect = |user: &'static str, password: &'static str| {
        let url = server.url();
        async move {
            async_nats::ConnectOptions::with_user_and_password(user.into(), password.into())
                .connect(url)
                .await
                .unwrap()
        }
    };
    let planner = connect("planner", "change-me-planner").await;
    let ui = connect("ui", "change-me-ui").await;
    // The planner may serve commands; the UI may send them.
    let mut commands = planner.subscribe("planner.cmd.*").await.unwrap();
    planner.flush().await.unwrap();
    // Core NATS is at-most-once and the server may still be settling its accounts: retry.
    let mut received = false;
    for _ in 0..25 {
        ui.publish("planner.cmd.s1", "{}".into()).await.unwrap();
        ui.flush().await.unwrap();
        let next = futures::StreamExt::next(&mut commands);
        if let Ok(Some(_)) = tokio::time::timeout(std::time::Duration::from_millis(200), next).await
        {
            received = true;
            break;
        }
    }
    assert!(received, "the planner did not receive the UI's command");
    // A UI may not publish executor reports: the server refuses with a permissions error.
    let (restricted, mut events) =
        support::connect_watching(&server.url(), "ui", "change-me-ui").await;
    restricted
        .publish("planner.report.s1", "{}".into())
        .await
        .unwrap();
    restricted.flush().await.unwrap();
    support::refused(&mut events, "planner.report.s1").await;
}

#[test]
fn the_yaml_files_parse() {
    for file in [
        "docker-compose.yml",
        "deploy/k8s/planner-svc.yaml",
        "deploy/otel/collector.yaml",
    ] {
        let status = Command::new("python3")
            .args([
                "-c",
                "import sys, yaml; list(yaml.safe_load_all(open(sys.argv[1])))",
            ])
            .arg(repo(file))
            .status();
        match status {
            Ok(status) => assert!(status.success(), "{file} does not parse as YAML"),
            Err(e) => panic!("python3 is needed to check {file}: {e}"),
        }
    }
}

#[test]
fn the_nats_config_passes_the_servers_own_check() {
    let binary = std::env::var_os("NATS_SERVER_BIN").unwrap_or_else(|| "nats-server".into());
    let output = Command::new(binary)
        .args(["-t", "-c"])
        .arg(repo("deploy/nats/nats-server.conf"))
        .output()
        .unwrap();
    assert!(
        output.status.success(),
        "{}",
        String::from_utf8_lossy(&output.stderr)
    );
}
