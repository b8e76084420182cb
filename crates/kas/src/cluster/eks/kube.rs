//! The new cluster's API, called directly: kas holds its credentials (an EKS token
//! from the assumed role) only while it configures the cluster and installs agentk.
//! The calls go through the client library all the same, over a transport that sends
//! them to the cluster, so its rules hold: no redirects, error codes only, a timeout
//! per call, every call logged to the `k8s_integration` target.

use super::EksOptions;
use crate::cluster::{CallError, Clusters};
use base64::Engine;
use bytes::Bytes;
use http::{Request, Response};
use http_body_util::{BodyExt, Full};
use hyper_util::client::legacy::{connect::HttpConnector, Client};
use hyper_util::rt::TokioExecutor;
use kas_client::{BoxError, ResponseBody, Transport};
use kas_controlplane::{ControlPlane, EksWork, Error as CpError};
use serde_json::json;
use std::sync::Arc;
use std::time::Duration;

/// The client library's calls, sent to one cluster's API with a bearer token.
struct Direct {
    http: Client<hyper_rustls::HttpsConnector<HttpConnector>, Full<Bytes>>,
    endpoint: String,
    token: http::HeaderValue,
}

impl Transport for Direct {
    fn send(
        &self,
        mut req: Request<Full<Bytes>>,
    ) -> futures::future::BoxFuture<'static, Result<Response<ResponseBody>, BoxError>> {
        let pq = req
            .uri()
            .path_and_query()
            .map(|p| p.as_str())
            .unwrap_or("/");
        let rest = pq
            .split_once("/kubernetes")
            .map(|(_, r)| r.to_string())
            .unwrap_or_default();
        let url = format!("{}{rest}", self.endpoint.trim_end_matches('/'));
        req.headers_mut()
            .insert(http::header::AUTHORIZATION, self.token.clone());
        let http = self.http.clone();
        Box::pin(async move {
            *req.uri_mut() = url.parse()?;
            let resp = http.request(req).await?;
            Ok(resp.map(|b| b.map_err(BoxError::from).boxed_unsync()))
        })
    }
}

/// The new cluster, reached with `token`.
pub(super) struct Cluster {
    calls: Clusters,
}

/// The agent id the library's paths carry (unused by [`Direct`]).
const DIRECT: u64 = 0;

impl Cluster {
    /// A client for the cluster's endpoint, trusting only its CA.
    pub(super) fn connect(w: &EksWork, token: &str) -> Result<Self, String> {
        let endpoint = w.cluster.endpoint.clone().ok_or("no_endpoint")?;
        let ca = w
            .ca_data
            .as_deref()
            .and_then(|d| {
                base64::engine::general_purpose::STANDARD
                    .decode(d.trim())
                    .ok()
            })
            .ok_or("bad_cluster_ca")?;
        let mut roots = rustls::RootCertStore::empty();
        for c in rustls_pemfile::certs(&mut ca.as_slice()) {
            roots
                .add(c.map_err(|_| "bad_cluster_ca")?)
                .map_err(|_| "bad_cluster_ca")?;
        }
        let tls = rustls::ClientConfig::builder_with_provider(Arc::new(
            rustls::crypto::ring::default_provider(),
        ))
        .with_safe_default_protocol_versions()
        .map_err(|_| "tls")?
        .with_root_certificates(roots)
        .with_no_client_auth();
        let mut http = HttpConnector::new();
        http.enforce_http(false);
        http.set_connect_timeout(Some(Duration::from_secs(10)));
        let connector = hyper_rustls::HttpsConnectorBuilder::new()
            .with_tls_config(tls)
            .https_only()
            .enable_http1()
            .wrap_connector(http);
        let mut token =
            http::HeaderValue::from_str(&format!("Bearer {token}")).map_err(|_| "eks_token")?;
        token.set_sensitive(true);
        let direct = Direct {
            http: Client::builder(TokioExecutor::new()).build(connector),
            endpoint,
            token,
        };
        Ok(Cluster {
            calls: Clusters::over(Arc::new(direct)),
        })
    }

    /// `aws-auth` mapping the node role (so nodes join), and kas's ServiceAccount with
    /// its token and rights.
    pub(super) async fn configure(&self, w: &EksWork) -> Result<(), CallError> {
        let c = &self.calls;
        let role = w.node_role_arn.clone().unwrap_or_default();
        let entry = format!(
            "- rolearn: {role}\n  username: system:node:{{{{EC2PrivateDNSName}}}}\n  groups:\n    - system:bootstrappers\n    - system:nodes\n"
        );
        let path = "/api/v1/namespaces/kube-system/configmaps/aws-auth";
        match c.get(DIRECT, path).await? {
            None => {
                let cm = json!({
                    "apiVersion": "v1", "kind": "ConfigMap",
                    "metadata": {"name": "aws-auth", "namespace": "kube-system"},
                    "data": {"mapRoles": entry},
                });
                c.create(DIRECT, "/api/v1/namespaces/kube-system/configmaps", &cm)
                    .await?;
            }
            Some(mut cm) => {
                let roles = cm["data"]["mapRoles"].as_str().unwrap_or("").to_string();
                if !roles.contains(&role) {
                    cm["data"]["mapRoles"] = json!(format!("{roles}{entry}"));
                    c.replace(DIRECT, path, &cm).await?;
                }
            }
        }
        c.ensure(
            DIRECT,
            "/api/v1/namespaces/kube-system/serviceaccounts",
            &json!({
                "apiVersion": "v1", "kind": "ServiceAccount",
                "metadata": {"name": "kas", "namespace": "kube-system"},
            }),
        )
        .await?;
        c.ensure(
            DIRECT,
            "/api/v1/namespaces/kube-system/secrets",
            &json!({
                "apiVersion": "v1", "kind": "Secret", "type": "kubernetes.io/service-account-token",
                "metadata": {"name": "kas-token", "namespace": "kube-system",
                    "annotations": {"kubernetes.io/service-account.name": "kas"}},
            }),
        )
        .await?;
        c.ensure(DIRECT, "/apis/rbac.authorization.k8s.io/v1/clusterrolebindings", &json!({
            "apiVersion": "rbac.authorization.k8s.io/v1", "kind": "ClusterRoleBinding",
            "metadata": {"name": "kas-cluster-admin"},
            "roleRef": {"apiGroup": "rbac.authorization.k8s.io", "kind": "ClusterRole", "name": "cluster-admin"},
            "subjects": [{"kind": "ServiceAccount", "name": "kas", "namespace": "kube-system"}],
        }))
        .await
    }

