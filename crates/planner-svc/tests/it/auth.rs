//! Authentication and transport security as a NATS user expects them (#10 item 6): the daemon
//! and its client commands on a nats-server that requires TLS with client certificates, an
//! NKey, a token, a user and password, or (in operator/JWT mode) a `.creds` file, each set the
//! ways an operator sets them (file, env, `--set`); and a clear error, naming what is wrong,
//! without them.

use std::path::{Path, PathBuf};

use planner_svc::client::Client;
use planner_svc::config::Config;
use planner_svc::protocol::ClientCommand;
use planner_testkit::NatsServer;
use serde_json::json;

use crate::harness::{store_on, wait_for_end, Daemon, ExecutorBehaviour, Executors};

/// Starts nats-server with `conf` (written to `dir`) on top of the test server's flags.
fn server_with(dir: &Path, conf: &str) -> NatsServer {
    let path = dir.join("server.conf");
    std::fs::write(&path, conf).unwrap();
    NatsServer::start_with_args(&["-c", path.to_str().unwrap()]).unwrap()
}

/// A config for `server` loaded as an operator writes it: `settings` as `--set key=value`,
/// `env` as `PLANNER_*` variables.
fn load(server: &NatsServer, env: &[(&str, &str)], settings: &[String]) -> Config {
    let mut overrides = vec![
        format!("nats.url={}", server.url()),
        "nats.startup_wait_s=0".to_owned(),
        "nats.connect_timeout_ms=3000".to_owned(),
        "sessions.recovery_interval_s=1".to_owned(),
        "shutdown.grace_s=5".to_owned(),
    ];
    overrides.extend_from_slice(settings);
    let env = env.iter().map(|(k, v)| ((*k).to_owned(), (*v).to_owned()));
    Config::load(None, env, &overrides).unwrap()
}

/// The daemon serves with `config`, and a client connected the same way gets its command
/// answered.
async fn serves(config: Config) {
    let daemon = Daemon::start(config.clone()).await;
    let client = Client::connect(&config).await.unwrap();
    let command: ClientCommand =
        serde_json::from_value(json!({"type": "initialize", "input": "- fetch a.txt"})).unwrap();
    let (version, events) = client.command("s-auth", &command).await.unwrap();
    assert!(version > 0 && !events.is_empty());
    daemon.stop().await;
}

/// Why the daemon cannot start with `config`: its whole error chain, lower-cased.
async fn refused(config: Config) -> String {
    let result = tokio::time::timeout(
        std::time::Duration::from_secs(20),
        planner_svc::serve::serve(config, std::future::pending()),
    )
    .await
    .expect("serve gave up within 20 s");
    let error = result.expect_err("the daemon connected without the credentials it needs");
    format!("{error:#}").to_lowercase()
}

struct Pki {
    dir: tempfile::TempDir,
}

impl Pki {
    /// A CA, a server certificate for 127.0.0.1 and localhost, and a client certificate, all
    /// PEM files in a fresh directory.
    fn generate() -> Pki {
        use rcgen::{
            BasicConstraints, CertificateParams, DnType, ExtendedKeyUsagePurpose, IsCa, KeyPair,
        };
        let dir = tempfile::tempdir().unwrap();
        let ca_key = KeyPair::generate().unwrap();
        let mut ca_params = CertificateParams::new(Vec::<String>::new()).unwrap();
        ca_params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        ca_params
            .distinguished_name
            .push(DnType::CommonName, "planner test CA");
        let ca = ca_params.self_signed(&ca_key).unwrap();
        let leaf = |names: Vec<String>, purpose: ExtendedKeyUsagePurpose, file: &str| {
            let key = KeyPair::generate().unwrap();
            let mut params = CertificateParams::new(names).unwrap();
            params.distinguished_name.push(DnType::CommonName, file);
            params.extended_key_usages = vec![purpose];
            let cert = params.signed_by(&key, &ca, &ca_key).unwrap();
            std::fs::write(dir.path().join(format!("{file}.pem")), cert.pem()).unwrap();
            std::fs::write(
                dir.path().join(format!("{file}-key.pem")),
                key.serialize_pem(),
            )
            .unwrap();
        };
        leaf(
            vec!["127.0.0.1".into(), "localhost".into()],
            ExtendedKeyUsagePurpose::ServerAuth,
            "server",
        );
        leaf(
            vec!["planner".into()],
            ExtendedKeyUsagePurpose::ClientAuth,
            "client",
        );
        std::fs::write(dir.path().join("ca.pem"), ca.pem()).unwrap();
        Pki { dir }
    }

