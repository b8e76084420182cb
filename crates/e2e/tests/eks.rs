//! EKS clusters created from kas, end to end: moto (server mode, IAM authentication on)
//! plays AWS (STS, IAM, CloudFormation) behind a recording hop, and the project's test
//! API server plays the new cluster. What is emulated by what:
//!
//! - AssumeRole, the ExternalId kas sends (seen on the recording hop, since moto does
//!   not evaluate trust-policy conditions) and a denied AssumeRole (moto enforces the
//!   IAM policy of kas's own user): moto's STS and IAM;
//! - the stack: moto's CloudFormation, with a test template standing in for the
//!   shipped one (moto cannot create `AWS::EKS::Cluster`): it creates the node role
//!   and names the test API server as the cluster's endpoint and CA; the shipped
//!   template itself is checked by cfn-lint;
//! - the EKS token: presigned by kas with SigV4 for moto's STS. moto cannot answer a
//!   presigned request with its authentication on, so the test API server checks the
//!   token itself: its shape (GetCallerIdentity, 60 s, `x-k8s-aws-id` signed) and its
//!   signature, recomputed from the assumed role's credentials in moto's state; the
//!   caller is mapped to `system:masters`.
//! - moto re-encodes form bodies before checking SigV4 (spaces as `+`), so the test
//!   template is compact JSON.
#![allow(clippy::too_many_lines)]

use kas_test_support::apiserver::{EksAuth, Options, TestApiServer};
use kas_test_support::fixture::Env;
use kas_test_support::moto::{Moto, Recorder};
use kas_test_support::procs;
use serde_json::Value;
use std::time::Duration;

/// IAM as the customer and kas's operator set it up: kas's user (allowed to assume
/// `provision` only), the provisioning role, and a role kas may not assume.
const SETUP: &str = r#"
import boto3, json, os
kw = dict(endpoint_url=os.environ["MOTO"], region_name="us-east-1",
          aws_access_key_id="AKIAIOSFODNN7EXAMPLE", aws_secret_access_key="setup")
iam = boto3.client("iam", **kw)
iam.create_user(UserName="kas")
key = iam.create_access_key(UserName="kas")["AccessKey"]
# moto matches trust principals literally (an account root does not cover its users).
trust = json.dumps({"Version": "2012-10-17", "Statement": [{"Effect": "Allow",
    "Principal": {"AWS": "*"}, "Action": "sts:AssumeRole"}]})
role = iam.create_role(RoleName="provision", AssumeRolePolicyDocument=trust)["Role"]
iam.put_role_policy(RoleName="provision", PolicyName="provision", PolicyDocument=json.dumps(
    {"Version": "2012-10-17", "Statement": [{"Effect": "Allow", "Action": "*", "Resource": "*"}]}))
other = iam.create_role(RoleName="not-for-kas", AssumeRolePolicyDocument=trust)["Role"]
iam.put_user_policy(UserName="kas", PolicyName="kas", PolicyDocument=json.dumps(
    {"Version": "2012-10-17", "Statement": [
        {"Effect": "Allow", "Action": "sts:AssumeRole", "Resource": role["Arn"]},
        {"Effect": "Allow", "Action": "sts:GetCallerIdentity", "Resource": "*"}]}))
print(json.dumps({"key": key["AccessKeyId"], "secret": key["SecretAccessKey"],
                  "role": role["Arn"], "other": other["Arn"]}))
"#;
/// The AWS calls [`SETUP`] makes before moto starts checking credentials.
const SETUP_CALLS: usize = 6;

