//! EKS clusters created from kas in a customer's AWS account (seed 002, "Amazon EKS
//! integration"), as a background job driven by `kasctl`:
//!
//! 1. `prepare`: a cluster record with a fresh external id, and the trust policy the
//!    customer's provisioning role needs (trusting kas's AWS account).
//! 2. `create`: records the request and returns; the rest runs here, in the
//!    background, step by step, each step's outcome saved in the control plane:
//! 3. assume the provisioning role with the external id (credentials kept, 1 hour);
//! 4. create the CloudFormation stack from the shipped template;
//! 5. poll it with backoff until it completes (the kas holding the cluster's lease
//!    does; any kas takes over when that one stops);
//! 6. with an EKS token, write `aws-auth` (so nodes join) and a ServiceAccount for kas
//!    with its token into the new cluster, through the client library;
//! 7. register an agent for the cluster and install agentk into it;
//! 8. wipe the temporary credentials: on success and on failure alike.
//!
//! Failures leave the cluster `errored` with a code only; throttling and transient AWS
//! errors are retried with backoff. `delete` assumes the role again, deletes the stack
//! and the cluster's agent.

pub mod aws;
mod kube;

use super::leased::{self, lease_until, Tasks, LEASE};
use aws::{Aws, AwsError};
use kas_api::admin::EksPrepared;
use kas_api::error::Error;
use kas_api::records::{EksSpec, EksState};
use kas_controlplane::{ControlPlane, EksWork};
use std::sync::Arc;
use std::time::Duration;
use tokio_util::task::AbortOnDropHandle;

/// The template clusters are created with (`--eks-template-file` replaces it).
pub const TEMPLATE: &str = include_str!("../../../../../deploy/eks/cluster.yaml");
/// Transient AWS failures retried before the cluster is errored.
const RETRIES: u32 = 8;

/// What the worker needs besides AWS.
pub struct EksOptions {
    /// The first delay between polls of a stack (doubling up to 16 times it).
    pub poll: Duration,
    /// The address installed agentk dials.
    pub agent_url: String,
    /// agentk's image.
    pub agentk_image: String,
}

/// Creates and deletes EKS clusters; see the module docs.
pub struct Eks {
    cp: Arc<dyn ControlPlane>,
    aws: Aws,
    opts: EksOptions,
    owner: String,
    running: Tasks<u64>,
}

/// What to do after a step.
enum Next {
    After(Duration),
    Done,
}

impl Eks {
    pub fn new(cp: Arc<dyn ControlPlane>, aws: Aws, opts: EksOptions) -> Arc<Self> {
        Arc::new(Eks {
            cp,
            aws,
            opts,
            owner: leased::new_owner(),
            running: Tasks::new(),
        })
    }

    /// A new cluster record and what the customer's role must trust.
    pub async fn prepare(&self, name: &str, project: &str) -> Result<EksPrepared, Error> {
        let account_id = self.aws.account_id().await.map_err(|e| {
            Error::new(
                kas_api::error::Kind::Unavailable,
                kas_api::error::Origin::Internal,
                format!("kas cannot tell its own AWS account ({})", e.code),
            )
        })?;
        let cluster = self.cp.prepare_eks(name, project).await?;
        let trust_policy = serde_json::to_string_pretty(&serde_json::json!({
            "Version": "2012-10-17",
            "Statement": [{
                "Effect": "Allow",
                "Principal": {"AWS": format!("arn:aws:iam::{account_id}:root")},
                "Action": "sts:AssumeRole",
                "Condition": {"StringEquals": {"sts:ExternalId": cluster.external_id}},
            }],
        }))
        .unwrap_or_default();
        Ok(EksPrepared {
            external_id: cluster.external_id.clone(),
            cluster,
            account_id,
            trust_policy,
        })
    }

