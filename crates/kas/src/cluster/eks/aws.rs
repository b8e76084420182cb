//! kas's calls to AWS for EKS clusters, with the official SDK: its own identity (the
//! standard credential chain; `AWS_ENDPOINT_URL` points it elsewhere, as in the tests),
//! AssumeRole into a customer's provisioning role, the CloudFormation stack, and the
//! EKS token (a presigned STS GetCallerIdentity, signed with SigV4).
//!
//! Failures come back as codes (`aws_access_denied`, `aws_throttling`, ...), never
//! AWS's messages, which may carry anything; transient ones are marked for retry.

use aws_config::{BehaviorVersion, Region, SdkConfig};
use aws_sdk_cloudformation::types::{Capability, OnFailure, Parameter};
use aws_sdk_sts::error::ProvideErrorMetadata;
use base64::Engine;
use kas_api::records::{EksEvent, EksSpec};
use kas_controlplane::AwsCredentials;
use std::collections::HashMap;
use std::time::{Duration, SystemTime};

/// How long assumed-role credentials last (the seed's one hour).
const ASSUMED_FOR: Duration = Duration::from_secs(3600);
/// How long an EKS token is valid (EKS accepts tokens presigned for 60 s).
const TOKEN_VALID: Duration = Duration::from_secs(60);

/// A failed AWS call, as a code.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{code}")]
pub struct AwsError {
    pub code: String,
    /// Worth retrying later (throttling, AWS unavailable, network).
    pub transient: bool,
}

fn snake(code: &str) -> String {
    let mut out = String::new();
    for (i, c) in code.chars().enumerate() {
        if c.is_ascii_uppercase() && i > 0 {
            out.push('_');
        }
        if c.is_ascii_alphanumeric() {
            out.push(c.to_ascii_lowercase());
        }
    }
    out
}

/// Classifies an SDK error without keeping its message.
fn classify<E: ProvideErrorMetadata>(
    e: &aws_smithy_runtime_api::client::result::SdkError<E, aws_smithy_runtime_api::http::Response>,
) -> AwsError {
    use aws_smithy_runtime_api::client::result::SdkError;
    let status = match e {
        SdkError::ServiceError(s) => Some(s.raw().status().as_u16()),
        SdkError::ResponseError(r) => Some(r.raw().status().as_u16()),
        _ => None,
    };
    match e.code() {
        Some(code) => {
            let transient = matches!(
                code,
                "Throttling"
                    | "ThrottlingException"
                    | "RequestLimitExceeded"
                    | "ServiceUnavailable"
                    | "InternalFailure"
                    | "InternalError"
                    | "RequestTimeout"
            ) || status.is_some_and(|s| s >= 500);
            let code = match code {
                "AccessDenied" | "AccessDeniedException" => "access_denied".to_string(),
                c => snake(c),
            };
            AwsError {
                code: format!("aws_{code}"),
                transient,
            }
        }
        // An error body the SDK could not read: its status says enough.
        None => match status {
            Some(401 | 403) => AwsError {
                code: "aws_access_denied".into(),
                transient: false,
            },
            Some(s) => AwsError {
                code: format!("aws_status_{s}"),
                transient: s >= 500 || s == 429,
            },
            None => AwsError {
                code: "aws_unreachable".into(),
                transient: true,
            },
        },
    }
}

/// A stack as kas follows it.
#[derive(Debug, Clone)]
pub struct StackState {
    pub status: String,
    pub outputs: HashMap<String, String>,
    pub events: Vec<EksEvent>,
}

/// kas's AWS side; see the module docs.
pub struct Aws {
    base: SdkConfig,
    template: String,
}

impl Aws {
    /// kas's own AWS configuration and the stack template to create clusters with.
    pub async fn load(template: String) -> Self {
        use aws_smithy_http_client::tls::{rustls_provider::CryptoMode, Provider};
        let https = aws_smithy_http_client::Builder::new()
            .tls_provider(Provider::Rustls(CryptoMode::Ring))
            .build_https();
        let base = aws_config::defaults(BehaviorVersion::latest())
            .http_client(https)
            .load()
            .await;
        Aws { base, template }
    }