    /// Registers an agent for the cluster (once) and installs agentk with a fresh token.
    pub(super) async fn install_agent(
        &self,
        cp: &dyn ControlPlane,
        w: &mut EksWork,
        opts: &EksOptions,
    ) -> Result<(), String> {
        let (project, name) = (w.cluster.project_path.clone(), w.cluster.name.clone());
        let agent_id = match w.cluster.agent_id {
            Some(a) => a,
            None => match cp.get_agent(&project, &name).await {
                Ok(a) => a.id,
                Err(CpError::NotFound(_)) => {
                    cp.create_agent(&project, &name)
                        .await
                        .map_err(cp_code)?
                        .0
                        .id
                }
                Err(e) => return Err(cp_code(e)),
            },
        };
        w.cluster.agent_id = Some(agent_id);
        let (_, token) = cp
            .create_agent_token(agent_id, None)
            .await
            .map_err(cp_code)?;
        let c = &self.calls;
        let call = |e: CallError| e.code;
        let ns = "gitlab-agent";
        c.ensure(
            DIRECT,
            "/api/v1/namespaces",
            &json!({
                "apiVersion": "v1", "kind": "Namespace", "metadata": {"name": ns},
            }),
        )
        .await
        .map_err(call)?;
        let secret = json!({
            "apiVersion": "v1", "kind": "Secret", "type": "Opaque",
            "metadata": {"name": "agentk-token", "namespace": ns},
            "data": {"token": base64::engine::general_purpose::STANDARD.encode(token.expose())},
        });
        let secrets = format!("/api/v1/namespaces/{ns}/secrets");
        match c.create(DIRECT, &secrets, &secret).await {
            Err(e) if e.code == "cluster_status_409" => c
                .replace(DIRECT, &format!("{secrets}/agentk-token"), &secret)
                .await
                .map_err(call)?,
            other => other.map_err(call)?,
        }
        c.ensure(DIRECT, &format!("/api/v1/namespaces/{ns}/serviceaccounts"), &json!({
            "apiVersion": "v1", "kind": "ServiceAccount", "metadata": {"name": "agentk", "namespace": ns},
        }))
        .await
        .map_err(call)?;
        c.ensure(DIRECT, "/apis/rbac.authorization.k8s.io/v1/clusterrolebindings", &json!({
            "apiVersion": "rbac.authorization.k8s.io/v1", "kind": "ClusterRoleBinding",
            "metadata": {"name": "gitlab-agent-agentk"},
            "roleRef": {"apiGroup": "rbac.authorization.k8s.io", "kind": "ClusterRole", "name": "cluster-admin"},
            "subjects": [{"kind": "ServiceAccount", "name": "agentk", "namespace": ns}],
        }))
        .await
        .map_err(call)?;
        c.ensure(
            DIRECT,
            &format!("/apis/apps/v1/namespaces/{ns}/deployments"),
            &deployment(opts),
        )
        .await
        .map_err(call)
    }
}

fn cp_code(e: CpError) -> String {
    tracing::warn!(error = %e, "control plane error while installing an EKS cluster's agent");
    match e {
        CpError::Conflict(_) => "agent_tokens_exhausted".into(),
        _ => "control_plane".into(),
    }
}

/// agentk's Deployment in the new cluster.
fn deployment(opts: &EksOptions) -> serde_json::Value {
    json!({
        "apiVersion": "apps/v1", "kind": "Deployment",
        "metadata": {"name": "agentk", "namespace": "gitlab-agent"},
        "spec": {
            "replicas": 2,
            "selector": {"matchLabels": {"app": "agentk"}},
            "template": {
                "metadata": {"labels": {"app": "agentk"}},
                "spec": {
                    "serviceAccountName": "agentk",
                    "containers": [{
                        "name": "agentk", "image": opts.agentk_image, "command": ["agentk"],
                        "args": ["--kas-address", opts.agent_url, "--token-file", "/etc/agentk/token"],
                        "volumeMounts": [{"name": "token", "mountPath": "/etc/agentk", "readOnly": true}],
                    }],
                    "volumes": [{"name": "token", "secret": {"secretName": "agentk-token"}}],
                },
            },
        },
    })
}
