//! A stateful fake GitHub on loopback, for testing the broker's GitHub App and the agents'
//! verifier with their real clients (octocrab, reqwest, `git`), the way rust-lang/bors tests
//! itself: an axum server on `127.0.0.1:0` in front of an in-memory GitHub whose repositories
//! are real bare git repositories.
//!
//! Everything a client sends is checked against GitHub's own OpenAPI description, and so is
//! everything the fake answers; [`FakeGitHub::assert_conforms`] fails a test that called GitHub
//! in a way GitHub does not document (or caught the fake drifting from GitHub).
//!
//! Layout:
//! - [`model`]: accounts, tokens, repositories, pull requests, comments, reviews, check runs
//!   (with their history), reactions, the App and its installations.
//! - [`git`]: the bare repositories: commits with the `git` CLI, and smart HTTP through
//!   `git http-backend` at `{url}/{owner}/{repo}.git`.
//! - `server`: one handler matches each request to GitHub's operation, checks it, answers
//!   from the model and checks the answer; the operations by resource (`app`, `repos`,
//!   `pulls`, `issues`, `checks`) and smart-HTTP git (`git_http`).
//! - [`openapi`]: the request and response checks against `openapi-subset.json`.
//! - [`jwt`]: the App's RS256 JWTs (sign as an App does; check as GitHub does).
//! - [`webhooks`]: GitHub's example payloads, signatures, headers and deliveries; `events`
//!   builds the deliveries model actions emit.
//! - `render`: the model as GitHub's JSON.
//!
//! ```no_run
//! # async fn example() {
//! use testbot_e2e::github::{FakeGitHub, Visibility};
//! let github = FakeGitHub::start_app().await;
//! github.create_repo("hpc-lab/app", Visibility::Private).await;
//! let installation = github.install("hpc-lab", &["hpc-lab/app"]).await;
//! let sha = github.commit("hpc-lab/app", "main", &[("src/lib.rs", "fn main() {}")], "Add lib").await;
//! // Point the App under test at `github.url` with `github.app_id` and
//! // `github.app_private_key_pem`; its webhooks come from `github.take_deliveries()` or, after
//! // `github.deliver_webhooks_to(Some(url))`, straight to its endpoint.
//! # let _ = (installation, sha);
//! github.assert_conforms();
//! # }
//! ```
//!
//! [`FakeGitHub::start`] keeps the older, smaller use: users given by token, each the admin or a
//! reader of some public repositories.
//!
//! Serving another operation: add its method and path to `OPERATIONS` in
//! `tests/fixtures/github/update.sh` and run it (the subset gains the operation and the schemas
//! it uses), write its handler in the `server` file of its resource, and add a row to the
//! dispatch table in `server/mod.rs`. Until then a call of it is a 404 and a violation.
//!
//! What the checks do not cover: headers (`Accept`, `X-GitHub-Api-Version`, rate-limit and
//! pagination headers are neither checked nor sent), pagination itself (lists come whole), and
//! GitHub's rules that its description does not state (who may do what is modelled by hand in
//! `model` and `server`).

mod events;
pub mod git;
pub mod jwt;
pub mod model;
pub mod openapi;
mod render;
mod server;
pub mod webhooks;

#[cfg(test)]
mod tests;

use std::collections::HashMap;
use std::path::PathBuf;
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime};

pub use model::{
    Account, CheckRun, CheckRunOutput, CheckRunState, Comment, CommitComment, Identity,
    Installation, Permission, PullRequest, Reaction, RecordedRequest, Repository, Review,
};
pub use webhooks::Delivery;

use model::{IssueEvent, Token, World};
use render::Render;

/// The App id of the fake's App.
pub const APP_ID: u64 = 424_242;

/// The secret the fake signs webhooks with.
pub const WEBHOOK_SECRET: &str = "fake-github-webhook-secret";

/// One user of the fake: their token, login, and the repositories they administer or can read.
#[derive(Clone, Debug)]
pub struct FakeUser {
    pub login: String,
    pub admin_of: Vec<String>,
    pub reader_of: Vec<String>,
}

/// Whether a repository is public or private.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Visibility {
    Public,
    Private,
}

/// A review's verdict.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ReviewState {
    Approved,
    ChangesRequested,
    Commented,
}

impl ReviewState {
    fn as_github(self) -> &'static str {
        match self {
            ReviewState::Approved => "APPROVED",
            ReviewState::ChangesRequested => "CHANGES_REQUESTED",
            ReviewState::Commented => "COMMENTED",
        }
    }
}

/// A delivery the fake sent to the webhook URL, and what came of it.
#[derive(Clone, Debug)]
pub struct SentDelivery {
    pub delivery: Delivery,
    /// The receiver's status, or why it could not be reached.
    pub status: Result<u16, String>,
}