/// A template moto can create, standing in for AWS::EKS::Cluster with the test API
/// server; `fail` adds a resource moto refuses. JSON without spaces: moto checks SigV4
/// on a form body it re-encodes (spaces as `+`), where the SDK sent `%20`.
fn test_template(api: &TestApiServer) -> String {
    use base64::Engine;
    let ca = base64::engine::general_purpose::STANDARD.encode(api.ca_pem().expect("tls"));
    let param = |t: &str| serde_json::json!({"Type": t});
    let template = serde_json::json!({
        "AWSTemplateFormatVersion": "2010-09-09",
        "Parameters": {
            "ClusterName": param("String"), "KubernetesVersion": param("String"),
            "ClusterRoleArn": param("String"), "VpcId": param("String"),
            "SubnetIds": param("CommaDelimitedList"), "SecurityGroupId": param("String"),
            "InstanceType": param("String"), "NodeCount": param("Number"),
        },
        "Resources": {"NodeInstanceRole": {"Type": "AWS::IAM::Role", "Properties": {
            "AssumeRolePolicyDocument": {"Version": "2012-10-17", "Statement": [{
                "Effect": "Allow", "Principal": {"Service": "ec2.amazonaws.com"},
                "Action": "sts:AssumeRole"}]}}}},
        "Outputs": {
            "ClusterEndpoint": {"Value": api.url()},
            "ClusterCertificateAuthority": {"Value": ca},
            "NodeInstanceRoleArn": {"Value": {"Fn::GetAtt": ["NodeInstanceRole", "Arn"]}},
        },
    });
    template.to_string()
}

/// moto with the set-up done, the recording hop, the new cluster's API, and kas with
/// EKS on (its own AWS credentials: the `kas` user's).
struct World {
    _dir: tempfile::TempDir,
    _moto: Moto,
    setup: Value,
    aws: Recorder,
    cluster: TestApiServer,
    env: Env,
}

async fn world(name: &str) -> World {
    let moto = tokio::task::spawn_blocking(|| Moto::start(SETUP_CALLS))
        .await
        .expect("moto");
    let setup: Value = serde_json::from_str(&moto.python(SETUP)).expect("set-up output");
    let aws = Recorder::start(moto.url()).await;
    let cluster = TestApiServer::start_with(Options {
        tls: true,
        eks: Some(EksAuth {
            sts_url: format!("{}/", aws.url),
            cluster: name.into(),
            moto_state: format!("{}/moto-api/data.json", moto.url()),
        }),
        ..Default::default()
    })
    .await
    .expect("cluster API");
    let dir = tempfile::tempdir().expect("dir");
    let template = dir.path().join("template.yaml");
    std::fs::write(&template, test_template(&cluster)).expect("template");
    let key = setup["key"].as_str().expect("key").to_string();
    let secret = setup["secret"].as_str().expect("secret").to_string();
    let env = Env::start_full(
        Options::default(),
        &[
            "--eks",
            "--eks-template-file",
            template.to_str().expect("path"),
            "--eks-poll-interval",
            "100ms",
        ],
        &[
            ("AWS_ENDPOINT_URL", aws.url.as_str()),
            ("AWS_ACCESS_KEY_ID", key.as_str()),
            ("AWS_SECRET_ACCESS_KEY", secret.as_str()),
            ("AWS_REGION", "us-east-1"),
            ("AWS_EC2_METADATA_DISABLED", "true"),
        ],
    )
    .await;
    env.kasctl(&["project", "create", "acme/platform"]);
    World {
        _dir: dir,
        _moto: moto,
        setup,
        aws,
        cluster,
        env,
    }
}

fn show(env: &Env, name: &str) -> Value {
    env.kasctl_json(&["cluster", "show", name])[0].clone()
}

fn wait_state(w: &World, name: &str, state: &str, within: Duration) -> Value {
    let env = &w.env;
    let start = std::time::Instant::now();
    loop {
        let c = show(env, name);
        if c["state"] == state {
            return c;
        }
        if start.elapsed() > within {
            panic!(
                "{name} never became {state}: {c}\n{}\n{:#?}",
                env.logs(),
                w.aws.seen()
            );
        }
        std::thread::sleep(Duration::from_millis(50));
    }
}

fn create(w: &World, name: &str, role: &str) {
    w.env.kasctl(&[
        "cluster",
        "create",
        "eks",
        name,
        "--role-arn",
        role,
        "--region",
        "us-east-1",
        "--vpc",
        "vpc-0a1b2c",
        "--subnets",
        "subnet-1,subnet-2",
        "--security-group",
        "sg-0a1b2c",
        "--cluster-role-arn",
        "arn:aws:iam::123456789012:role/eks-cluster",
        "--nodes",
        "2",
    ]);
}