    /// Records the request and starts the work in the background.
    pub async fn create(self: &Arc<Self>, name: &str, spec: EksSpec) -> Result<EksWork, Error> {
        check_spec(&spec)?;
        let w = self
            .cp
            .request_eks(name, &spec, &self.owner, lease_until())
            .await?;
        self.spawn(w.clone());
        Ok(w)
    }

    /// Starts deleting the cluster in the background.
    pub async fn delete(self: &Arc<Self>, name: &str) -> Result<EksWork, Error> {
        let w = self.cp.delete_eks(name, &self.owner, lease_until()).await?;
        self.spawn(w.clone());
        Ok(w)
    }

    fn spawn(self: &Arc<Self>, w: EksWork) {
        let me = self.clone();
        self.running
            .spawn(w.cluster.id, async move { me.run(w).await });
    }

    /// Takes over, now and then, clusters whose kas stopped. Runs until dropped.
    pub fn resume_in_background(self: &Arc<Self>) -> AbortOnDropHandle<()> {
        leased::claim_periodically(self, |me: Arc<Self>| async move {
            match me.cp.claim_eks(&me.owner, lease_until()).await {
                Ok(claimed) => {
                    for w in claimed {
                        tracing::info!(cluster = %w.cluster.name, state = w.cluster.state.as_str(), "taking over an EKS cluster");
                        me.spawn(w);
                    }
                }
                Err(e) => tracing::warn!(error = %e, "cannot claim EKS clusters"),
            }
        })
    }

    /// Stops (on shutdown); the leases run out and another kas takes over.
    pub fn stop(&self) {
        self.running.take_all();
    }

    async fn run(&self, mut w: EksWork) {
        loop {
            let next = self.step(&mut w).await;
            if !w.cluster.state.is_active() {
                // Step 7: nothing needs the credentials any more.
                w.credentials = None;
            }
            if !self.save(&w).await {
                return;
            }
            match next {
                Next::Done => return,
                Next::After(d) => {
                    // Sleep in slices, renewing the lease.
                    let until = tokio::time::Instant::now() + d;
                    while tokio::time::Instant::now() < until {
                        let slice = (until - tokio::time::Instant::now()).min(LEASE / 3);
                        tokio::time::sleep(slice).await;
                        if !self.save(&w).await {
                            return;
                        }
                    }
                }
            }
        }
    }

    /// Saves progress; false when another kas holds the cluster now.
    async fn save(&self, w: &EksWork) -> bool {
        loop {
            match self.cp.save_eks(&self.owner, w, lease_until()).await {
                Ok(held) => return held,
                Err(e) => {
                    tracing::warn!(error = %e, cluster = %w.cluster.name, "cannot save an EKS cluster's progress; retrying");
                    tokio::time::sleep(Duration::from_secs(1)).await;
                }
            }
        }
    }

    fn backoff(&self, polls: u32) -> Duration {
        self.opts.poll * 2u32.pow(polls.min(4))
    }

    /// Errors the cluster with `code` (credentials wiped by the caller).
    fn fail(w: &mut EksWork, code: &str) -> Next {
        tracing::warn!(cluster = %w.cluster.name, code, "EKS cluster failed");
        w.cluster.state = EksState::Errored;
        w.cluster.error_code = Some(code.to_string());
        Next::Done
    }

    /// Retries a transient AWS failure, or errors the cluster.
    fn retry_or_fail(&self, w: &mut EksWork, e: &AwsError) -> Next {
        if e.transient && w.polls < RETRIES {
            w.polls += 1;
            return Next::After(self.backoff(w.polls));
        }
        Self::fail(w, &e.code)
    }

    fn moved(w: &mut EksWork, state: EksState) -> Next {
        w.cluster.state = state;
        w.polls = 0;
        Next::After(Duration::ZERO)
    }

