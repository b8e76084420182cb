//! agentk's connection against an in-process kas stand-in over TLS: `--kas-header`
//! reaches kas on every stream, the certificate must name the host (or
//! `--kas-tls-server-name`), and `--kas-insecure-skip-tls-verify` accepts any.

use agentk::cluster::ClusterAccess;
use agentk::{ConnectOptions, Upstream};
use kas_proto::v1::agent_server::{Agent, AgentServer};
use kas_proto::v1::{AgentConfiguration, AgentFrame, ConfigAck, ServerFrame};
use kas_test_support::certs::LocalhostCert;
use std::pin::Pin;
use std::sync::{Arc, Mutex};
use std::time::Duration;
use tokio::sync::watch;
use tonic::{Request, Response, Status, Streaming};

type Stream<T> = Pin<Box<dyn futures::Stream<Item = Result<T, Status>> + Send>>;

/// Records the metadata of every stream and hands out one configuration.
#[derive(Default, Clone)]
struct FakeKas {
    seen: Arc<Mutex<Vec<tonic::metadata::MetadataMap>>>,
}

#[tonic::async_trait]
impl Agent for FakeKas {
    type ConfigureStream = Stream<AgentConfiguration>;
    type TunnelStream = Stream<ServerFrame>;

    async fn configure(
        &self,
        req: Request<Streaming<ConfigAck>>,
    ) -> Result<Response<Self::ConfigureStream>, Status> {
        self.seen.lock().expect("lock").push(req.metadata().clone());
        let first = AgentConfiguration {
            agent_id: 1,
            version: 1,
            ..Default::default()
        };
        let s = futures::stream::iter([Ok(first)]).chain(futures::stream::pending());
        Ok(Response::new(Box::pin(s)))
    }

    async fn tunnel(
        &self,
        req: Request<Streaming<AgentFrame>>,
    ) -> Result<Response<Self::TunnelStream>, Status> {
        self.seen.lock().expect("lock").push(req.metadata().clone());
        Ok(Response::new(Box::pin(futures::stream::pending())))
    }
}

use futures::StreamExt;

async fn fake_kas(tls: &LocalhostCert) -> (FakeKas, u16) {
    let kas = FakeKas::default();
    let l = tokio::net::TcpListener::bind("127.0.0.1:0")
        .await
        .expect("bind");
    let port = l.local_addr().expect("addr").port();
    let identity = tonic::transport::Identity::from_pem(&tls.cert, &tls.key);
    let server = tonic::transport::Server::builder()
        .tls_config(tonic::transport::ServerTlsConfig::new().identity(identity))
        .expect("tls")
        .add_service(AgentServer::new(kas.clone()));
    tokio::spawn(server.serve_with_incoming(tokio_stream::wrappers::TcpListenerStream::new(l)));
    (kas, port)
}

/// Runs agentk's connection with `opts` for a moment; the streams kas saw.
async fn connect(opts: ConnectOptions, kas: &FakeKas) -> usize {
    let config = kube::Config::new("http://127.0.0.1:9".parse().expect("uri"));
    let access = ClusterAccess::new(config).expect("access");
    let upstream = Arc::new(Upstream::new(access).expect("upstream"));
    let (config_tx, _) = watch::channel(None);
    let (stop_tx, stop_rx) = watch::channel(false);
    let run = tokio::spawn(agentk::run(opts, upstream, config_tx, stop_rx));
    let start = tokio::time::Instant::now();
    while start.elapsed() < Duration::from_secs(2) && kas.seen.lock().expect("lock").is_empty() {
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let _ = stop_tx.send(true);
    let _ = run.await;
    kas.seen.lock().expect("lock").len()
}

fn opts(port: u16, ca: Option<&str>) -> ConnectOptions {
    ConnectOptions {
        kas_addresses: vec![format!("grpcs://127.0.0.1:{port}")],
        token: "kasagent-test".into(),
        ca_cert_pem: ca.map(|c| c.as_bytes().to_vec()),
        min_idle_tunnels: 1,
        max_tunnels: 4,
        replica_id: "r1".into(),
        kas_headers: Vec::new(),
        tls_server_name: None,
        insecure_skip_tls_verify: false,
        proxy: Default::default(),
    }
}

#[tokio::test]
async fn kas_headers_reach_kas_on_every_stream() {
    let tls = LocalhostCert::generate();
    let (kas, port) = fake_kas(&tls).await;
    let mut o = opts(port, Some(&tls.ca));
    o.kas_headers = vec![(
        "x-gateway-token".parse().expect("key"),
        "abc123".parse().expect("value"),
    )];
    assert!(connect(o, &kas).await >= 1);
    for md in kas.seen.lock().expect("lock").iter() {
        assert_eq!(
            md.get("x-gateway-token").map(|v| v.to_str().ok()),
            Some(Some("abc123"))
        );
        assert!(md.get("authorization").is_some());
    }
}

#[tokio::test]
async fn the_certificate_must_name_kas_unless_verification_is_off() {
    let tls = LocalhostCert::generate();
    // The certificate names localhost and 127.0.0.1, not kas.example.com.
    let (kas, port) = fake_kas(&tls).await;
    let mut o = opts(port, Some(&tls.ca));
    o.tls_server_name = Some("kas.example.com".into());
    assert_eq!(
        connect(o, &kas).await,
        0,
        "a certificate for another name was accepted"
    );
    let mut o = opts(port, Some(&tls.ca));
    o.tls_server_name = Some("localhost".into());
    assert!(connect(o, &kas).await >= 1, "the server name was not used");
    // A private CA without --ca-cert is not trusted...
    let (kas, port) = fake_kas(&tls).await;
    assert_eq!(connect(opts(port, None), &kas).await, 0);
    // ...unless verification is off.
    let mut o = opts(port, None);
    o.insecure_skip_tls_verify = true;
    o.tls_server_name = Some("kas.example.com".into());
    assert!(connect(o, &kas).await >= 1);
}