/// The temporary credentials are gone from the database file, and no log has them.
fn credentials_wiped(w: &World) {
    let db = rusqlite::Connection::open(w.env.path("kas-data").join("controlplane.sqlite"))
        .expect("control plane file");
    let held: i64 = db
        .query_row(
            "SELECT COUNT(*) FROM eks_clusters WHERE access_key_id IS NOT NULL \
             OR secret_access_key IS NOT NULL OR session_token IS NOT NULL",
            [],
            |r| r.get(0),
        )
        .expect("query");
    assert_eq!(held, 0, "temporary credentials left in the control plane");
    let logs = w.env.logs();
    for line in w.aws.seen() {
        let token = line
            .split("token=")
            .nth(1)
            .and_then(|t| t.split(' ').next())
            .unwrap_or("-");
        assert!(
            token == "-" || !logs.contains(token),
            "a session token reached the logs"
        );
    }
    assert!(!logs.contains(w.setup["secret"].as_str().unwrap_or("?")));
}

#[tokio::test(flavor = "multi_thread")]
async fn an_eks_cluster_is_created_configured_and_joined_by_its_agent() {
    let w = world("prod").await;
    let prepared = w.env.kasctl_json(&[
        "cluster",
        "eks",
        "prepare",
        "prod",
        "--project",
        "acme/platform",
    ]);
    let external_id = prepared["external_id"]
        .as_str()
        .expect("external id")
        .to_string();
    assert_eq!(prepared["account_id"], "123456789012");
    assert!(prepared["trust_policy"]
        .as_str()
        .unwrap_or("")
        .contains(&external_id));
    assert_eq!(show(&w.env, "prod")["state"], "awaiting_role");

    // AWS throttles kas for a while: the SDK's retries, then kas's, get through.
    w.aws.throttle("CreateStack", 4);
    create(&w, "prod", w.setup["role"].as_str().expect("role"));
    let ready = wait_state(&w, "prod", "ready", Duration::from_secs(60));
    assert_eq!(ready["stack_status"], "CREATE_COMPLETE");
    assert_eq!(ready["endpoint"].as_str(), Some(w.cluster.url().as_str()));
    assert_eq!(ready["holds_credentials"], false);
    let events: Vec<String> = ready["events"]
        .as_array()
        .expect("events")
        .iter()
        .map(|e| {
            format!(
                "{} {}",
                e["resource"].as_str().unwrap_or(""),
                e["status"].as_str().unwrap_or("")
            )
        })
        .collect();
    assert!(
        events.iter().any(|e| e == "kas-eks-prod CREATE_COMPLETE"),
        "{events:?}"
    );

    let watched = w.env.kasctl(&["cluster", "show", "prod", "--watch"]);
    assert!(
        watched.contains("prod [######] ready stack CREATE_COMPLETE")
            && watched.contains(" kas-eks-prod CREATE_COMPLETE"),
        "{watched}"
    );

    let throttled = w
        .aws
        .seen()
        .iter()
        .filter(|l| l.starts_with("400 ") && l.contains("Action=CreateStack&"))
        .count();
    assert_eq!(throttled, 4);

    // The external id kas sent is the one stored for the cluster.
    let assumed: Vec<String> = w
        .aws
        .seen()
        .into_iter()
        .filter(|l| l.contains("Action=AssumeRole"))
        .collect();
    assert!(!assumed.is_empty());
    assert!(
        assumed
            .iter()
            .all(|l| l.contains(&format!("ExternalId={external_id}"))),
        "{assumed:?}"
    );

    // In the new cluster, as the assumed role (authenticated with the EKS token):
    // aws-auth maps the node role, kas has its ServiceAccount, agentk is installed.
    let cm = w
        .cluster
        .object("", "configmaps", "kube-system", "aws-auth")
        .expect("aws-auth");
    let roles = cm["data"]["mapRoles"].as_str().unwrap_or("");
    assert!(
        roles.contains("NodeInstanceRole") && roles.contains("system:nodes"),
        "{roles}"
    );
    assert!(w
        .cluster
        .object("", "serviceaccounts", "kube-system", "kas")
        .is_some());
    assert!(w
        .cluster
        .object("", "secrets", "kube-system", "kas-token")
        .is_some());
    let writes = w
        .cluster
        .recorded_for("/api/v1/namespaces/kube-system/configmaps");
    assert!(
        writes
            .iter()
            .all(|r| r.authenticated_as
                == "arn:aws:sts::123456789012:assumed-role/provision/kas-eks-1"),
        "{writes:?}"
    );
    let deployment = w
        .cluster
        .object("apps", "deployments", "gitlab-agent", "agentk")
        .expect("agentk");
    let args = deployment["spec"]["template"]["spec"]["containers"][0]["args"].to_string();
    assert!(args.contains(&w.env.kas_info.agent), "{args}");

    // The agent kas registered connects with the token kas installed.
    let agent_id = ready["agent_id"].as_u64().expect("agent id");
    let secret = w
        .cluster
        .object("", "secrets", "gitlab-agent", "agentk-token")
        .expect("token secret");
    let token = {
        use base64::Engine;
        base64::engine::general_purpose::STANDARD
            .decode(secret["data"]["token"].as_str().expect("token"))
            .expect("base64")
    };
    let token_file = w.env.path("eks-agent.token");
    std::fs::write(&token_file, token).expect("token");
    let kubeconfig = w.env.path("eks-cluster.yaml");
    std::fs::write(&kubeconfig, w.cluster.kubeconfig()).expect("kubeconfig");
    let mut env = w.env;
    let agentk = procs::start_agentk_env(
        &env.kas_info.agent,
        &token_file,
        &kubeconfig,
        &[],
        &[],
        &env.path("logs"),
    );
    env.agents.push(agentk);
    let connected = (0..200).any(|_| {
        std::thread::sleep(Duration::from_millis(100));
        env.connected(agent_id).is_some()
    });
    assert!(
        connected,
        "the installed agent did not connect:\n{}",
        env.logs()
    );
    let table = env.kasctl(&["cluster", "show", "prod"]);
    assert!(table.contains("ready"), "{table}");
    let w = World { env, ..w };
    credentials_wiped(&w);
}