    /// kas's own AWS account (which provisioning roles must trust).
    pub async fn account_id(&self) -> Result<String, AwsError> {
        let sts = aws_sdk_sts::Client::new(&self.base);
        let out = sts
            .get_caller_identity()
            .send()
            .await
            .map_err(|e| classify(&e))?;
        out.account().map(str::to_string).ok_or(AwsError {
            code: "aws_no_account".into(),
            transient: false,
        })
    }

    /// Credentials of the customer's provisioning role, asked for with its external id.
    pub async fn assume_role(
        &self,
        spec: &EksSpec,
        external_id: &str,
        session: &str,
    ) -> Result<AwsCredentials, AwsError> {
        let conf = aws_sdk_sts::config::Builder::from(&self.base)
            .region(Region::new(spec.region.clone()))
            .build();
        let out = aws_sdk_sts::Client::from_conf(conf)
            .assume_role()
            .role_arn(&spec.role_arn)
            .external_id(external_id)
            .role_session_name(session)
            .duration_seconds(i32::try_from(ASSUMED_FOR.as_secs()).unwrap_or(3600))
            .send()
            .await
            .map_err(|e| classify(&e))?;
        let c = out.credentials().ok_or(AwsError {
            code: "aws_no_credentials".into(),
            transient: false,
        })?;
        Ok(AwsCredentials {
            access_key_id: c.access_key_id().to_string(),
            secret_access_key: c.secret_access_key().to_string(),
            session_token: c.session_token().to_string(),
            expires_at: c.expiration().secs(),
        })
    }

    fn cloudformation(&self, region: &str, c: &AwsCredentials) -> aws_sdk_cloudformation::Client {
        let creds = aws_credential_types::Credentials::new(
            &c.access_key_id,
            &c.secret_access_key,
            Some(c.session_token.clone()),
            None,
            "kas-assumed-role",
        );
        let conf = aws_sdk_cloudformation::config::Builder::from(&self.base)
            .region(Region::new(region.to_string()))
            .credentials_provider(creds)
            .build();
        aws_sdk_cloudformation::Client::from_conf(conf)
    }

    /// Creates the cluster's stack; its id.
    pub async fn create_stack(
        &self,
        name: &str,
        stack: &str,
        spec: &EksSpec,
        c: &AwsCredentials,
    ) -> Result<String, AwsError> {
        let p = |k: &str, v: &str| {
            Parameter::builder()
                .parameter_key(k)
                .parameter_value(v)
                .build()
        };
        let out = self
            .cloudformation(&spec.region, c)
            .create_stack()
            .stack_name(stack)
            .template_body(&self.template)
            .parameters(p("ClusterName", name))
            .parameters(p("KubernetesVersion", &spec.kubernetes_version))
            .parameters(p("ClusterRoleArn", &spec.cluster_role_arn))
            .parameters(p("VpcId", &spec.vpc_id))
            .parameters(p("SubnetIds", &spec.subnet_ids.join(",")))
            .parameters(p("SecurityGroupId", &spec.security_group_id))
            .parameters(p("InstanceType", &spec.instance_type))
            .parameters(p("NodeCount", &spec.node_count.to_string()))
            .capabilities(Capability::CapabilityIam)
            .on_failure(OnFailure::Rollback)
            .send()
            .await
            .map_err(|e| classify(&e))?;
        Ok(out.stack_id().unwrap_or(stack).to_string())
    }