    async fn step(&self, w: &mut EksWork) -> Next {
        let Some(spec) = w.cluster.spec.clone() else {
            return Self::fail(w, "no_request");
        };
        match w.cluster.state {
            EksState::AssumingRole | EksState::Deleting if w.credentials.is_none() => {
                let session = format!("kas-eks-{}", w.cluster.id);
                match self
                    .aws
                    .assume_role(&spec, &w.cluster.external_id, &session)
                    .await
                {
                    Ok(c) => {
                        w.credentials = Some(c);
                        if w.cluster.state == EksState::AssumingRole {
                            return Self::moved(w, EksState::CreatingStack);
                        }
                        Next::After(Duration::ZERO)
                    }
                    Err(e) if e.code == "aws_access_denied" => Self::fail(w, "assume_role_denied"),
                    Err(e) => self.retry_or_fail(w, &e),
                }
            }
            EksState::AssumingRole => Self::moved(w, EksState::CreatingStack),
            EksState::CreatingStack => self.create_stack(w, &spec).await,
            EksState::StackInProgress => self.poll_stack(w, &spec).await,
            EksState::Configuring | EksState::InstallingAgent => self.in_cluster(w, &spec).await,
            EksState::Deleting => self.delete_stack(w, &spec).await,
            EksState::AwaitingRole | EksState::Ready | EksState::Errored | EksState::Deleted => {
                Next::Done
            }
        }
    }

    async fn create_stack(&self, w: &mut EksWork, spec: &EksSpec) -> Next {
        let Some(c) = w.credentials.clone() else {
            return Self::moved(w, EksState::AssumingRole);
        };
        match self
            .aws
            .create_stack(&w.cluster.name, &w.cluster.stack_name, spec, &c)
            .await
        {
            Ok(id) => {
                w.stack_id = Some(id);
                Self::moved(w, EksState::StackInProgress);
                Next::After(self.opts.poll)
            }
            // Created before a restart: follow it.
            Err(e) if e.code == "aws_already_exists_exception" => {
                w.stack_id = Some(w.cluster.stack_name.clone());
                Self::moved(w, EksState::StackInProgress)
            }
            Err(e) => self.retry_or_fail(w, &e),
        }
    }

    async fn poll_stack(&self, w: &mut EksWork, spec: &EksSpec) -> Next {
        let Some(c) = w.credentials.clone() else {
            // The credentials are gone (they expired): assume the role again.
            return Self::moved(w, EksState::AssumingRole);
        };
        let stack = w
            .stack_id
            .clone()
            .unwrap_or_else(|| w.cluster.stack_name.clone());
        let s = match self.aws.stack(&spec.region, &stack, &c).await {
            Ok(s) => s,
            Err(e) => return self.retry_or_fail(w, &e),
        };
        w.cluster.stack_status = Some(s.status.clone());
        w.cluster.events = s.events;
        match s.status.as_str() {
            "CREATE_COMPLETE" => {
                let out = |k: &str| s.outputs.get(k).cloned();
                match (
                    out("ClusterEndpoint"),
                    out("ClusterCertificateAuthority"),
                    out("NodeInstanceRoleArn"),
                ) {
                    (Some(endpoint), Some(ca), Some(role)) => {
                        w.cluster.endpoint = Some(endpoint);
                        w.ca_data = Some(ca);
                        w.node_role_arn = Some(role);
                        Self::moved(w, EksState::Configuring)
                    }
                    _ => Self::fail(w, "stack_outputs_missing"),
                }
            }
            status if status.ends_with("_IN_PROGRESS") => {
                w.polls = w.polls.saturating_add(1);
                Next::After(self.backoff(w.polls))
            }
            status => Self::fail(w, &format!("stack_{}", status.to_ascii_lowercase())),
        }
    }