#[tokio::test(flavor = "multi_thread")]
async fn denied_role_rolled_back_stack_and_a_restart_mid_poll() {
    let mut w = world("resumed").await;
    for name in ["denied", "rolledback", "resumed"] {
        w.env.kasctl(&[
            "cluster",
            "eks",
            "prepare",
            name,
            "--project",
            "acme/platform",
        ]);
    }
    // AssumeRole denied by kas's own IAM policy: errored, with a code only.
    create(&w, "denied", w.setup["other"].as_str().expect("other role"));
    let denied = wait_state(&w, "denied", "errored", Duration::from_secs(30));
    assert_eq!(denied["error_code"], "assume_role_denied");

    // The stack rolls back (moto cannot: the hop answers as AWS would).
    w.aws
        .rewrite(Some(("CREATE_COMPLETE", "ROLLBACK_COMPLETE")));
    create(&w, "rolledback", w.setup["role"].as_str().expect("role"));
    let failed = wait_state(&w, "rolledback", "errored", Duration::from_secs(30));
    assert_eq!(failed["error_code"], "stack_rollback_complete");
    assert_eq!(failed["holds_credentials"], false);

    // kas restarts while the stack is still in progress; the next kas goes on.
    w.aws
        .rewrite(Some(("CREATE_COMPLETE", "CREATE_IN_PROGRESS")));
    create(&w, "resumed", w.setup["role"].as_str().expect("role"));
    wait_state(&w, "resumed", "stack_in_progress", Duration::from_secs(30));
    w.env.restart_kas(true);
    assert_eq!(show(&w.env, "resumed")["state"], "stack_in_progress");
    w.aws.rewrite(None);
    let ready = wait_state(&w, "resumed", "ready", Duration::from_secs(60));
    assert_eq!(ready["holds_credentials"], false);
    credentials_wiped(&w);

    // Deleting removes the stack (kas assumes the role again) and the agent.
    w.env.kasctl(&["cluster", "delete", "resumed"]);
    let deleted = wait_state(&w, "resumed", "deleted", Duration::from_secs(30));
    assert_eq!(deleted["agent_id"], Value::Null);
    assert!(w
        .aws
        .seen()
        .iter()
        .any(|l| l.contains("Action=DeleteStack")));
    credentials_wiped(&w);
}

/// The shipped template passes cfn-lint.
#[test]
fn the_shipped_eks_template_passes_cfn_lint() {
    let template = kas_test_support::pods::workspace_file("deploy/eks/cluster.yaml");
    let out = std::process::Command::new(kas_test_support::moto::tool("cfn-lint"))
        .arg(&template)
        .output()
        .expect("cfn-lint (the test command installs it into target/tools)");
    assert!(
        out.status.success(),
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
}