#[derive(Default)]
pub(crate) struct Hooks {
    url: Option<String>,
    queued: Vec<Delivery>,
    sent: Vec<SentDelivery>,
}

/// What the server and the test handle share.
pub(crate) struct Shared {
    pub(crate) world: Mutex<World>,
    pub(crate) url: String,
    /// `GIT_PROJECT_ROOT`: repositories are at `{git_root}/{owner}/{name}.git`.
    pub(crate) git_root: PathBuf,
    scratch: PathBuf,
    pub(crate) hook_id: u64,
    webhook_secret: String,
    hooks: Arc<Mutex<Hooks>>,
}

impl Shared {
    /// Sends `deliveries` now when a webhook URL is set (in order), else queues them.
    async fn emit(&self, deliveries: Vec<Delivery>) {
        let url = self.hooks.lock().unwrap().url.clone();
        match url {
            Some(url) => {
                for delivery in deliveries {
                    let status = delivery
                        .send(&url, &self.webhook_secret)
                        .await
                        .map_err(|e| format!("{e:#}"));
                    self.hooks
                        .lock()
                        .unwrap()
                        .sent
                        .push(SentDelivery { delivery, status });
                }
            }
            None => self.hooks.lock().unwrap().queued.extend(deliveries),
        }
    }

    /// [`Shared::emit`] for a delivery a REST call caused: sent from a task, so that the call
    /// is answered first, as GitHub does.
    pub(crate) fn emit_in_background(&self, delivery: Delivery) {
        let hooks = self.hooks.clone();
        let url = hooks.lock().unwrap().url.clone();
        match url {
            Some(url) => {
                let secret = self.webhook_secret.clone();
                tokio::spawn(async move {
                    let status = delivery
                        .send(&url, &secret)
                        .await
                        .map_err(|e| format!("{e:#}"));
                    hooks
                        .lock()
                        .unwrap()
                        .sent
                        .push(SentDelivery { delivery, status });
                });
            }
            None => hooks.lock().unwrap().queued.push(delivery),
        }
    }
}

/// The fake GitHub: its URL (the REST API's base and the git host's), its App, and the model
/// behind it. The server stops when this is dropped.
pub struct FakeGitHub {
    /// The base URL of the REST API (as `https://api.github.com`) and of git.
    pub url: String,
    /// The App's id (the `iss` of its JWTs).
    pub app_id: u64,
    /// The App's private key, PKCS#1 PEM as GitHub hands them out.
    pub app_private_key_pem: String,
    /// The secret webhooks are signed with.
    pub webhook_secret: String,
    shared: Arc<Shared>,
    shutdown: tokio_util::sync::CancellationToken,
    _dir: tempfile::TempDir,
}

impl Drop for FakeGitHub {
    fn drop(&mut self) {
        // Graceful: idle keep-alive connections close too, instead of outliving the fake.
        self.shutdown.cancel();
    }
}

/// The id the fake gives repository `full_name` (stable, and unlike the test issuer's default).
pub fn repository_id(full_name: &str) -> u64 {
    700_000 + full_name.bytes().map(u64::from).sum::<u64>()
}

/// The id the fake gives the account `owner`.
pub fn owner_id(owner: &str) -> u64 {
    70_000 + owner.bytes().map(u64::from).sum::<u64>()
}

/// The commits a push from `before` to `after` brings (as GitHub lists them: at most 20, the
/// newest last; a new branch lists its head only), with the files each changed.
async fn pushed_commits(
    git_dir: &std::path::Path,
    before: Option<&str>,
    after: &str,
) -> Vec<(git::CommitInfo, Vec<git::FileChange>)> {
    let shas = match before {
        Some(before) => git::commits_between(git_dir, before, after)
            .await
            .unwrap_or_default(),
        None => vec![after.to_string()],
    };
    let mut commits = Vec::new();
    for sha in shas.iter().rev().take(20).rev() {
        let Ok(info) = git::commit_info(git_dir, sha).await else {
            continue;
        };
        let files = git::changed_files(git_dir, info.parents.first().map(String::as_str), sha)
            .await
            .unwrap_or_default();
        commits.push((info, files));
    }
    commits
}

impl FakeGitHub {
    /// Serves `users`, keyed by token: each administers the repositories in `admin_of` and reads
    /// those in `reader_of` (all public; created empty).
    pub async fn start(users: HashMap<String, FakeUser>) -> FakeGitHub {
        let github = FakeGitHub::start_app().await;
        for (token, user) in users {
            github
                .shared
                .world
                .lock()
                .unwrap()
                .tokens
                .insert(token, Token::User(user.login.clone()));
            github.shared.world.lock().unwrap().account(&user.login);
            for (repos, permission) in [
                (&user.admin_of, Permission::Admin),
                (&user.reader_of, Permission::Read),
            ] {
                for repo in repos {
                    if github.shared.world.lock().unwrap().repo(repo).is_none() {
                        github.create_repo(repo, Visibility::Public).await;
                    }
                    github.set_permission(repo, &user.login, permission);
                }
            }
        }
        github
    }

