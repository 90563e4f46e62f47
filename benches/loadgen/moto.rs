//! The backend alone, for `--backend aws`: the role both phases assume on moto, and STS
//! `AssumeRole` called straight from the load generator with the parameters latchkey's aws
//! backend sends, so that the difference between the two phases is latchkey and nothing else.
//!
//! Both phases sign with the same principal: the AWS credentials of the environment (scripts/
//! bench-moto.sh exports the IAM user that moto enforces), which `latchkey serve` inherits.

use std::time::Duration;

use anyhow::Context;
use aws_config::BehaviorVersion;
use aws_config::timeout::TimeoutConfig;
use aws_sdk_sts::types::Tag;
use serde_json::json;

use crate::load::Failure;

/// Where latchkey's aws backend keeps its roles in the documented setup (`role_path`).
pub const ROLE_PATH: &str = "/latchkey/";
/// latchkey's `outbound_timeout` default: both phases give STS the same time.
const TIMEOUT: Duration = Duration::from_secs(10);

/// The region moto answers in, whatever it is asked: any will do, as long as both phases agree.
pub const REGION: &str = "us-east-1";

/// SDK configuration for moto at `url`, the way latchkey builds its own (standard credential
/// chain, the SDK's default retries).
async fn sdk_config(url: &str) -> aws_config::SdkConfig {
    aws_config::defaults(BehaviorVersion::latest())
        .region(aws_config::Region::new(REGION))
        .endpoint_url(url)
        .timeout_config(TimeoutConfig::builder().operation_timeout(TIMEOUT).connect_timeout(TIMEOUT).build())
        .load()
        .await
}

/// Creates a role under [`ROLE_PATH`] that the calling principal may assume, set the source
/// identity of and tag, as docs/BACKENDS.md asks of a target role. Returns its ARN.
pub async fn create_role(url: &str) -> anyhow::Result<String> {
    let config = sdk_config(url).await;
    let caller = aws_sdk_sts::Client::new(&config)
        .get_caller_identity()
        .send()
        .await
        .context("moto: GetCallerIdentity (are the broker's AWS credentials in the environment?)")?;
    let principal = caller.arn().context("moto: GetCallerIdentity without an ARN")?.to_owned();
    let trust = json!({ "Version": "2012-10-17", "Statement": [{
        "Effect": "Allow",
        "Principal": { "AWS": principal },
        "Action": ["sts:AssumeRole", "sts:SetSourceIdentity", "sts:TagSession"],
    }]});
    let name = format!("latchkey-bench-{}", &uuid::Uuid::new_v4().simple().to_string()[..12]);
    let role = aws_sdk_iam::Client::new(&config)
        .create_role()
        .role_name(&name)
        .path(ROLE_PATH)
        .assume_role_policy_document(trust.to_string())
        .send()
        .await
        .context("moto: CreateRole")?;
    Ok(role.role().context("moto: CreateRole without a role")?.arn().to_owned())
}

/// `AssumeRole` as latchkey sends it for the benchmark's capability.
pub struct AssumeRole {
    sts: aws_sdk_sts::Client,
    role_arn: String,
}

impl AssumeRole {
    /// One client shared by every worker, as latchkey shares one.
    pub async fn new(url: &str, role_arn: &str) -> AssumeRole {
        AssumeRole { sts: aws_sdk_sts::Client::new(&sdk_config(url).await), role_arn: role_arn.to_owned() }
    }

    /// One session: a fresh credential id names it and is its source identity, and the session
    /// carries latchkey's four tags and the policy's 15 minutes.
    pub async fn call(&self) -> Result<(), Failure> {
        let credential = uuid::Uuid::now_v7();
        let identity = format!("lk-{}", credential.simple());
        let tag = |key: &str, value: &str| Tag::builder().key(key).value(value).build().expect("key and value are set");
        let answer = self
            .sts
            .assume_role()
            .role_arn(&self.role_arn)
            .role_session_name(&identity)
            .source_identity(&identity)
            .duration_seconds(900)
            .tags(tag("latchkey-agent", "bench"))
            .tags(tag("latchkey-capability", "bench"))
            .tags(tag("latchkey-credential", &credential.to_string()))
            .tags(tag("latchkey-repository", "acme/widgets"))
            .send()
            .await;
        match answer {
            Ok(out) if out.credentials().is_some_and(|c| !c.session_token().is_empty()) => Ok(()),
            Ok(_) => Err(Failure { kind: "AssumeRole without credentials".into(), message: String::new() }),
            Err(e) => {
                let kind = match &e {
                    aws_sdk_sts::error::SdkError::ServiceError(s) => {
                        format!("STS {}", aws_sdk_sts::error::ProvideErrorMetadata::code(s.err()).unwrap_or("error"))
                    }
                    aws_sdk_sts::error::SdkError::TimeoutError(_) => "transport: timeout".into(),
                    _ => "transport: other".into(),
                };
                let message = format!("{kind}: {}", aws_sdk_sts::error::DisplayErrorContext(&e));
                Err(Failure { kind, message: message.chars().take(400).collect() })
            }
        }
    }
}