    fn file(&self, name: &str) -> PathBuf {
        self.dir.path().join(name)
    }

    fn set(&self, key: &str, name: &str) -> String {
        format!("{key}={}", self.file(name).display())
    }

    /// A server config requiring TLS and a client certificate signed by the CA.
    fn server_conf(&self) -> String {
        format!(
            "tls {{\n  cert_file: {:?}\n  key_file: {:?}\n  ca_file: {:?}\n  verify: true\n  timeout: 3\n}}\n",
            self.file("server.pem"),
            self.file("server-key.pem"),
            self.file("ca.pem"),
        )
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_daemon_serves_over_mutual_tls_with_the_configured_ca_and_client_certificate() {
    let pki = Pki::generate();
    let server = server_with(pki.dir.path(), &pki.server_conf());
    // The CA from the config file's key by `--set`, the client certificate by environment.
    let cert = pki.file("client.pem");
    let key = pki.file("client-key.pem");
    let config = load(
        &server,
        &[
            ("PLANNER_NATS__TLS_CERT_FILE", cert.to_str().unwrap()),
            ("PLANNER_NATS__TLS_KEY_FILE", key.to_str().unwrap()),
        ],
        &[
            pki.set("nats.tls_ca_file", "ca.pem"),
            "nats.tls_required=true".into(),
        ],
    );
    serves(config).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn without_the_ca_or_the_client_certificate_the_daemon_fails_naming_tls() {
    let pki = Pki::generate();
    let server = server_with(pki.dir.path(), &pki.server_conf());
    // The server's certificate is not trusted without the CA.
    let no_ca = load(
        &server,
        &[],
        &[
            pki.set("nats.tls_cert_file", "client.pem"),
            pki.set("nats.tls_key_file", "client-key.pem"),
        ],
    );
    let error = refused(no_ca).await;
    assert!(error.contains("tls with the nats server failed"), "{error}");
    assert!(error.contains("unknownissuer"), "{error}");
    // The server refuses a client without a certificate.
    let no_cert = load(&server, &[], &[pki.set("nats.tls_ca_file", "ca.pem")]);
    let error = refused(no_cert).await;
    assert!(error.contains("tls with the nats server failed"), "{error}");
    assert!(error.contains("certificaterequired"), "{error}");
    // A refusal is not an outage: the daemon says so at once instead of waiting for a server
    // that will refuse it again.
    let patient = load(
        &server,
        &[],
        &[
            pki.set("nats.tls_ca_file", "ca.pem"),
            "nats.startup_wait_s=30".into(),
        ],
    );
    let started = std::time::Instant::now();
    let error = refused(patient).await;
    assert!(error.contains("tls with the nats server failed"), "{error}");
    assert!(started.elapsed() < std::time::Duration::from_secs(10));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_daemon_authenticates_with_an_nkey_seed_file() {
    let dir = tempfile::tempdir().unwrap();
    let pair = nkeys::KeyPair::new_user();
    let seed = dir.path().join("planner.nk");
    std::fs::write(&seed, format!("{}\n", pair.seed().unwrap())).unwrap();
    let conf = format!(
        "authorization {{ users = [ {{ nkey: {:?} }} ] }}\n",
        pair.public_key()
    );
    let server = server_with(dir.path(), &conf);
    let with_seed = format!("nats.nkey_seed_file={}", seed.display());
    serves(load(&server, &[], &[with_seed])).await;
    // Another key is not the one the server knows.
    let other = dir.path().join("other.nk");
    std::fs::write(&other, nkeys::KeyPair::new_user().seed().unwrap()).unwrap();
    let error = refused(load(
        &server,
        &[("PLANNER_NATS__NKEY_SEED_FILE", other.to_str().unwrap())],
        &[],
    ))
    .await;
    assert!(error.contains("refused the credentials"), "{error}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_daemon_authenticates_with_a_token_or_a_user_and_password_from_the_environment() {
    let dir = tempfile::tempdir().unwrap();
    let token_server = server_with(dir.path(), "authorization { token: \"s3cret-token\" }\n");
    serves(load(
        &token_server,
        &[("PLANNER_NATS__TOKEN", "s3cret-token")],
        &[],
    ))
    .await;
    let error = refused(load(
        &token_server,
        &[("PLANNER_NATS__TOKEN", "wrong-token")],
        &[],
    ))
    .await;
    assert!(error.contains("refused the credentials"), "{error}");
    assert!(!error.contains("wrong-token"), "the token leaked: {error}");

    let dir = tempfile::tempdir().unwrap();
    let user_server = server_with(
        dir.path(),
        "authorization { user: planner, password: \"pa55 word#1\" }\n",
    );
    serves(load(
        &user_server,
        &[
            ("PLANNER_NATS__USER", "planner"),
            ("PLANNER_NATS__PASSWORD", "pa55 word#1"),
        ],
        &[],
    ))
    .await;
    let error = refused(load(
        &user_server,
        &[
            ("PLANNER_NATS__USER", "planner"),
            ("PLANNER_NATS__PASSWORD", "12345"),
        ],
        &[],
    ))
    .await;
    assert!(error.contains("refused the credentials"), "{error}");
}

/// NATS decentralised auth reduced to what a test needs: an operator, a system account, the
/// planner's account with JetStream, and users, as JWTs signed with their issuers' NKeys the
/// way nats-server verifies them (`ed25519-nkey`, base64url without padding).
struct Operator {
    operator: nkeys::KeyPair,
    system: nkeys::KeyPair,
    account: nkeys::KeyPair,
}

impl Operator {
    fn new() -> Operator {
        Operator {
            operator: nkeys::KeyPair::new_operator(),
            system: nkeys::KeyPair::new_account(),
            account: nkeys::KeyPair::new_account(),
        }
    }

    /// A JWT of `claims` (the `nats` object) about `subject`, signed by `issuer`.
    fn jwt(
        issuer: &nkeys::KeyPair,
        subject: &str,
        name: &str,
        claims: serde_json::Value,
    ) -> String {
        use base64::engine::general_purpose::URL_SAFE_NO_PAD;
        use base64::Engine as _;
        let part = |value: serde_json::Value| URL_SAFE_NO_PAD.encode(value.to_string());
        let issued = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .unwrap()
            .as_secs();
        let signed = format!(
            "{}.{}",
            part(json!({"typ": "JWT", "alg": "ed25519-nkey"})),
            part(json!({
                "jti": format!("{name}-{issued}"),
                "iat": issued,
                "iss": issuer.public_key(),
                "sub": subject,
                "name": name,
                "nats": claims,
            })),
        );
        let signature = issuer.sign(signed.as_bytes()).unwrap();
        format!("{signed}.{}", URL_SAFE_NO_PAD.encode(signature))
    }

    fn account_jwt(&self, account: &nkeys::KeyPair, name: &str, jetstream: bool) -> String {
        let storage = if jetstream { -1 } else { 0 };
        let limits = json!({
            "subs": -1, "data": -1, "payload": -1, "imports": -1, "exports": -1,
            "wildcards": true, "conn": -1, "leaf": -1,
            "mem_storage": storage, "disk_storage": storage, "streams": storage, "consumer": storage,
        });
        Self::jwt(
            &self.operator,
            &account.public_key(),
            name,
            json!({"type": "account", "version": 2, "limits": limits}),
        )
    }

    /// The server's config: this operator, its accounts preloaded into a memory resolver.
    fn server_conf(&self) -> String {
        let operator = Self::jwt(
            &self.operator,
            &self.operator.public_key(),
            "test-operator",
            json!({"type": "operator", "version": 2, "system_account": self.system.public_key()}),
        );
        format!(
            "operator: {operator:?}\nsystem_account: {system}\nresolver: MEMORY\nresolver_preload: {{\n  {system}: {sys_jwt:?}\n  {account}: {acc_jwt:?}\n}}\n",
            system = self.system.public_key(),
            account = self.account.public_key(),
            sys_jwt = self.account_jwt(&self.system, "SYS", false),
            acc_jwt = self.account_jwt(&self.account, "PLANNER", true),
        )
    }

    /// A `.creds` file (the user's JWT, signed by `account`, and its seed) written to `path`.
    fn creds(account: &nkeys::KeyPair, name: &str, path: &Path) {
        let user = nkeys::KeyPair::new_user();
        let jwt = Self::jwt(
            account,
            &user.public_key(),
            name,
            json!({"type": "user", "version": 2, "pub": {}, "sub": {}, "subs": -1, "data": -1, "payload": -1}),
        );
        let seed = user.seed().unwrap();
        let text = format!(
            "-----BEGIN NATS USER JWT-----\n{jwt}\n------END NATS USER JWT------\n\n\
             ************************* IMPORTANT *************************\n\
             NKEY Seed printed below can be used to sign and prove identity.\n\n\
             -----BEGIN USER NKEY SEED-----\n{seed}\n------END USER NKEY SEED------\n"
        );
        std::fs::write(path, text).unwrap();
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_daemon_serves_a_plan_to_its_end_with_a_creds_file_on_an_operator_mode_server() {
    let operator = Operator::new();
    let dir = tempfile::tempdir().unwrap();
    let server = server_with(dir.path(), &operator.server_conf());
    let creds = dir.path().join("planner.creds");
    Operator::creds(&operator.account, "planner", &creds);
    let config = load(
        &server,
        &[("PLANNER_NATS__CREDS_FILE", creds.to_str().unwrap())],
        &[],
    );
    let daemon = Daemon::start(config.clone()).await;
    let connect = || async {
        async_nats::ConnectOptions::with_credentials_file(&creds)
            .await
            .unwrap()
            .connect(server.url())
            .await
            .unwrap()
    };
    let _executors = Executors::start_on(connect().await, ExecutorBehaviour::default()).await;
    let client = Client::connect(&config).await.unwrap();
    let command: ClientCommand = serde_json::from_value(
        json!({"type": "initialize", "input": "- fetch a.txt\n- summarize it"}),
    )
    .unwrap();
    let (version, _) = client.command("s-creds", &command).await.unwrap();
    assert!(version > 0);
    let events = wait_for_end(&store_on(connect().await).await, "s-creds").await;
    assert!(
        events
            .iter()
            .any(|e| matches!(e, planner_core::Event::PlanCompleted { .. })),
        "{events:?}"
    );
    daemon.stop().await;

    // A user of an account the server does not know is refused, and the error says what to
    // check; a file that is no creds file names the file.
    let with_creds = |file: &Path| {
        load(
            &server,
            &[],
            &[format!("nats.creds_file={}", file.display())],
        )
    };
    let stranger = dir.path().join("stranger.creds");
    Operator::creds(&nkeys::KeyPair::new_account(), "stranger", &stranger);
    let error = refused(with_creds(&stranger)).await;
    assert!(error.contains("refused the credentials"), "{error}");
    assert!(error.contains("nats.creds_file"), "{error}");
    let garbage = dir.path().join("garbage.creds");
    std::fs::write(&garbage, "not a creds file\n").unwrap();
    let error = refused(with_creds(&garbage)).await;
    assert!(error.contains("garbage.creds"), "{error}");
}
