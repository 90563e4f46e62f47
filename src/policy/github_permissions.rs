//! GitHub App permissions a `github` grant may ask for, and the levels each one accepts.
//!
//! Taken from the `app-permissions` schema of GitHub's OpenAPI description (npm `@octokit/openapi`
//! 23.0.2, `generated/api.github.com.json`). A name or level outside this table is a load error, so
//! that a typo fails at `policy check` instead of at the first exchange. Keep it sorted by name:
//! lookups are a binary search.

use super::Level;

/// Permission name → the levels GitHub accepts for it, sorted by name.
pub(crate) const PERMISSIONS: &[(&str, &[Level])] = &[
    ("actions", &[Level::Read, Level::Write]),
    ("administration", &[Level::Read, Level::Write]),
    ("artifact_metadata", &[Level::Read, Level::Write]),
    ("attestations", &[Level::Read, Level::Write]),
    ("checks", &[Level::Read, Level::Write]),
    ("code_quality", &[Level::Read, Level::Write]),
    ("codespaces", &[Level::Read, Level::Write]),
    ("contents", &[Level::Read, Level::Write]),
    ("custom_properties_for_organizations", &[Level::Read, Level::Write]),
    ("dependabot_secrets", &[Level::Read, Level::Write]),
    ("deployments", &[Level::Read, Level::Write]),
    ("discussions", &[Level::Read, Level::Write]),
    ("email_addresses", &[Level::Read, Level::Write]),
    ("enterprise_custom_properties_for_organizations", &[Level::Read, Level::Write, Level::Admin]),
    ("environments", &[Level::Read, Level::Write]),
    ("followers", &[Level::Read, Level::Write]),
    ("git_ssh_keys", &[Level::Read, Level::Write]),
    ("gpg_keys", &[Level::Read, Level::Write]),
    ("interaction_limits", &[Level::Read, Level::Write]),
    ("issues", &[Level::Read, Level::Write]),
    ("members", &[Level::Read, Level::Write]),
    ("merge_queues", &[Level::Read, Level::Write]),
    ("metadata", &[Level::Read, Level::Write]),
    ("organization_administration", &[Level::Read, Level::Write]),
    ("organization_announcement_banners", &[Level::Read, Level::Write]),
    ("organization_copilot_agent_settings", &[Level::Read, Level::Write]),
    ("organization_copilot_seat_management", &[Level::Read, Level::Write]),
    ("organization_custom_org_roles", &[Level::Read, Level::Write]),
    ("organization_custom_properties", &[Level::Read, Level::Write, Level::Admin]),
    ("organization_custom_roles", &[Level::Read, Level::Write]),
    ("organization_events", &[Level::Read]),
    ("organization_hooks", &[Level::Read, Level::Write]),
    ("organization_packages", &[Level::Read, Level::Write]),
    ("organization_personal_access_token_requests", &[Level::Read, Level::Write]),
    ("organization_personal_access_tokens", &[Level::Read, Level::Write]),
    ("organization_plan", &[Level::Read]),
    ("organization_projects", &[Level::Read, Level::Write, Level::Admin]),
    ("organization_secrets", &[Level::Read, Level::Write]),
    ("organization_self_hosted_runners", &[Level::Read, Level::Write]),
    ("organization_user_blocking", &[Level::Read, Level::Write]),
    ("packages", &[Level::Read, Level::Write]),
    ("pages", &[Level::Read, Level::Write]),
    ("profile", &[Level::Write]),
    ("pull_requests", &[Level::Read, Level::Write]),
    ("repository_custom_properties", &[Level::Read, Level::Write]),
    ("repository_hooks", &[Level::Read, Level::Write]),
    ("repository_projects", &[Level::Read, Level::Write, Level::Admin]),
    ("secret_scanning_alerts", &[Level::Read, Level::Write]),
    ("secrets", &[Level::Read, Level::Write]),
    ("security_events", &[Level::Read, Level::Write]),
    ("single_file", &[Level::Read, Level::Write]),
    ("starring", &[Level::Read, Level::Write]),
    ("statuses", &[Level::Read, Level::Write]),
    ("vulnerability_alerts", &[Level::Read, Level::Write]),
    ("workflows", &[Level::Write]),
];

/// The levels GitHub accepts for `name`, or `None` for a permission it does not know.
pub(crate) fn levels(name: &str) -> Option<&'static [Level]> {
    PERMISSIONS.binary_search_by(|(n, _)| n.cmp(&name)).ok().map(|i| PERMISSIONS[i].1)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn table_is_sorted_and_unique() {
        assert!(PERMISSIONS.windows(2).all(|w| w[0].0 < w[1].0));
    }

    #[test]
    fn known_and_unknown_names() {
        assert_eq!(levels("contents"), Some(&[Level::Read, Level::Write][..]));
        assert_eq!(levels("workflows"), Some(&[Level::Write][..]));
        assert_eq!(levels("organization_projects"), Some(&[Level::Read, Level::Write, Level::Admin][..]));
        assert_eq!(levels("pull_request"), None);
        assert_eq!(levels(""), None);
    }
}