    /// The stack's status, outputs and events (oldest first).
    pub async fn stack(
        &self,
        region: &str,
        stack: &str,
        c: &AwsCredentials,
    ) -> Result<StackState, AwsError> {
        let cf = self.cloudformation(region, c);
        let out = cf
            .describe_stacks()
            .stack_name(stack)
            .send()
            .await
            .map_err(|e| classify(&e))?;
        let s = out.stacks().first().ok_or(AwsError {
            code: "aws_stack_missing".into(),
            transient: false,
        })?;
        let outputs = s
            .outputs()
            .iter()
            .filter_map(|o| Some((o.output_key()?.to_string(), o.output_value()?.to_string())))
            .collect();
        let status = s
            .stack_status()
            .map(|s| s.as_str().to_string())
            .unwrap_or_default();
        let mut events: Vec<EksEvent> = cf
            .describe_stack_events()
            .stack_name(stack)
            .send()
            .await
            .map_err(|e| classify(&e))?
            .stack_events()
            .iter()
            .map(|e| EksEvent {
                time: e.timestamp().map(|t| t.secs()).unwrap_or(0),
                resource: e.logical_resource_id().unwrap_or_default().to_string(),
                status: e
                    .resource_status()
                    .map(|s| s.as_str().to_string())
                    .unwrap_or_default(),
            })
            .collect();
        // AWS lists the newest first.
        events.reverse();
        Ok(StackState {
            status,
            outputs,
            events,
        })
    }

    pub async fn delete_stack(
        &self,
        region: &str,
        stack: &str,
        c: &AwsCredentials,
    ) -> Result<(), AwsError> {
        self.cloudformation(region, c)
            .delete_stack()
            .stack_name(stack)
            .send()
            .await
            .map(|_| ())
            .map_err(|e| classify(&e))
    }

    /// The STS endpoint EKS tokens are presigned for.
    fn sts_url(&self, region: &str) -> String {
        match self.base.endpoint_url() {
            Some(u) => format!("{}/", u.trim_end_matches('/')),
            None => format!("https://sts.{region}.amazonaws.com/"),
        }
    }

    /// A bearer token for the EKS cluster `cluster`: `k8s-aws-v1.` and the base64url of
    /// a GetCallerIdentity URL presigned (60 s) with the `x-k8s-aws-id` header.
    pub fn eks_token(
        &self,
        region: &str,
        cluster: &str,
        c: &AwsCredentials,
    ) -> Result<String, AwsError> {
        use aws_sigv4::http_request::{
            sign, SignableBody, SignableRequest, SignatureLocation, SigningSettings,
        };
        let failed = |_| AwsError {
            code: "eks_token".into(),
            transient: false,
        };
        let identity: aws_smithy_runtime_api::client::identity::Identity =
            aws_credential_types::Credentials::new(
                &c.access_key_id,
                &c.secret_access_key,
                Some(c.session_token.clone()),
                None,
                "kas-assumed-role",
            )
            .into();
        let mut settings = SigningSettings::default();
        settings.signature_location = SignatureLocation::QueryParams;
        settings.expires_in = Some(TOKEN_VALID);
        let params = aws_sigv4::sign::v4::SigningParams::builder()
            .identity(&identity)
            .region(region)
            .name("sts")
            .time(SystemTime::now())
            .settings(settings)
            .build()
            .map_err(|_| AwsError {
                code: "eks_token".into(),
                transient: false,
            })?
            .into();
        let url = format!(
            "{}?Action=GetCallerIdentity&Version=2011-06-15",
            self.sts_url(region)
        );
        let signable = SignableRequest::new(
            "GET",
            &url,
            std::iter::once(("x-k8s-aws-id", cluster)),
            SignableBody::Bytes(&[]),
        )
        .map_err(failed)?;
        let (instructions, _) = sign(signable, &params).map_err(failed)?.into_parts();
        let mut req = http::Request::get(&url)
            .header("x-k8s-aws-id", cluster)
            .body(())
            .map_err(|_| AwsError {
                code: "eks_token".into(),
                transient: false,
            })?;
        instructions.apply_to_request_http1x(&mut req);
        let presigned = req.uri().to_string();
        Ok(format!(
            "k8s-aws-v1.{}",
            base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(presigned)
        ))
    }
}