    /// An empty GitHub with one App ([`APP_ID`], the fixture key), not installed anywhere.
    pub async fn start_app() -> FakeGitHub {
        testbot_proto::client::install_crypto_provider();
        let dir = tempfile::tempdir().expect("a temporary directory");
        let git_root = dir.path().join("git");
        let scratch = dir.path().join("scratch");
        std::fs::create_dir_all(&git_root).unwrap();
        std::fs::create_dir_all(&scratch).unwrap();
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let url = format!("http://{}", listener.local_addr().unwrap());
        let public_key = jwt::pem_to_der(jwt::APP_PUBLIC_KEY_PEM);
        let shared = Arc::new(Shared {
            world: Mutex::new(World::new(APP_ID, public_key)),
            url: url.clone(),
            git_root,
            scratch,
            hook_id: 55_500_001,
            webhook_secret: WEBHOOK_SECRET.into(),
            hooks: Arc::default(),
        });
        let app = axum::Router::new()
            .fallback(server::handler)
            .layer(axum::extract::DefaultBodyLimit::disable())
            .with_state(shared.clone());
        let shutdown = tokio_util::sync::CancellationToken::new();
        let stopped = shutdown.clone().cancelled_owned();
        tokio::spawn(async move {
            let _ = axum::serve(listener, app)
                .with_graceful_shutdown(stopped)
                .await;
        });
        let github = FakeGitHub {
            url,
            app_id: APP_ID,
            app_private_key_pem: jwt::APP_PRIVATE_KEY_PEM.into(),
            webhook_secret: WEBHOOK_SECRET.into(),
            shared,
            shutdown,
            _dir: dir,
        };
        let app_owner = github.world().app_owner.clone();
        github.create_org(&app_owner);
        github
    }

