//! The model as GitHub's JSON: the fields GitHub's OpenAPI description requires (and octocrab's
//! models read), with URLs under the fake's own base URL.

use std::time::SystemTime;

use base64::Engine as _;
use serde_json::{Value, json};

use super::git::{CommitInfo, FileChange, TreeEntry};
use super::model::{
    Account, CheckRun, Comment, CommitComment, Installation, IssueEvent, PullRequest, Reaction,
    Repository, Review, World,
};

/// GitHub's time format, `2026-12-01T13:05:22Z`.
pub fn time(at: SystemTime) -> String {
    humantime::format_rfc3339_seconds(at).to_string()
}

fn node_id(kind: &str, id: u64) -> String {
    base64::engine::general_purpose::STANDARD.encode(format!("{kind}:{id}"))
}

pub struct Render<'a> {
    pub base: &'a str,
    pub world: &'a World,
}

impl<'a> Render<'a> {
    pub fn new(base: &'a str, world: &'a World) -> Render<'a> {
        Render { base, world }
    }

    pub fn account(&self, account: &Account) -> Value {
        let base = self.base;
        // A bot's login (`name[bot]`) is escaped in URLs, as GitHub does.
        let login = &account.login.replace('[', "%5B").replace(']', "%5D");
        let user = format!("{base}/users/{login}");
        json!({
            "login": account.login,
            "id": account.id,
            "node_id": node_id("User", account.id),
            "avatar_url": format!("{base}/avatars/{login}"),
            "gravatar_id": "",
            "url": user,
            "html_url": format!("{base}/{login}"),
            "followers_url": format!("{user}/followers"),
            "following_url": format!("{user}/following{{/other_user}}"),
            "gists_url": format!("{user}/gists{{/gist_id}}"),
            "starred_url": format!("{user}/starred{{/owner}}{{/repo}}"),
            "subscriptions_url": format!("{user}/subscriptions"),
            "organizations_url": format!("{user}/orgs"),
            "repos_url": format!("{user}/repos"),
            "events_url": format!("{user}/events{{/privacy}}"),
            "received_events_url": format!("{user}/received_events"),
            "type": account.kind,
            "user_view_type": "public",
            "site_admin": false,
        })
    }

    /// The account `login` (known or not).
    pub fn user(&self, login: &str) -> Value {
        let account = self
            .world
            .accounts
            .get(login)
            .cloned()
            .unwrap_or_else(|| Account {
                login: login.to_string(),
                id: super::owner_id(login),
                kind: if login.ends_with("[bot]") {
                    "Bot"
                } else {
                    "User"
                },
            });
        self.account(&account)
    }

    /// `GET /user`'s public-user.
    pub fn public_user(&self, login: &str) -> Value {
        let mut user = self.user(login);
        let created = time(SystemTime::UNIX_EPOCH + std::time::Duration::from_secs(1_600_000_000));
        super::webhooks::merge_into(
            &mut user,
            json!({
                "name": login, "company": null, "blog": "", "location": null, "email": null,
                "hireable": null, "bio": null, "public_repos": 0, "public_gists": 0,
                "followers": 0, "following": 0, "created_at": created, "updated_at": created,
            }),
        );
        user
    }

    pub fn repository(&self, repo: &Repository) -> Value {
        let base = self.base;
        let full = repo.full_name();
        let api = format!("{base}/repos/{full}");
        let owner = self.user(&repo.owner);
        let mut value = json!({
            "id": repo.id,
            "node_id": node_id("Repository", repo.id),
            "name": repo.name,
            "full_name": full,
            "owner": owner,
            "private": repo.private,
            "visibility": if repo.private { "private" } else { "public" },
            "html_url": format!("{base}/{full}"),
            "description": null,
            "fork": repo.parent.is_some(),
            "url": api,
            "clone_url": format!("{base}/{full}.git"),
            "git_url": format!("{base}/{full}.git"),
            "ssh_url": format!("git@localhost:{full}.git"),
            "svn_url": format!("{base}/{full}"),
            "mirror_url": null,
        });
        // Two literals: one would exceed `json!`'s recursion limit.
        super::webhooks::merge_into(
            &mut value,
            json!({
                "homepage": null,
                "language": null,
                "forks": 0, "forks_count": 0, "stargazers_count": 0, "watchers_count": 0,
                "watchers": 0, "size": 0, "open_issues": 0, "open_issues_count": 0,
                "network_count": 0, "subscribers_count": 0,
                "default_branch": repo.default_branch,
                "has_issues": true, "has_projects": false, "has_wiki": false, "has_pages": false,
                "has_downloads": false, "has_discussions": false,
                "archived": false, "disabled": false, "is_template": false,
                "license": null,
                "topics": [],
                "allow_forking": true,
                "web_commit_signoff_required": false,
                "pushed_at": time(repo.created_at),
                "created_at": time(repo.created_at),
                "updated_at": time(repo.created_at),
            }),
        );
        for (key, suffix) in [
            ("archive_url", "/{archive_format}{/ref}"),
            ("assignees_url", "/assignees{/user}"),
            ("blobs_url", "/git/blobs{/sha}"),
            ("branches_url", "/branches{/branch}"),
            ("collaborators_url", "/collaborators{/collaborator}"),
            ("comments_url", "/comments{/number}"),
            ("commits_url", "/commits{/sha}"),
            ("compare_url", "/compare/{base}...{head}"),
            ("contents_url", "/contents/{+path}"),
            ("contributors_url", "/contributors"),
            ("deployments_url", "/deployments"),
            ("downloads_url", "/downloads"),
            ("events_url", "/events"),
            ("forks_url", "/forks"),
            ("git_commits_url", "/git/commits{/sha}"),
            ("git_refs_url", "/git/refs{/sha}"),
            ("git_tags_url", "/git/tags{/sha}"),
            ("hooks_url", "/hooks"),
            ("issue_comment_url", "/issues/comments{/number}"),
            ("issue_events_url", "/issues/events{/number}"),
            ("issues_url", "/issues{/number}"),
            ("keys_url", "/keys{/key_id}"),
            ("labels_url", "/labels{/name}"),
            ("languages_url", "/languages"),
            ("merges_url", "/merges"),
            ("milestones_url", "/milestones{/number}"),
            (
                "notifications_url",
                "/notifications{?since,all,participating}",
            ),
            ("pulls_url", "/pulls{/number}"),
            ("releases_url", "/releases{/id}"),
            ("stargazers_url", "/stargazers"),
            ("statuses_url", "/statuses/{sha}"),
            ("subscribers_url", "/subscribers"),
            ("subscription_url", "/subscription"),
            ("tags_url", "/tags"),
            ("teams_url", "/teams"),
            ("trees_url", "/git/trees{/sha}"),
        ] {
            value[key] = json!(format!("{api}{suffix}"));
        }
        if let Some(parent) = repo.parent.as_deref().and_then(|p| self.world.repo(p)) {
            let mut parent_json = self.repository_simple(parent);
            parent_json["fork"] = json!(parent.parent.is_some());
            value["parent"] = parent_json.clone();
            value["source"] = parent_json;
        }
        value
    }

    /// A repository without `parent`/`source`, as nested objects carry it.
    pub fn repository_simple(&self, repo: &Repository) -> Value {
        let mut value = self.repository(repo);
        if let Some(object) = value.as_object_mut() {
            object.remove("parent");
            object.remove("source");
        }
        value
    }

    /// The repository with the `permissions` `login` has on it.
    pub fn repository_for(&self, repo: &Repository, login: Option<&str>) -> Value {
        let mut value = self.repository(repo);
        if let Some(login) = login {
            let p = repo.permission_of(login);
            use super::model::Permission as P;
            value["permissions"] = json!({
                "admin": p >= P::Admin, "maintain": p >= P::Maintain, "push": p >= P::Write,
                "triage": p >= P::Triage, "pull": p >= P::Read || !repo.private,
            });
        }
        value
    }

    pub fn commit(
        &self,
        repo: &Repository,
        info: &CommitInfo,
        files: Option<&[FileChange]>,
    ) -> Value {
        let (base, full) = (self.base, repo.full_name());
        let api = format!("{base}/repos/{full}");
        let person = |(name, email, date): &(String, String, String)| json!({"name": name, "email": email, "date": date});
        let mut value = json!({
            "url": format!("{api}/commits/{}", info.sha),
            "sha": info.sha,
            "node_id": node_id("Commit", sha_number(&info.sha)),
            "html_url": format!("{base}/{full}/commit/{}", info.sha),
            "comments_url": format!("{api}/commits/{}/comments", info.sha),
            "commit": {
                "url": format!("{api}/git/commits/{}", info.sha),
                "author": person(&info.author),
                "committer": person(&info.committer),
                "message": info.message,
                "comment_count": 0,
                "tree": {"sha": info.tree, "url": format!("{api}/git/trees/{}", info.tree)},
                "verification": {"verified": false, "reason": "unsigned", "payload": null, "signature": null, "verified_at": null},
            },
            "author": null,
            "committer": null,
            "parents": info.parents.iter().map(|p| json!({
                "sha": p, "url": format!("{api}/commits/{p}"), "html_url": format!("{base}/{full}/commit/{p}"),
            })).collect::<Vec<_>>(),
        });
        if let Some(files) = files {
            let (additions, deletions) = files
                .iter()
                .fold((0, 0), |(a, d), f| (a + f.additions, d + f.deletions));
            value["stats"] = json!({"additions": additions, "deletions": deletions, "total": additions + deletions});
            value["files"] = json!(
                files
                    .iter()
                    .map(|f| self.diff_entry(repo, &info.sha, f))
                    .collect::<Vec<_>>()
            );
        }
        value
    }

    pub fn diff_entry(&self, repo: &Repository, sha: &str, file: &FileChange) -> Value {
        let (base, full) = (self.base, repo.full_name());
        json!({
            "sha": file.sha,
            "filename": file.filename,
            "status": file.status,
            "additions": file.additions,
            "deletions": file.deletions,
            "changes": file.additions + file.deletions,
            "blob_url": format!("{base}/{full}/blob/{sha}/{}", file.filename),
            "raw_url": format!("{base}/{full}/raw/{sha}/{}", file.filename),
            "contents_url": format!("{base}/repos/{full}/contents/{}?ref={sha}", file.filename),
        })
    }

    pub fn pull_request(&self, pr: &PullRequest, simple: bool) -> Value {
        let base = self.base;
        let full = &pr.repo;
        let api = format!("{base}/repos/{full}");
        let n = pr.number;
        let url = format!("{api}/pulls/{n}");
        let html = format!("{base}/{full}/pull/{n}");
        let repo_json = |name: &str| self.world.repo(name).map(|r| self.repository_simple(r));
        let base_sha = pr.base_sha.clone();
        let side = |label_owner: &str, r: &str, sha: &str, repo: Option<Value>| {
            json!({
                "label": format!("{label_owner}:{r}"),
                "ref": r,
                "sha": sha,
                "user": self.user(label_owner),
                "repo": repo,
            })
        };
        let head_owner = pr.head_repo.split('/').next().unwrap_or_default();
        let base_owner = pr.repo.split('/').next().unwrap_or_default();
        let state = if pr.open { "open" } else { "closed" };
        let mut value = json!({
            "url": url,
            "id": pr.id,
            "node_id": node_id("PullRequest", pr.id),
            "html_url": html,
            "diff_url": format!("{html}.diff"),
            "patch_url": format!("{html}.patch"),
            "issue_url": format!("{api}/issues/{n}"),
            "commits_url": format!("{url}/commits"),
            "review_comments_url": format!("{url}/comments"),
            "review_comment_url": format!("{api}/pulls/comments{{/number}}"),
            "comments_url": format!("{api}/issues/{n}/comments"),
            "statuses_url": format!("{api}/statuses/{}", pr.head_sha),
            "number": n,
            "state": state,
            "locked": false,
            "title": pr.title,
            "user": self.user(&pr.author),
            "body": pr.body,
            "labels": pr.labels.iter().map(|l| self.label(&pr.repo, l)).collect::<Vec<_>>(),
            "milestone": null,
            "active_lock_reason": null,
            "created_at": time(pr.created_at),
            "updated_at": time(pr.updated_at),
            "closed_at": pr.closed_at.map(time),
            "merged_at": if pr.merged { pr.closed_at.map(time) } else { None },
            "merge_commit_sha": pr.merge_commit_sha,
            "assignee": null,
            "assignees": [],
            "requested_reviewers": [],
            "requested_teams": [],
            "head": side(head_owner, &pr.head_ref, &pr.head_sha, repo_json(&pr.head_repo)),
            "base": side(base_owner, &pr.base_ref, &base_sha, repo_json(&pr.repo)),
            "author_association": self.association(full, &pr.author),
            "auto_merge": null,
            "draft": false,
        });
        value["_links"] = json!({
                "self": {"href": url},
                "html": {"href": html},
                "issue": {"href": format!("{api}/issues/{n}")},
                "comments": {"href": format!("{api}/issues/{n}/comments")},
                "review_comments": {"href": format!("{url}/comments")},
                "review_comment": {"href": format!("{api}/pulls/comments{{/number}}")},
                "commits": {"href": format!("{url}/commits")},
                "statuses": {"href": format!("{api}/statuses/{}", pr.head_sha)},
        });
        if !simple {
            let comments = self
                .world
                .comments
                .values()
                .filter(|c| &c.repo == full && c.issue_number == n)
                .count();
            super::webhooks::merge_into(
                &mut value,
                json!({
                    "merged": pr.merged,
                    "mergeable": if pr.open { Some(true) } else { None },
                    "rebaseable": if pr.open { Some(true) } else { None },
                    "mergeable_state": if pr.open { "clean" } else { "unknown" },
                    "merged_by": pr.merged_by.as_deref().map(|l| self.user(l)),
                    "comments": comments,
                    "review_comments": 0,
                    "maintainer_can_modify": false,
                    "commits": pr.stats.commits,
                    "additions": pr.stats.additions,
                    "deletions": pr.stats.deletions,
                    "changed_files": pr.stats.changed_files,
                }),
            );
        }
        value
    }

    /// GitHub's `author_association` of `login` on `repo`.
    pub fn association(&self, repo: &str, login: &str) -> &'static str {
        match self.world.repo(repo) {
            Some(r) if r.owner.eq_ignore_ascii_case(login) => "OWNER",
            Some(r) if r.permission_of(login) >= super::model::Permission::Write => "COLLABORATOR",
            _ => "NONE",
        }
    }

    /// A repository's label (the fake gives every name the same colour).
    pub fn label(&self, repo: &str, name: &str) -> Value {
        let id = super::repository_id(&format!("{repo}#{name}"));
        json!({
            "id": id,
            "node_id": node_id("Label", id),
            "url": format!("{}/repos/{repo}/labels/{name}", self.base),
            "name": name,
            "description": null,
            "color": "ededed",
            "default": false,
        })
    }

    /// An issue's `labeled` or `unlabeled` timeline event.
    pub fn issue_event(&self, event: &IssueEvent) -> Value {
        json!({
            "id": event.id,
            "node_id": node_id("LabeledEvent", event.id),
            "url": format!("{}/repos/{}/issues/events/{}", self.base, event.repo, event.id),
            "actor": self.user(&event.actor),
            "event": event.event,
            "commit_id": null,
            "commit_url": null,
            "created_at": time(event.created_at),
            "performed_via_github_app": null,
            "label": {"name": event.label, "color": "ededed"},
        })
    }

    pub fn comment(&self, comment: &Comment) -> Value {
        let (base, full) = (self.base, &comment.repo);
        let url = format!("{base}/repos/{full}/issues/comments/{}", comment.id);
        let reactions: Vec<&Reaction> = self
            .world
            .reactions
            .values()
            .filter(|r| r.comment_id == comment.id)
            .collect();
        let count = |content: &str| reactions.iter().filter(|r| r.content == content).count();
        json!({
            "id": comment.id,
            "node_id": node_id("IssueComment", comment.id),
            "url": url,
            "html_url": format!("{base}/{full}/pull/{}#issuecomment-{}", comment.issue_number, comment.id),
            "issue_url": format!("{base}/repos/{full}/issues/{}", comment.issue_number),
            "body": comment.body,
            "user": self.user(&comment.author),
            "created_at": time(comment.created_at),
            "updated_at": time(comment.updated_at),
            "author_association": self.association(full, &comment.author),
            "reactions": {
                "url": format!("{url}/reactions"),
                "total_count": reactions.len(),
                "+1": count("+1"), "-1": count("-1"), "laugh": count("laugh"),
                "confused": count("confused"), "heart": count("heart"), "hooray": count("hooray"),
                "eyes": count("eyes"), "rocket": count("rocket"),
            },
        })
    }

    pub fn reaction(&self, reaction: &Reaction) -> Value {
        json!({
            "id": reaction.id,
            "node_id": node_id("Reaction", reaction.id),
            "user": self.user(&reaction.user),
            "content": reaction.content,
            "created_at": time(reaction.created_at),
        })
    }

    pub fn commit_comment(&self, comment: &CommitComment) -> Value {
        let (base, full) = (self.base, &comment.repo);
        json!({
            "id": comment.id,
            "node_id": node_id("CommitComment", comment.id),
            "url": format!("{base}/repos/{full}/comments/{}", comment.id),
            "html_url": format!("{base}/{full}/commit/{}#commitcomment-{}", comment.commit_id, comment.id),
            "body": comment.body,
            "path": comment.path,
            "position": comment.position,
            "line": comment.line,
            "commit_id": comment.commit_id,
            "user": self.user(&comment.author),
            "created_at": time(comment.created_at),
            "updated_at": time(comment.created_at),
            "author_association": self.association(full, &comment.author),
        })
    }

    pub fn review(&self, review: &Review) -> Value {
        let (base, full) = (self.base, &review.repo);
        let html = format!(
            "{base}/{full}/pull/{}#pullrequestreview-{}",
            review.number, review.id
        );
        let pull = format!("{base}/repos/{full}/pulls/{}", review.number);
        json!({
            "id": review.id,
            "node_id": node_id("PullRequestReview", review.id),
            "user": self.user(&review.author),
            "body": review.body,
            "state": review.state,
            "html_url": html,
            "pull_request_url": pull,
            "_links": {"html": {"href": html}, "pull_request": {"href": pull}},
            "submitted_at": time(review.submitted_at),
            "commit_id": review.commit_id,
            "author_association": self.association(full, &review.author),
        })
    }

    pub fn app(&self) -> Value {
        let world = self.world;
        let created = time(SystemTime::UNIX_EPOCH + std::time::Duration::from_secs(1_600_000_000));
        json!({
            "id": world.app_id,
            "slug": world.app_slug,
            "node_id": node_id("Integration", world.app_id),
            "client_id": format!("Iv1.fake{}", world.app_id),
            "owner": self.user(&world.app_owner),
            "name": "testbot (fake)",
            "description": "The App of the fake GitHub.",
            "external_url": self.base,
            "html_url": format!("{}/apps/{}", self.base, world.app_slug),
            "created_at": created,
            "updated_at": created,
            "permissions": {"checks": "write", "contents": "read", "issues": "write", "metadata": "read", "pull_requests": "write"},
            "events": ["check_run", "issue_comment", "pull_request", "pull_request_review", "push"],
            "installations_count": world.installations.len(),
        })
    }

    pub fn installation(&self, installation: &Installation) -> Value {
        let (base, world) = (self.base, self.world);
        let account = self.user(&installation.account);
        json!({
            "id": installation.id,
            "account": account,
            "access_tokens_url": format!("{base}/app/installations/{}/access_tokens", installation.id),
            "repositories_url": format!("{base}/installation/repositories"),
            "html_url": format!("{base}/settings/installations/{}", installation.id),
            "app_id": world.app_id,
            "app_slug": world.app_slug,
            "client_id": format!("Iv1.fake{}", world.app_id),
            "target_id": account["id"],
            "target_type": account["type"],
            "permissions": {"checks": "write", "contents": "read", "issues": "write", "metadata": "read", "pull_requests": "write"},
            "events": ["check_run", "issue_comment", "pull_request", "pull_request_review", "push"],
            "created_at": time(installation.created_at),
            "updated_at": time(installation.created_at),
            "single_file_name": null,
            "has_multiple_single_files": false,
            "single_file_paths": [],
            "repository_selection": "selected",
            "suspended_by": null,
            "suspended_at": null,
        })
    }

    pub fn check_run(&self, run: &CheckRun) -> Value {
        let (base, full) = (self.base, &run.repo);
        let state = run.current();
        let url = format!("{base}/repos/{full}/check-runs/{}", run.id);
        let pulls: Vec<Value> = self
            .world
            .pulls
            .values()
            .filter(|p| &p.repo == full && p.head_sha == run.head_sha && p.open)
            .map(|p| {
                let api = format!("{base}/repos/{full}");
                let side = |r: &str, sha: &str, repo: &str| {
                    let id = self.world.repo(repo).map(|r| r.id).unwrap_or_default();
                    json!({"ref": r, "sha": sha, "repo": {"id": id, "url": format!("{base}/repos/{repo}"), "name": repo.split('/').nth(1).unwrap_or_default()}})
                };
                json!({
                    "id": p.id, "number": p.number, "url": format!("{api}/pulls/{}", p.number),
                    "head": side(&p.head_ref, &p.head_sha, &p.head_repo),
                    "base": side(&p.base_ref, &p.base_sha, &p.repo),
                })
            })
            .collect();
        json!({
            "id": run.id,
            "head_sha": run.head_sha,
            "node_id": node_id("CheckRun", run.id),
            "external_id": state.external_id.clone().unwrap_or_default(),
            "url": url,
            "html_url": format!("{base}/{full}/runs/{}", run.id),
            "details_url": state.details_url.clone().unwrap_or_else(|| format!("{base}/{full}/runs/{}", run.id)),
            "status": state.status,
            "conclusion": state.conclusion,
            "started_at": state.started_at,
            "completed_at": state.completed_at,
            "output": {
                "title": state.output.title,
                "summary": state.output.summary,
                "text": state.output.text,
                "annotations_count": 0,
                "annotations_url": format!("{url}/annotations"),
            },
            "name": state.name,
            "check_suite": {"id": run.id + 500_000_000},
            "app": self.app(),
            "pull_requests": pulls,
        })
    }

    /// A file's contents (`content-file`).
    pub fn content_file(
        &self,
        repo: &Repository,
        path: &str,
        reference: &str,
        blob: &str,
        content: &[u8],
    ) -> Value {
        let (base, full) = (self.base, repo.full_name());
        let encoded = base64::engine::general_purpose::STANDARD.encode(content);
        // GitHub wraps the base64 at 60 columns.
        let wrapped: Vec<String> = encoded
            .as_bytes()
            .chunks(60)
            .map(|c| String::from_utf8_lossy(c).into_owned())
            .collect();
        let mut wrapped = wrapped.join("\n");
        wrapped.push('\n');
        let url = format!("{base}/repos/{full}/contents/{path}?ref={reference}");
        let git_url = format!("{base}/repos/{full}/git/blobs/{blob}");
        let html_url = format!("{base}/{full}/blob/{reference}/{path}");
        json!({
            "type": "file",
            "encoding": "base64",
            "size": content.len(),
            "name": path.rsplit('/').next().unwrap_or(path),
            "path": path,
            "content": wrapped,
            "sha": blob,
            "url": url,
            "git_url": git_url,
            "html_url": html_url,
            "download_url": format!("{base}/{full}/raw/{reference}/{path}"),
            "_links": {"self": url, "git": git_url, "html": html_url},
        })
    }

    /// A directory's listing (`content-directory`).
    pub fn content_directory(
        &self,
        repo: &Repository,
        path: &str,
        reference: &str,
        entries: &[TreeEntry],
    ) -> Value {
        let (base, full) = (self.base, repo.full_name());
        let items: Vec<Value> = entries
            .iter()
            .map(|entry| {
                let path = format!("{path}/{}", entry.name);
                let kind = match entry.kind.as_str() {
                    "tree" => "dir",
                    "commit" => "submodule",
                    _ => "file",
                };
                let url = format!("{base}/repos/{full}/contents/{path}?ref={reference}");
                let git_url = format!(
                    "{base}/repos/{full}/git/{}s/{}",
                    if kind == "dir" { "tree" } else { "blob" },
                    entry.sha
                );
                let html_url = format!(
                    "{base}/{full}/{}/{reference}/{path}",
                    if kind == "dir" { "tree" } else { "blob" }
                );
                let download_url =
                    (kind == "file").then(|| format!("{base}/{full}/raw/{reference}/{path}"));
                json!({
                    "type": kind,
                    "size": entry.size.unwrap_or(0),
                    "name": entry.name,
                    "path": path,
                    "sha": entry.sha,
                    "url": url,
                    "git_url": git_url,
                    "html_url": html_url,
                    "download_url": download_url,
                    "_links": {"self": url, "git": git_url, "html": html_url},
                })
            })
            .collect();
        json!(items)
    }
}

/// A stable number for a sha (node ids of commits).
fn sha_number(sha: &str) -> u64 {
    u64::from_str_radix(sha.get(..12).unwrap_or("0"), 16).unwrap_or_default()
}