    async fn in_cluster(&self, w: &mut EksWork, spec: &EksSpec) -> Next {
        let Some(c) = w.credentials.clone() else {
            return Self::fail(w, "credentials_expired");
        };
        let token = match self.aws.eks_token(&spec.region, &w.cluster.name, &c) {
            Ok(t) => t,
            Err(e) => return Self::fail(w, &e.code),
        };
        let cluster = match kube::Cluster::connect(w, &token) {
            Ok(k) => k,
            Err(code) => return Self::fail(w, &code),
        };
        if w.cluster.state == EksState::Configuring {
            if let Err(e) = cluster.configure(w).await {
                return Self::fail(w, &e.code);
            }
            w.cluster.state = EksState::InstallingAgent;
            // Saved before the agent is registered, so a restart does not configure twice.
            return Next::After(Duration::ZERO);
        }
        match cluster.install_agent(self.cp.as_ref(), w, &self.opts).await {
            Ok(()) => {
                w.cluster.state = EksState::Ready;
                Next::Done
            }
            Err(code) => Self::fail(w, &code),
        }
    }

    async fn delete_stack(&self, w: &mut EksWork, spec: &EksSpec) -> Next {
        let Some(c) = w.credentials.clone() else {
            return Next::After(Duration::ZERO);
        };
        let stack = w
            .stack_id
            .clone()
            .unwrap_or_else(|| w.cluster.stack_name.clone());
        if w.cluster.stack_status.as_deref() != Some("DELETE_IN_PROGRESS") {
            if let Err(e) = self.aws.delete_stack(&spec.region, &stack, &c).await {
                return self.retry_or_fail(w, &e);
            }
            w.cluster.stack_status = Some("DELETE_IN_PROGRESS".into());
            return Next::After(self.opts.poll);
        }
        match self.aws.stack(&spec.region, &stack, &c).await {
            Ok(s) if s.status == "DELETE_COMPLETE" => self.deleted(w).await,
            Ok(s) if s.status.ends_with("_IN_PROGRESS") => {
                w.cluster.events = s.events;
                w.polls = w.polls.saturating_add(1);
                Next::After(self.backoff(w.polls))
            }
            Ok(s) => Self::fail(w, &format!("stack_{}", s.status.to_ascii_lowercase())),
            // Gone already.
            Err(e) if e.code == "aws_validation_error" || e.code == "aws_stack_missing" => {
                self.deleted(w).await
            }
            Err(e) => self.retry_or_fail(w, &e),
        }
    }

    async fn deleted(&self, w: &mut EksWork) -> Next {
        w.cluster.stack_status = Some("DELETE_COMPLETE".into());
        if let Some(agent) = w.cluster.agent_id.take() {
            if let Err(e) = self.cp.delete_agent(agent).await {
                tracing::warn!(error = %e, agent, "cannot delete a deleted cluster's agent");
            }
        }
        w.cluster.state = EksState::Deleted;
        Next::Done
    }
}

/// What `kasctl cluster create eks` must name, checked before anything is recorded.
fn check_spec(s: &EksSpec) -> Result<(), Error> {
    let bad = |m: String| Err(Error::bad_request(m));
    let arn = |what: &str, v: &str| {
        if v.starts_with("arn:aws") && v.contains(":role/") {
            Ok(())
        } else {
            bad(format!("{what} `{v}` is not an IAM role ARN"))
        }
    };
    arn("--role-arn", &s.role_arn)?;
    arn("--cluster-role-arn", &s.cluster_role_arn)?;
    let region_ok = !s.region.is_empty()
        && s.region
            .bytes()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-');
    if !region_ok {
        return bad(format!("--region `{}` is not an AWS region", s.region));
    }
    if !s.vpc_id.starts_with("vpc-") {
        return bad(format!("--vpc `{}` is not a VPC id (vpc-...)", s.vpc_id));
    }
    if s.subnet_ids.is_empty() || s.subnet_ids.iter().any(|x| !x.starts_with("subnet-")) {
        return bad("--subnets must list subnet ids (subnet-...)".into());
    }
    if !s.security_group_id.starts_with("sg-") {
        return bad(format!(
            "--security-group `{}` is not a security group id (sg-...)",
            s.security_group_id
        ));
    }
    if !(1..=100).contains(&s.node_count) {
        return bad("--nodes must be between 1 and 100".into());
    }
    Ok(())
}