    fn world(&self) -> std::sync::MutexGuard<'_, World> {
        self.shared.world.lock().unwrap()
    }

    fn repo_or_panic(&self, repo: &str) -> Repository {
        self.world()
            .repo(repo)
            .cloned()
            .unwrap_or_else(|| panic!("the fake has no repository {repo}"))
    }

    // ---- accounts and tokens ----

    /// A token of user `login` (created when new); the same token each time.
    pub fn user_token(&self, login: &str) -> String {
        let token = format!("ghu_fake_{login}");
        let mut world = self.world();
        world.account(login);
        world
            .tokens
            .insert(token.clone(), Token::User(login.to_string()));
        token
    }

    /// Makes `login` an organization account (created when new).
    pub fn create_org(&self, login: &str) {
        let mut world = self.world();
        world.account(login);
        world.accounts.get_mut(login).expect("just created").kind = "Organization";
    }

    /// A read-only token, as a site's verifier holds: reads public repositories and the private
    /// ones in `repos` (all when empty); every write gets 403.
    pub fn read_only_token(&self, repos: &[&str]) -> String {
        let mut world = self.world();
        let token = format!("ghr_fake_{}", world.next_id());
        let repositories =
            (!repos.is_empty()).then(|| repos.iter().map(|r| r.to_string()).collect());
        world.tokens.insert(
            token.clone(),
            Token::ReadOnly {
                label: token.clone(),
                repositories,
            },
        );
        token
    }

    /// How long installation access tokens minted from now on live (GitHub: one hour).
    pub fn set_token_lifetime(&self, lifetime: Duration) {
        self.world().token_lifetime = lifetime;
    }

    /// Expires every installation access token minted so far.
    pub fn expire_installation_tokens(&self) {
        let past = SystemTime::now() - Duration::from_secs(1);
        for token in self.world().tokens.values_mut() {
            if let Token::Installation { expires_at, .. } = token {
                *expires_at = past;
            }
        }
    }

    /// A JWT of the fake's App, valid now (what an App signs to call `/app/...`).
    pub fn app_jwt(&self) -> String {
        jwt::app_jwt_now(self.app_id, &self.app_private_key_pem)
    }

    /// The login the App acts as (`<slug>[bot]`): the author of its comments.
    pub fn app_bot_login(&self) -> String {
        self.world().bot_login()
    }

    /// Makes the next call of `method` `template` (GitHub's path template, as in
    /// `/repos/{owner}/{repo}/check-runs`) fail with `status` and GitHub's error shape, without
    /// touching the model: for testing how a client copes with GitHub's 5xx, rate limits and
    /// the like. Call it again to fail more calls.
    pub fn fail_next(&self, method: &str, template: &str, status: u16) {
        assert!(
            openapi::github()
                .operation_by_template(method, template)
                .is_some(),
            "the fake serves no {method} {template}"
        );
        self.world().injected_failures.push((
            method.to_ascii_uppercase(),
            template.to_string(),
            status,
        ));
    }

    // ---- repositories and git ----

    /// Creates `full_name` (`owner/name`) with one commit (a README) on its default branch
    /// `main`; the owner is its admin.
    pub async fn create_repo(&self, full_name: &str, visibility: Visibility) -> Repository {
        self.create_repo_inner(full_name, visibility, None).await
    }

    async fn create_repo_inner(
        &self,
        full_name: &str,
        visibility: Visibility,
        parent: Option<&Repository>,
    ) -> Repository {
        let (owner, name) = full_name
            .split_once('/')
            .expect("a repository is named owner/name");
        let git_dir = self.shared.git_root.join(owner).join(format!("{name}.git"));
        match parent {
            None => {
                git::init_bare(&git_dir, "main").await.expect("git init");
                git::commit_files(
                    &git_dir,
                    &self.shared.scratch,
                    "main",
                    None,
                    &[("README.md", &format!("# {name}\n"))],
                    "Initial commit",
                )
                .await
                .expect("the first commit");
            }
            Some(parent) => {
                git::init_bare(&git_dir, &parent.default_branch)
                    .await
                    .expect("git init");
                git::git(
                    &git_dir,
                    &[
                        "fetch",
                        "--quiet",
                        &parent.git_dir.to_string_lossy(),
                        "+refs/heads/*:refs/heads/*",
                        "+refs/tags/*:refs/tags/*",
                    ],
                    None,
                )
                .await
                .expect("copying the parent into the fork");
            }
        }
        let mut world = self.world();
        world.account(owner);
        let id = repository_id(full_name);
        assert!(
            !world.repos.values().any(|r| r.id == id),
            "two repositories of the fake would share id {id}: name {full_name} differently"
        );
        let repo = Repository {
            id,
            owner: owner.to_string(),
            name: name.to_string(),
            private: visibility == Visibility::Private,
            default_branch: parent
                .map(|p| p.default_branch.clone())
                .unwrap_or("main".into()),
            parent: parent.map(Repository::full_name),
            git_dir,
            created_at: SystemTime::now(),
            permissions: HashMap::new(),
            next_number: 1,
        };
        world
            .repos
            .insert(full_name.to_ascii_lowercase(), repo.clone());
        repo
    }

    /// Forks `repo` into `owner`'s account (same name, same visibility, all branches and tags).
    pub async fn fork(&self, repo: &str, owner: &str) -> Repository {
        let parent = self.repo_or_panic(repo);
        let name = format!("{owner}/{}", parent.name);
        let visibility = if parent.private {
            Visibility::Private
        } else {
            Visibility::Public
        };
        self.create_repo_inner(&name, visibility, Some(&parent))
            .await
    }

    /// The repository as the model has it now.
    pub fn repository(&self, repo: &str) -> Repository {
        self.repo_or_panic(repo)
    }

    /// Where `repo` is served over smart HTTP (its `clone_url`).
    pub fn git_url(&self, repo: &str) -> String {
        format!("{}/{}.git", self.url, self.repo_or_panic(repo).full_name())
    }

    /// Gives `login` `permission` on `repo` (`Permission::None` takes it away).
    pub fn set_permission(&self, repo: &str, login: &str, permission: Permission) {
        let mut world = self.world();
        world.account(login);
        let repo = world
            .repo_mut(repo)
            .unwrap_or_else(|| panic!("the fake has no repository {repo}"));
        repo.permissions.insert(login.to_string(), permission);
    }

    /// The commit `rev` names in `repo`.
    pub async fn resolve(&self, repo: &str, rev: &str) -> Option<String> {
        git::resolve(&self.repo_or_panic(repo).git_dir, rev).await
    }

    /// Commits `files` (path, content) to `branch` of `repo` (created from the default branch
    /// when absent) as the owner pushing it; emits `push` (and `pull_request` synchronize for pull requests from the
    /// branch). The new commit's sha.
    pub async fn commit(
        &self,
        repo: &str,
        branch: &str,
        files: &[(&str, &str)],
        message: &str,
    ) -> String {
        let repository = self.repo_or_panic(repo);
        let before = self.resolve(repo, &format!("refs/heads/{branch}")).await;
        let start = format!("refs/heads/{}", repository.default_branch);
        let sha = git::commit_files(
            &repository.git_dir,
            &self.shared.scratch,
            branch,
            Some(&start),
            files,
            message,
        )
        .await
        .expect("committing");
        self.pushed(
            &repository,
            &format!("refs/heads/{branch}"),
            before,
            &sha,
            false,
        )
        .await;
        sha
    }

    /// Creates `branch` at `sha` in `repo`; emits `push`.
    pub async fn create_branch(&self, repo: &str, branch: &str, sha: &str) {
        let repository = self.repo_or_panic(repo);
        git::update_ref(&repository.git_dir, &format!("refs/heads/{branch}"), sha)
            .await
            .expect("creating the branch");
        self.pushed(
            &repository,
            &format!("refs/heads/{branch}"),
            None,
            sha,
            false,
        )
        .await;
    }

    /// Creates tag `tag` at `sha` in `repo`; emits `push`.
    pub async fn create_tag(&self, repo: &str, tag: &str, sha: &str) {
        let repository = self.repo_or_panic(repo);
        git::update_ref(&repository.git_dir, &format!("refs/tags/{tag}"), sha)
            .await
            .expect("creating the tag");
        self.pushed(&repository, &format!("refs/tags/{tag}"), None, sha, false)
            .await;
    }

    /// Moves `branch` of `repo` to `sha`, whatever it pointed at (a force-push); emits `push`
    /// with `forced` (and `pull_request` synchronize for pull requests from the branch).
    pub async fn force_push(&self, repo: &str, branch: &str, sha: &str) {
        let repository = self.repo_or_panic(repo);
        let before = self.resolve(repo, &format!("refs/heads/{branch}")).await;
        git::update_ref(&repository.git_dir, &format!("refs/heads/{branch}"), sha)
            .await
            .expect("force-pushing");
        self.pushed(
            &repository,
            &format!("refs/heads/{branch}"),
            before,
            sha,
            true,
        )
        .await;
    }

    /// After `reference` of `repository` moved: `refs/pull/N/head` follows open pull requests
    /// from it, and the webhooks go out.
    async fn pushed(
        &self,
        repository: &Repository,
        reference: &str,
        before: Option<String>,
        after: &str,
        forced: bool,
    ) {
        const ZERO: &str = "0000000000000000000000000000000000000000";
        let full = repository.full_name();
        let before_sha = before.clone().unwrap_or(ZERO.into());
        let commits = pushed_commits(&repository.git_dir, before.as_deref(), after).await;
        let mut deliveries = {
            let world = self.world();
            let update = events::RefUpdate {
                reference,
                before: &before_sha,
                after,
                pusher: &repository.owner,
                forced,
                commits: &commits,
            };
            vec![events::push(&self.shared, &world, &full, &update)]
        };
        let branch = reference
            .strip_prefix("refs/heads/")
            .unwrap_or_default()
            .to_string();
        let pulls: Vec<PullRequest> = self
            .world()
            .pulls
            .values()
            .filter(|p| p.open && p.head_repo.eq_ignore_ascii_case(&full) && p.head_ref == branch)
            .cloned()
            .collect();
        for pr in pulls {
            let base = self.repo_or_panic(&pr.repo);
            git::fetch_ref(
                &base.git_dir,
                &repository.git_dir,
                reference,
                &format!("refs/pull/{}/head", pr.number),
            )
            .await
            .expect("updating refs/pull/N/head");
            let base_sha = git::resolve(&base.git_dir, &format!("refs/heads/{}", pr.base_ref))
                .await
                .unwrap_or_default();
            let stats = git::pull_stats(&base.git_dir, &base_sha, after)
                .await
                .unwrap_or_default();
            let mut world = self.world();
            let Some(stored) = world.pulls.get_mut(&(pr.repo.clone(), pr.number)) else {
                continue;
            };
            stored.head_sha = after.to_string();
            stored.base_sha = base_sha;
            stored.stats = stats;
            stored.updated_at = SystemTime::now();
            let stored = stored.clone();
            deliveries.push(events::pull_request(
                &self.shared,
                &world,
                &stored,
                "synchronize",
                &repository.owner,
                Some(&before_sha),
            ));
        }
        self.shared.emit(deliveries).await;
    }

    // ---- pull requests ----

    /// Opens a pull request on `base_repo` from `head_branch` of `head_repo` (the base itself or
    /// a fork of it) into `base_branch`, by `author`; `refs/pull/N/head` appears in the base.
    /// Emits `pull_request` opened.
    pub async fn open_pull_request(
        &self,
        base_repo: &str,
        base_branch: &str,
        head_repo: &str,
        head_branch: &str,
        author: &str,
        title: &str,
    ) -> PullRequest {
        let base = self.repo_or_panic(base_repo);
        let head = self.repo_or_panic(head_repo);
        let head_sha = git::resolve(&head.git_dir, &format!("refs/heads/{head_branch}"))
            .await
            .unwrap_or_else(|| panic!("{head_repo} has no branch {head_branch}"));
        let base_sha = git::resolve(&base.git_dir, &format!("refs/heads/{base_branch}"))
            .await
            .unwrap_or_else(|| panic!("{base_repo} has no branch {base_branch}"));
        let number = {
            let mut world = self.world();
            let repo = world.repo_mut(base_repo).expect("checked above");
            let number = repo.next_number;
            repo.next_number += 1;
            number
        };
        git::fetch_ref(
            &base.git_dir,
            &head.git_dir,
            &format!("refs/heads/{head_branch}"),
            &format!("refs/pull/{number}/head"),
        )
        .await
        .expect("creating refs/pull/N/head");
        let stats = git::pull_stats(&base.git_dir, &base_sha, &head_sha)
            .await
            .expect("the pull request's head shares history with its base");
        let delivery = {
            let mut world = self.world();
            world.account(author);
            let now = SystemTime::now();
            let pr = PullRequest {
                id: world.next_id(),
                number,
                repo: base.full_name(),
                title: title.to_string(),
                body: String::new(),
                author: author.to_string(),
                head_repo: head.full_name(),
                head_ref: head_branch.to_string(),
                head_sha,
                base_ref: base_branch.to_string(),
                base_sha,
                open: true,
                merged: false,
                merge_commit_sha: None,
                merged_by: None,
                stats,
                labels: Vec::new(),
                created_at: now,
                updated_at: now,
                closed_at: None,
            };
            world.pulls.insert((pr.repo.clone(), number), pr.clone());
            events::pull_request(&self.shared, &world, &pr, "opened", author, None)
        };
        self.shared.emit(vec![delivery]).await;
        self.pull_request(base_repo, number)
    }

    /// Commits `files` to the pull request's head branch (in its head repository); emits `push`
    /// and `pull_request` synchronize. The new head sha.
    pub async fn push_to_pull_request(
        &self,
        repo: &str,
        number: u64,
        files: &[(&str, &str)],
        message: &str,
    ) -> String {
        let pr = self.pull_request(repo, number);
        self.commit(&pr.head_repo, &pr.head_ref, files, message)
            .await
    }

    /// The pull request as the model has it now.
    pub fn pull_request(&self, repo: &str, number: u64) -> PullRequest {
        let full = self.repo_or_panic(repo).full_name();
        self.world()
            .pulls
            .get(&(full, number))
            .cloned()
            .unwrap_or_else(|| panic!("{repo} has no pull request #{number}"))
    }

    /// Merges the pull request with a merge commit on its base branch, by `merged_by`; emits
    /// `pull_request` closed (merged) and the base's `push`. The merge commit's sha.
    pub async fn merge(&self, repo: &str, number: u64, merged_by: &str) -> String {
        let pr = self.pull_request(repo, number);
        assert!(pr.open, "{repo}#{number} is not open");
        let base = self.repo_or_panic(repo);
        let reference = format!("refs/heads/{}", pr.base_ref);
        let base_tip = git::resolve(&base.git_dir, &reference)
            .await
            .expect("the base branch exists");
        let message = format!(
            "Merge pull request #{number} from {}\n\n{}",
            pr.head_ref, pr.title
        );
        let sha = git::merge_commit(&base.git_dir, &base_tip, &pr.head_sha, &message)
            .await
            .expect("merging");
        let commits = pushed_commits(&base.git_dir, Some(&base_tip), &sha).await;
        git::update_ref(&base.git_dir, &reference, &sha)
            .await
            .expect("moving the base branch");
        let deliveries = {
            let mut world = self.world();
            world.account(merged_by);
            let stored = world
                .pulls
                .get_mut(&(pr.repo.clone(), number))
                .expect("exists");
            let now = SystemTime::now();
            stored.open = false;
            stored.merged = true;
            stored.merge_commit_sha = Some(sha.clone());
            stored.merged_by = Some(merged_by.to_string());
            stored.closed_at = Some(now);
            stored.updated_at = now;
            let stored = stored.clone();
            vec![
                events::pull_request(&self.shared, &world, &stored, "closed", merged_by, None),
                events::push(
                    &self.shared,
                    &world,
                    &pr.repo,
                    &events::RefUpdate {
                        reference: &reference,
                        before: &base_tip,
                        after: &sha,
                        pusher: merged_by,
                        forced: false,
                        commits: &commits,
                    },
                ),
            ]
        };
        self.shared.emit(deliveries).await;
        sha
    }

    // ---- conversation ----

    /// `author` comments `body` on pull request `number`; emits `issue_comment` created.
    pub async fn comment(&self, repo: &str, number: u64, author: &str, body: &str) -> Comment {
        let full = self.pull_request(repo, number).repo;
        let (comment, delivery) = {
            let mut world = self.world();
            world.account(author);
            let now = SystemTime::now();
            let comment = Comment {
                id: world.next_id(),
                repo: full,
                issue_number: number,
                author: author.into(),
                body: body.into(),
                created_at: now,
                updated_at: now,
            };
            world.comments.insert(comment.id, comment.clone());
            let delivery = events::issue_comment(&self.shared, &world, &comment, "created", None);
            (comment, delivery)
        };
        self.shared.emit(vec![delivery]).await;
        comment
    }

    /// `by` adds `label` to pull request `number`; emits `pull_request` labeled. (Adding a
    /// label takes triage permission on GitHub; the fake lets anyone, so tests can show who
    /// the App and the agents accept.)
    pub async fn add_label(&self, repo: &str, number: u64, label: &str, by: &str) {
        self.change_label(repo, number, label, by, "labeled").await;
    }

    /// `by` removes `label` from pull request `number`; emits `pull_request` unlabeled.
    pub async fn remove_label(&self, repo: &str, number: u64, label: &str, by: &str) {
        self.change_label(repo, number, label, by, "unlabeled")
            .await;
    }

    async fn change_label(
        &self,
        repo: &str,
        number: u64,
        label: &str,
        by: &str,
        event: &'static str,
    ) {
        let full = self.pull_request(repo, number).repo;
        let delivery = {
            let mut world = self.world();
            world.account(by);
            let pr = world
                .pulls
                .get_mut(&(full.clone(), number))
                .expect("checked above");
            if event == "labeled" {
                assert!(
                    !pr.labels.iter().any(|l| l == label),
                    "{repo}#{number} has {label} already"
                );
                pr.labels.push(label.to_string());
            } else {
                assert!(
                    pr.labels.iter().any(|l| l == label),
                    "{repo}#{number} has no {label}"
                );
                pr.labels.retain(|l| l != label);
            }
            pr.updated_at = SystemTime::now();
            let pr = pr.clone();
            let id = world.next_id();
            world.issue_events.insert(
                id,
                IssueEvent {
                    id,
                    repo: full,
                    issue_number: number,
                    actor: by.to_string(),
                    event,
                    label: label.to_string(),
                    created_at: SystemTime::now(),
                },
            );
            let mut delivery = events::pull_request(&self.shared, &world, &pr, event, by, None);
            delivery.payload["label"] =
                Render::new(&self.shared.url, &world).label(&pr.repo, label);
            delivery
        };
        self.shared.emit(vec![delivery]).await;
    }

    /// Its author edits comment `comment_id` to `body`; emits `issue_comment` edited.
    pub async fn edit_comment(&self, comment_id: u64, body: &str) -> Comment {
        let (comment, delivery) = {
            let mut world = self.world();
            let stored = world
                .comments
                .get_mut(&comment_id)
                .unwrap_or_else(|| panic!("no comment {comment_id}"));
            let before = std::mem::replace(&mut stored.body, body.to_string());
            stored.updated_at = SystemTime::now();
            let comment = stored.clone();
            let delivery =
                events::issue_comment(&self.shared, &world, &comment, "edited", Some(&before));
            (comment, delivery)
        };
        self.shared.emit(vec![delivery]).await;
        comment
    }

    /// `author` reviews pull request `number` at its head; emits `pull_request_review` submitted.
    pub async fn review(
        &self,
        repo: &str,
        number: u64,
        author: &str,
        state: ReviewState,
        body: &str,
    ) -> Review {
        let pr = self.pull_request(repo, number);
        let (review, delivery) = {
            let mut world = self.world();
            world.account(author);
            let review = Review {
                id: world.next_id(),
                repo: pr.repo.clone(),
                number,
                author: author.into(),
                state: state.as_github().into(),
                body: body.into(),
                commit_id: pr.head_sha.clone(),
                submitted_at: SystemTime::now(),
            };
            world.reviews.insert(review.id, review.clone());
            let delivery = events::review_submitted(&self.shared, &world, &review);
            (review, delivery)
        };
        self.shared.emit(vec![delivery]).await;
        review
    }

    // ---- the App ----

    /// Installs the App on `account` for `repos`; emits `installation` created.
    pub async fn install(&self, account: &str, repos: &[&str]) -> Installation {
        let (installation, delivery) = {
            let mut world = self.world();
            world.account(account);
            let repositories = repos
                .iter()
                .map(|r| {
                    world
                        .repo(r)
                        .unwrap_or_else(|| panic!("the fake has no repository {r}"))
                        .full_name()
                })
                .collect();
            let installation = Installation {
                id: world.next_id(),
                account: account.into(),
                repositories,
                created_at: SystemTime::now(),
            };
            world
                .installations
                .insert(installation.id, installation.clone());
            let delivery =
                events::installation(&self.shared, &world, &installation, "created", account);
            (installation, delivery)
        };
        self.shared.emit(vec![delivery]).await;
        installation
    }

    /// Uninstalls installation `id` (its tokens stop working); emits `installation` deleted.
    pub async fn uninstall(&self, id: u64) {
        let delivery = {
            let mut world = self.world();
            let installation = world
                .installations
                .get(&id)
                .cloned()
                .unwrap_or_else(|| panic!("no installation {id}"));
            let delivery = events::installation(
                &self.shared,
                &world,
                &installation,
                "deleted",
                &installation.account,
            );
            world.installations.remove(&id);
            delivery
        };
        self.shared.emit(vec![delivery]).await;
    }

    /// `sender` presses "Re-run" on check run `id`; emits `check_run` rerequested.
    pub async fn rerequest_check_run(&self, id: u64, sender: &str) {
        let delivery = {
            let world = self.world();
            let run = world
                .check_runs
                .get(&id)
                .unwrap_or_else(|| panic!("no check run {id}"));
            events::check_run(&self.shared, &world, run, "rerequested", sender, None)
        };
        self.shared.emit(vec![delivery]).await;
    }

    /// `sender` presses the button `identifier` of check run `id`; emits `check_run`
    /// requested_action.
    pub async fn request_check_run_action(&self, id: u64, identifier: &str, sender: &str) {
        let delivery = {
            let world = self.world();
            let run = world
                .check_runs
                .get(&id)
                .unwrap_or_else(|| panic!("no check run {id}"));
            let offered = run
                .current()
                .actions
                .iter()
                .any(|a| a["identifier"] == identifier);
            assert!(offered, "check run {id} has no button {identifier}");
            events::check_run(
                &self.shared,
                &world,
                run,
                "requested_action",
                sender,
                Some(identifier),
            )
        };
        self.shared.emit(vec![delivery]).await;
    }

    /// Emits `ping`, as GitHub does when the webhook is set up.
    pub async fn ping(&self) {
        let delivery = events::ping(&self.shared, &self.world());
        self.shared.emit(vec![delivery]).await;
    }

    // ---- webhooks ----

    /// Where webhooks go: `Some(url)` sends each as it happens (model actions wait for the
    /// receiver's answer, REST calls do not); `None` (the default) queues them for
    /// [`FakeGitHub::take_deliveries`].
    pub fn deliver_webhooks_to(&self, url: Option<&str>) {
        self.shared.hooks.lock().unwrap().url = url.map(str::to_string);
    }

    /// The queued deliveries, oldest first (the queue is emptied).
    pub fn take_deliveries(&self) -> Vec<Delivery> {
        std::mem::take(&mut self.shared.hooks.lock().unwrap().queued)
    }

    /// The deliveries sent to the webhook URL so far, and what the receiver answered.
    pub fn sent_deliveries(&self) -> Vec<SentDelivery> {
        self.shared.hooks.lock().unwrap().sent.clone()
    }

    /// Sends `delivery` to `url`, signed with the webhook secret; the receiver's status.
    pub async fn send(&self, delivery: &Delivery, url: &str) -> anyhow::Result<u16> {
        delivery.send(url, &self.webhook_secret).await
    }

    // ---- inspectors ----

    /// The check runs on `repo`, oldest first, each with its history.
    pub fn check_runs(&self, repo: &str) -> Vec<CheckRun> {
        let full = self.repo_or_panic(repo).full_name();
        self.world()
            .check_runs
            .values()
            .filter(|r| r.repo == full)
            .cloned()
            .collect()
    }

    /// The comments on issue or pull request `number` of `repo`, oldest first.
    pub fn comments(&self, repo: &str, number: u64) -> Vec<Comment> {
        let full = self.repo_or_panic(repo).full_name();
        self.world()
            .comments
            .values()
            .filter(|c| c.repo == full && c.issue_number == number)
            .cloned()
            .collect()
    }

    /// The comments on commits of `repo`, oldest first.
    pub fn commit_comments(&self, repo: &str) -> Vec<CommitComment> {
        let full = self.repo_or_panic(repo).full_name();
        self.world()
            .commit_comments
            .values()
            .filter(|c| c.repo == full)
            .cloned()
            .collect()
    }

    /// The reactions on comment `comment_id`, oldest first.
    pub fn reactions(&self, comment_id: u64) -> Vec<Reaction> {
        self.world()
            .reactions
            .values()
            .filter(|r| r.comment_id == comment_id)
            .cloned()
            .collect()
    }

    /// The reviews of pull request `number` of `repo`, oldest first.
    pub fn reviews(&self, repo: &str, number: u64) -> Vec<Review> {
        let full = self.repo_or_panic(repo).full_name();
        self.world()
            .reviews
            .values()
            .filter(|r| r.repo == full && r.number == number)
            .cloned()
            .collect()
    }

    /// Every request received so far (REST and git), oldest first.
    pub fn requests(&self) -> Vec<RecordedRequest> {
        self.world().requests.clone()
    }

    /// What went against GitHub's description so far: requests of operations GitHub does not
    /// have, parameters or bodies it would refuse, and answers of the fake that break the
    /// documented response schema.
    pub fn violations(&self) -> Vec<String> {
        self.world().violations.clone()
    }

    /// Panics listing every violation, if there is any.
    #[track_caller]
    pub fn assert_conforms(&self) {
        let violations = self.violations();
        assert!(
            violations.is_empty(),
            "{} call(s) to the fake GitHub went against GitHub's OpenAPI description:\n- {}",
            violations.len(),
            violations.join("\n- ")
        );
    }
}
