//! The fake's HTTP server: one handler matches each request to the GitHub operation it is (by
//! GitHub's own path templates), checks it against the description, answers from the model and
//! checks the answer too. Paths ending in `.git/...` are smart-HTTP git.

use std::sync::Arc;
use std::time::SystemTime;

use axum::body::Bytes;
use axum::extract::State;
use axum::http::{HeaderMap, Method, StatusCode, Uri};
use axum::response::{IntoResponse, Response};
use base64::Engine as _;
use serde_json::{Value, json};

use super::Shared;
use super::git;
use super::model::{
    CheckRun, CheckRunOutput, CheckRunState, Comment, CommitComment, Identity, Permission,
    Reaction, RecordedRequest, Repository, Token,
};
use super::openapi::{self, Operation};
use super::render::{Render, time};

/// The documentation URL GitHub puts in its errors.
const DOCS: &str = "https://docs.github.com/rest";

/// An answer: status and JSON body.
pub(crate) struct Reply {
    status: u16,
    body: Value,
}

impl Reply {
    fn ok(status: u16, body: Value) -> Reply {
        Reply { status, body }
    }

    fn error(status: u16, message: &str) -> Reply {
        Reply {
            status,
            body: json!({"message": message, "documentation_url": DOCS, "status": status.to_string()}),
        }
    }

    fn not_found() -> Reply {
        Reply::error(404, "Not Found")
    }
}

type Answer = Result<Reply, Reply>;

/// Who is calling, and with which token.
#[derive(Clone)]
struct Auth {
    identity: Identity,
    token: Option<String>,
}

fn authenticate(shared: &Shared, headers: &HeaderMap) -> Auth {
    let Some(value) = headers.get("authorization").and_then(|v| v.to_str().ok()) else {
        return Auth {
            identity: Identity::Anonymous,
            token: None,
        };
    };
    let token = if let Some(basic) = value.strip_prefix("Basic ") {
        base64::engine::general_purpose::STANDARD
            .decode(basic.trim())
            .ok()
            .and_then(|raw| String::from_utf8(raw).ok())
            .and_then(|pair| {
                pair.split_once(':')
                    .map(|(_, password)| password.to_string())
            })
    } else {
        value
            .strip_prefix("Bearer ")
            .or_else(|| value.strip_prefix("token "))
            .map(|t| t.trim().to_string())
    };
    let Some(token) = token else {
        return Auth {
            identity: Identity::Invalid("Bad credentials".into()),
            token: None,
        };
    };
    let world = shared.world.lock().unwrap();
    let identity = if token.starts_with("eyJ") && token.matches('.').count() == 2 {
        match super::jwt::verify_app_jwt(&token, world.app_id, &world.app_public_key) {
            Ok(()) => Identity::App,
            Err(message) => Identity::Invalid(message),
        }
    } else {
        world.identity_of_token(&token)
    };
    Auth {
        identity,
        token: Some(token),
    }
}

fn parse_query(uri: &Uri) -> Vec<(String, String)> {
    uri.query()
        .unwrap_or_default()
        .split('&')
        .filter(|pair| !pair.is_empty())
        .map(|pair| {
            let (key, value) = pair.split_once('=').unwrap_or((pair, ""));
            let decode = |s: &str| openapi::percent_decode(&s.replace('+', " "));
            (decode(key), decode(value))
        })
        .collect()
}

/// Every request comes here.
pub(crate) async fn handler(
    State(shared): State<Arc<Shared>>,
    method: Method,
    uri: Uri,
    headers: HeaderMap,
    body: Bytes,
) -> Response {
    let path = uri.path().to_string();
    let query = parse_query(&uri);
    let auth = authenticate(&shared, &headers);
    if let Some((repo, rest)) = git_path(&path) {
        let (status, response) =
            git_handler(&shared, &auth, &method, &uri, &headers, &repo, &rest, &body).await;
        record(&shared, &method, &path, None, query, &auth, None, status);
        return response;
    }
    let json_body = if body.is_empty() {
        None
    } else {
        serde_json::from_slice::<Value>(&body).ok()
    };
    let Some(op) = openapi::github().operation(method.as_str(), &path) else {
        let reply = Reply::not_found();
        let mut world = shared.world.lock().unwrap();
        world.violations.push(format!(
            "{method} {path}: GitHub has no such operation (or the fake does not serve it)"
        ));
        drop(world);
        record(
            &shared,
            &method,
            &path,
            None,
            query,
            &auth,
            json_body,
            reply.status,
        );
        return reply_response(reply);
    };
    let mut problems = Vec::new();
    if !body.is_empty() && json_body.is_none() {
        problems.push("the request body is not JSON".to_string());
    }
    let request_problems = openapi::github().check_request(&op, &query, json_body.as_ref());
    let bad_body = request_problems
        .iter()
        .any(|p| p.starts_with("request body") || p.contains("request body"));
    problems.extend(request_problems);
    let reply = if !body.is_empty() && json_body.is_none() {
        Reply::error(400, "Problems parsing JSON")
    } else if bad_body {
        Reply::error(422, "Invalid request.")
    } else {
        match dispatch(&shared, &op, &auth, &query, json_body.as_ref()).await {
            Ok(reply) | Err(reply) => reply,
        }
    };
    let response_problems = openapi::github().check_response(&op, reply.status, Some(&reply.body));
    {
        let mut world = shared.world.lock().unwrap();
        for problem in problems {
            world
                .violations
                .push(format!("{method} {path} ({}): {problem}", op.template));
        }
        for problem in response_problems {
            world.violations.push(format!(
                "{method} {path} ({}): the fake's {problem}",
                op.template
            ));
        }
    }
    record(
        &shared,
        &method,
        &path,
        Some(op.template.clone()),
        query,
        &auth,
        json_body,
        reply.status,
    );
    reply_response(reply)
}

fn reply_response(reply: Reply) -> Response {
    let status = StatusCode::from_u16(reply.status).unwrap_or(StatusCode::INTERNAL_SERVER_ERROR);
    (status, axum::Json(reply.body)).into_response()
}

#[allow(clippy::too_many_arguments)]
fn record(
    shared: &Shared,
    method: &Method,
    path: &str,
    template: Option<String>,
    query: Vec<(String, String)>,
    auth: &Auth,
    body: Option<Value>,
    status: u16,
) {
    shared.world.lock().unwrap().requests.push(RecordedRequest {
        method: method.to_string(),
        path: path.to_string(),
        template,
        query,
        identity: auth.identity.clone(),
        token: auth.token.clone(),
        body,
        status,
    });
}

/// The repository a repository's readers may see, or GitHub's 404 (401 for bad credentials).
fn readable(shared: &Shared, auth: &Auth, op: &Operation) -> Result<Repository, Reply> {
    let world = shared.world.lock().unwrap();
    let full = format!("{}/{}", op.param("owner"), op.param("repo"));
    match world.repo(&full) {
        Some(repo) if world.can_read(&auth.identity, auth.token.as_deref(), repo) => {
            Ok(repo.clone())
        }
        _ => Err(Reply::not_found()),
    }
}

/// Who writes as `auth` on `repo` (a user's login or the App's bot), or GitHub's refusal.
fn writer(
    shared: &Shared,
    auth: &Auth,
    repo: &Repository,
    apps_only: bool,
) -> Result<String, Reply> {
    let world = shared.world.lock().unwrap();
    match &auth.identity {
        Identity::Installation(_)
            if world.installation_can_write(&auth.identity, auth.token.as_deref(), repo) =>
        {
            Ok(world.bot_login())
        }
        Identity::User(_) if apps_only => {
            Err(Reply::error(403, "You must authenticate via a GitHub App."))
        }
        Identity::User(login) if world.can_read(&auth.identity, auth.token.as_deref(), repo) => {
            Ok(login.clone())
        }
        Identity::Anonymous => Err(Reply::error(401, "Requires authentication")),
        _ => Err(Reply::error(403, "Resource not accessible by integration")),
    }
}

fn number(op: &Operation, name: &str) -> Result<u64, Reply> {
    op.param(name).parse().map_err(|_| Reply::not_found())
}

async fn resolve_or(repo: &Repository, reference: &str, reply: Reply) -> Result<String, Reply> {
    git::resolve(&repo.git_dir, reference).await.ok_or(reply)
}

async fn dispatch(
    shared: &Shared,
    op: &Operation,
    auth: &Auth,
    query: &[(String, String)],
    body: Option<&Value>,
) -> Answer {
    if let Identity::Invalid(message) = &auth.identity {
        return Err(Reply::error(401, message));
    }
    let base = shared.url.as_str();
    let query_value = |name: &str| {
        query
            .iter()
            .find(|(k, _)| k == name)
            .map(|(_, v)| v.clone())
    };
    let template = op.template.as_str();
    let is_app = auth.identity == Identity::App;
    let jwt_required = || Reply::error(401, "A JSON web token could not be decoded");
    match (op.method.as_str(), template) {
        ("GET", "/user") => match &auth.identity {
            Identity::User(login) => {
                let world = shared.world.lock().unwrap();
                Ok(Reply::ok(
                    200,
                    Render {
                        base,
                        world: &world,
                    }
                    .public_user(login),
                ))
            }
            Identity::Anonymous => Err(Reply::error(401, "Requires authentication")),
            _ => Err(Reply::error(403, "Resource not accessible by integration")),
        },
        ("GET", "/app") => {
            if !is_app {
                return Err(jwt_required());
            }
            let world = shared.world.lock().unwrap();
            Ok(Reply::ok(
                200,
                Render {
                    base,
                    world: &world,
                }
                .app(),
            ))
        }
        ("GET", "/app/installations/{installation_id}") => {
            if !is_app {
                return Err(jwt_required());
            }
            let id = number(op, "installation_id")?;
            let world = shared.world.lock().unwrap();
            let installation = world.installations.get(&id).ok_or_else(Reply::not_found)?;
            Ok(Reply::ok(
                200,
                Render {
                    base,
                    world: &world,
                }
                .installation(installation),
            ))
        }
        ("POST", "/app/installations/{installation_id}/access_tokens") => {
            if !is_app {
                return Err(jwt_required());
            }
            let id = number(op, "installation_id")?;
            let mut world = shared.world.lock().unwrap();
            let installation = world
                .installations
                .get(&id)
                .cloned()
                .ok_or_else(Reply::not_found)?;
            let only: Option<Vec<String>> =
                body.and_then(|b| b["repositories"].as_array())
                    .map(|names| {
                        names
                            .iter()
                            .filter_map(Value::as_str)
                            .map(|name| format!("{}/{name}", installation.account))
                            .collect()
                    });
            if let Some(only) = &only
                && let Some(missing) = only.iter().find(|r| {
                    !installation
                        .repositories
                        .iter()
                        .any(|i| i.eq_ignore_ascii_case(r))
                })
            {
                return Err(Reply::error(
                    422,
                    &format!(
                        "There is at least one repository that does not exist or is not accessible to the parent installation: {missing}"
                    ),
                ));
            }
            let token = format!(
                "ghs_{}",
                super::webhooks::new_delivery_id().replace('-', "")
            );
            let expires_at = SystemTime::now() + world.token_lifetime;
            world.tokens.insert(
                token.clone(),
                Token::Installation {
                    installation_id: id,
                    expires_at,
                    repositories: only.clone(),
                },
            );
            let render = Render {
                base,
                world: &world,
            };
            let repositories: Vec<Value> = only
                .unwrap_or(installation.repositories.clone())
                .iter()
                .filter_map(|r| world.repo(r))
                .map(|r| render.repository(r))
                .collect();
            Ok(Reply::ok(
                201,
                json!({
                    "token": token,
                    "expires_at": time(expires_at),
                    "permissions": render.installation(&installation)["permissions"],
                    "repository_selection": "selected",
                    "repositories": repositories,
                }),
            ))
        }
        ("GET", "/installation/repositories") => {
            let world = shared.world.lock().unwrap();
            if !matches!(auth.identity, Identity::Installation(_)) {
                return Err(Reply::error(
                    403,
                    "This endpoint requires you to authenticate as an installation (an installation access token).",
                ));
            }
            let render = Render {
                base,
                world: &world,
            };
            let repositories: Vec<Value> = world
                .repos
                .values()
                .filter(|r| world.installation_can_write(&auth.identity, auth.token.as_deref(), r))
                .map(|r| render.repository(r))
                .collect();
            Ok(Reply::ok(
                200,
                json!({
                    "total_count": repositories.len(),
                    "repository_selection": "selected",
                    "repositories": repositories,
                }),
            ))
        }
        ("GET", "/repos/{owner}/{repo}") => {
            let repo = readable(shared, auth, op)?;
            let world = shared.world.lock().unwrap();
            let login = match &auth.identity {
                Identity::User(login) => Some(login.as_str()),
                _ => None,
            };
            Ok(Reply::ok(
                200,
                Render {
                    base,
                    world: &world,
                }
                .repository_for(&repo, login),
            ))
        }
        ("GET", "/repos/{owner}/{repo}/installation") => {
            if !is_app {
                return Err(jwt_required());
            }
            let world = shared.world.lock().unwrap();
            let full = format!("{}/{}", op.param("owner"), op.param("repo"));
            let installation = world.installation_of(&full).ok_or_else(Reply::not_found)?;
            Ok(Reply::ok(
                200,
                Render {
                    base,
                    world: &world,
                }
                .installation(installation),
            ))
        }
        ("GET", "/repos/{owner}/{repo}/contents/{path}") => {
            let repo = readable(shared, auth, op)?;
            let reference = query_value("ref").unwrap_or(repo.default_branch.clone());
            let sha = resolve_or(
                &repo,
                &reference,
                Reply::error(404, &format!("No commit found for the ref {reference}")),
            )
            .await?;
            let path = op.param("path").trim_matches('/').to_string();
            let (blob, content) = git::file_at(&repo.git_dir, &sha, &path)
                .await
                .ok_or_else(Reply::not_found)?;
            let world = shared.world.lock().unwrap();
            Ok(Reply::ok(
                200,
                Render {
                    base,
                    world: &world,
                }
                .content_file(&repo, &path, &reference, &blob, &content),
            ))
        }
        ("GET", "/repos/{owner}/{repo}/commits/{ref}") => {
            let repo = readable(shared, auth, op)?;
            let reference = op.param("ref");
            let sha = resolve_or(
                &repo,
                reference,
                Reply::error(422, &format!("No commit found for SHA: {reference}")),
            )
            .await?;
            let info = git::commit_info(&repo.git_dir, &sha)
                .await
                .map_err(|_| Reply::not_found())?;
            let files = git::changed_files(
                &repo.git_dir,
                info.parents.first().map(String::as_str),
                &sha,
            )
            .await
            .map_err(|_| Reply::not_found())?;
            let world = shared.world.lock().unwrap();
            Ok(Reply::ok(
                200,
                Render {
                    base,
                    world: &world,
                }
                .commit(&repo, &info, Some(&files)),
            ))
        }
        ("GET", "/repos/{owner}/{repo}/compare/{basehead}") => {
            let repo = readable(shared, auth, op)?;
            let (base_ref, head_ref) = op
                .param("basehead")
                .split_once("...")
                .ok_or_else(Reply::not_found)?;
            let base_sha = resolve_or(&repo, base_ref, Reply::not_found()).await?;
            let head_sha = resolve_or(&repo, head_ref, Reply::not_found()).await?;
            let dir = &repo.git_dir;
            let (behind, ahead, merge_base) = git::ahead_behind(dir, &base_sha, &head_sha)
                .await
                .map_err(|_| Reply::not_found())?;
            let merge_base = merge_base.ok_or_else(Reply::not_found)?;
            let mut commits = Vec::new();
            for sha in git::commits_between(dir, &base_sha, &head_sha)
                .await
                .map_err(|_| Reply::not_found())?
            {
                commits.push(
                    git::commit_info(dir, &sha)
                        .await
                        .map_err(|_| Reply::not_found())?,
                );
            }
            let base_info = git::commit_info(dir, &base_sha)
                .await
                .map_err(|_| Reply::not_found())?;
            let merge_base_info = git::commit_info(dir, &merge_base)
                .await
                .map_err(|_| Reply::not_found())?;
            let files = git::changed_files(dir, Some(&merge_base), &head_sha)
                .await
                .map_err(|_| Reply::not_found())?;
            let status = match (ahead, behind) {
                (0, 0) => "identical",
                (_, 0) => "ahead",
                (0, _) => "behind",
                _ => "diverged",
            };
            let world = shared.world.lock().unwrap();
            let render = Render {
                base,
                world: &world,
            };
            let full = repo.full_name();
            let basehead = op.param("basehead");
            Ok(Reply::ok(
                200,
                json!({
                    "url": format!("{base}/repos/{full}/compare/{basehead}"),
                    "html_url": format!("{base}/{full}/compare/{basehead}"),
                    "permalink_url": format!("{base}/{full}/compare/{}...{}", &base_sha, &head_sha),
                    "diff_url": format!("{base}/{full}/compare/{basehead}.diff"),
                    "patch_url": format!("{base}/{full}/compare/{basehead}.patch"),
                    "base_commit": render.commit(&repo, &base_info, None),
                    "merge_base_commit": render.commit(&repo, &merge_base_info, None),
                    "status": status,
                    "ahead_by": ahead,
                    "behind_by": behind,
                    "total_commits": commits.len(),
                    "commits": commits.iter().map(|c| render.commit(&repo, c, None)).collect::<Vec<_>>(),
                    "files": files.iter().map(|f| render.diff_entry(&repo, &head_sha, f)).collect::<Vec<_>>(),
                }),
            ))
        }
        ("GET", "/repos/{owner}/{repo}/branches/{branch}") => {
            let repo = readable(shared, auth, op)?;
            let branch = op.param("branch");
            let sha = resolve_or(
                &repo,
                &format!("refs/heads/{branch}"),
                Reply::error(404, "Branch not found"),
            )
            .await?;
            let info = git::commit_info(&repo.git_dir, &sha)
                .await
                .map_err(|_| Reply::not_found())?;
            let world = shared.world.lock().unwrap();
            let full = repo.full_name();
            let api = format!("{base}/repos/{full}/branches/{branch}");
            Ok(Reply::ok(
                200,
                json!({
                    "name": branch,
                    "commit": Render { base, world: &world }.commit(&repo, &info, None),
                    "_links": {"html": format!("{base}/{full}/tree/{branch}"), "self": api},
                    "protected": false,
                    "protection": {"enabled": false, "required_status_checks": {"enforcement_level": "off", "contexts": [], "checks": []}},
                    "protection_url": format!("{api}/protection"),
                }),
            ))
        }
        ("GET", "/repos/{owner}/{repo}/pulls/{pull_number}") => {
            let repo = readable(shared, auth, op)?;
            let n = number(op, "pull_number")?;
            let world = shared.world.lock().unwrap();
            let pr = world
                .pulls
                .get(&(repo.full_name(), n))
                .ok_or_else(Reply::not_found)?;
            Ok(Reply::ok(
                200,
                Render {
                    base,
                    world: &world,
                }
                .pull_request(pr, false),
            ))
        }
        ("GET", "/repos/{owner}/{repo}/pulls/{pull_number}/reviews") => {
            let repo = readable(shared, auth, op)?;
            let n = number(op, "pull_number")?;
            let world = shared.world.lock().unwrap();
            if !world.pulls.contains_key(&(repo.full_name(), n)) {
                return Err(Reply::not_found());
            }
            let render = Render {
                base,
                world: &world,
            };
            let reviews: Vec<Value> = world
                .reviews
                .values()
                .filter(|r| r.repo == repo.full_name() && r.number == n)
                .map(|r| render.review(r))
                .collect();
            Ok(Reply::ok(200, json!(reviews)))
        }
        ("GET", "/repos/{owner}/{repo}/pulls/{pull_number}/reviews/{review_id}") => {
            let repo = readable(shared, auth, op)?;
            let (n, id) = (number(op, "pull_number")?, number(op, "review_id")?);
            let world = shared.world.lock().unwrap();
            let review = world
                .reviews
                .get(&id)
                .filter(|r| r.repo == repo.full_name() && r.number == n)
                .ok_or_else(Reply::not_found)?;
            Ok(Reply::ok(
                200,
                Render {
                    base,
                    world: &world,
                }
                .review(review),
            ))
        }
        ("GET", "/repos/{owner}/{repo}/pulls/{pull_number}/files") => {
            let repo = readable(shared, auth, op)?;
            let n = number(op, "pull_number")?;
            let pr = shared
                .world
                .lock()
                .unwrap()
                .pulls
                .get(&(repo.full_name(), n))
                .cloned()
                .ok_or_else(Reply::not_found)?;
            let dir = &repo.git_dir;
            let base_tip = git::resolve(dir, &format!("refs/heads/{}", pr.base_ref))
                .await
                .unwrap_or(pr.base_sha.clone());
            let (_, _, merge_base) = git::ahead_behind(dir, &base_tip, &pr.head_sha)
                .await
                .map_err(|_| Reply::not_found())?;
            let files = git::changed_files(dir, merge_base.as_deref(), &pr.head_sha)
                .await
                .map_err(|_| Reply::not_found())?;
            let world = shared.world.lock().unwrap();
            let render = Render {
                base,
                world: &world,
            };
            Ok(Reply::ok(
                200,
                json!(
                    files
                        .iter()
                        .map(|f| render.diff_entry(&repo, &pr.head_sha, f))
                        .collect::<Vec<_>>()
                ),
            ))
        }
        ("GET", "/repos/{owner}/{repo}/commits/{commit_sha}/pulls") => {
            let repo = readable(shared, auth, op)?;
            let sha = resolve_or(
                &repo,
                op.param("commit_sha"),
                Reply::error(422, "No commit found for SHA"),
            )
            .await?;
            let world = shared.world.lock().unwrap();
            let render = Render {
                base,
                world: &world,
            };
            let pulls: Vec<Value> = world
                .pulls
                .values()
                .filter(|p| {
                    p.repo == repo.full_name()
                        && (p.head_sha == sha
                            || p.merge_commit_sha.as_deref() == Some(sha.as_str()))
                })
                .map(|p| render.pull_request(p, true))
                .collect();
            Ok(Reply::ok(200, json!(pulls)))
        }
        ("GET", "/repos/{owner}/{repo}/issues/{issue_number}/comments") => {
            let repo = readable(shared, auth, op)?;
            let n = number(op, "issue_number")?;
            let world = shared.world.lock().unwrap();
            let render = Render {
                base,
                world: &world,
            };
            let comments: Vec<Value> = world
                .comments
                .values()
                .filter(|c| c.repo == repo.full_name() && c.issue_number == n)
                .map(|c| render.comment(c))
                .collect();
            Ok(Reply::ok(200, json!(comments)))
        }
        ("GET", "/repos/{owner}/{repo}/issues/comments/{comment_id}") => {
            let repo = readable(shared, auth, op)?;
            let id = number(op, "comment_id")?;
            let world = shared.world.lock().unwrap();
            let comment = world
                .comments
                .get(&id)
                .filter(|c| c.repo == repo.full_name())
                .ok_or_else(Reply::not_found)?;
            Ok(Reply::ok(
                200,
                Render {
                    base,
                    world: &world,
                }
                .comment(comment),
            ))
        }
        ("POST", "/repos/{owner}/{repo}/issues/{issue_number}/comments") => {
            let repo = readable(shared, auth, op)?;
            let author = writer(shared, auth, &repo, false)?;
            let n = number(op, "issue_number")?;
            let text = body
                .and_then(|b| b["body"].as_str())
                .unwrap_or_default()
                .to_string();
            let (reply, delivery) = {
                let mut world = shared.world.lock().unwrap();
                if !world.pulls.contains_key(&(repo.full_name(), n)) {
                    return Err(Reply::not_found());
                }
                let id = world.next_id();
                let now = SystemTime::now();
                let comment = Comment {
                    id,
                    repo: repo.full_name(),
                    issue_number: n,
                    author,
                    body: text,
                    created_at: now,
                    updated_at: now,
                };
                world.comments.insert(id, comment.clone());
                let reply = Render {
                    base,
                    world: &world,
                }
                .comment(&comment);
                (
                    reply,
                    super::events::issue_comment(shared, &world, &comment, "created", None),
                )
            };
            shared.emit_in_background(delivery);
            Ok(Reply::ok(201, reply))
        }
        ("PATCH", "/repos/{owner}/{repo}/issues/comments/{comment_id}") => {
            let repo = readable(shared, auth, op)?;
            let author = writer(shared, auth, &repo, false)?;
            let id = number(op, "comment_id")?;
            let text = body
                .and_then(|b| b["body"].as_str())
                .unwrap_or_default()
                .to_string();
            let (reply, delivery) = {
                let mut world = shared.world.lock().unwrap();
                let Some(comment) = world
                    .comments
                    .get_mut(&id)
                    .filter(|c| c.repo == repo.full_name())
                else {
                    return Err(Reply::not_found());
                };
                if comment.author != author && repo.permission_of(&author) < Permission::Write {
                    return Err(Reply::error(403, "Resource not accessible by integration"));
                }
                let before = std::mem::replace(&mut comment.body, text);
                comment.updated_at = SystemTime::now();
                let comment = comment.clone();
                let reply = Render {
                    base,
                    world: &world,
                }
                .comment(&comment);
                (
                    reply,
                    super::events::issue_comment(shared, &world, &comment, "edited", Some(&before)),
                )
            };
            shared.emit_in_background(delivery);
            Ok(Reply::ok(200, reply))
        }
        ("POST", "/repos/{owner}/{repo}/issues/comments/{comment_id}/reactions") => {
            let repo = readable(shared, auth, op)?;
            let user = writer(shared, auth, &repo, false)?;
            let id = number(op, "comment_id")?;
            let content = body
                .and_then(|b| b["content"].as_str())
                .unwrap_or_default()
                .to_string();
            let mut world = shared.world.lock().unwrap();
            if world
                .comments
                .get(&id)
                .is_none_or(|c| c.repo != repo.full_name())
            {
                return Err(Reply::not_found());
            }
            if let Some(existing) = world
                .reactions
                .values()
                .find(|r| r.comment_id == id && r.user == user && r.content == content)
            {
                return Ok(Reply::ok(
                    200,
                    Render {
                        base,
                        world: &world,
                    }
                    .reaction(existing),
                ));
            }
            let reaction = Reaction {
                id: world.next_id(),
                comment_id: id,
                user,
                content,
                created_at: SystemTime::now(),
            };
            world.reactions.insert(reaction.id, reaction.clone());
            Ok(Reply::ok(
                201,
                Render {
                    base,
                    world: &world,
                }
                .reaction(&reaction),
            ))
        }
        ("POST", "/repos/{owner}/{repo}/commits/{commit_sha}/comments") => {
            let repo = readable(shared, auth, op)?;
            let author = writer(shared, auth, &repo, false)?;
            let sha = resolve_or(
                &repo,
                op.param("commit_sha"),
                Reply::error(422, "No commit found for SHA"),
            )
            .await?;
            let body = body.cloned().unwrap_or_default();
            let mut world = shared.world.lock().unwrap();
            let comment = CommitComment {
                id: world.next_id(),
                repo: repo.full_name(),
                commit_id: sha,
                author,
                body: body["body"].as_str().unwrap_or_default().to_string(),
                path: body["path"].as_str().map(str::to_string),
                line: body["line"].as_u64(),
                position: body["position"].as_u64(),
                created_at: SystemTime::now(),
            };
            world.commit_comments.insert(comment.id, comment.clone());
            Ok(Reply::ok(
                201,
                Render {
                    base,
                    world: &world,
                }
                .commit_comment(&comment),
            ))
        }
        ("GET", "/repos/{owner}/{repo}/collaborators/{username}/permission") => {
            let repo = readable(shared, auth, op)?;
            if auth.identity == Identity::Anonymous {
                return Err(Reply::error(401, "Requires authentication"));
            }
            let login = op.param("username");
            let world = shared.world.lock().unwrap();
            let account = world.accounts.get(login).ok_or_else(Reply::not_found)?;
            let mut permission = repo.permission_of(&account.login);
            if !repo.private {
                permission = permission.max(Permission::Read);
            }
            let render = Render {
                base,
                world: &world,
            };
            let mut user = render.account(account);
            user["role_name"] = json!(permission.role_name());
            user["permissions"] = json!({
                "admin": permission >= Permission::Admin, "maintain": permission >= Permission::Maintain,
                "push": permission >= Permission::Write, "triage": permission >= Permission::Triage,
                "pull": permission >= Permission::Read,
            });
            Ok(Reply::ok(
                200,
                json!({
                    "permission": permission.legacy_name(),
                    "role_name": permission.role_name(),
                    "user": user,
                }),
            ))
        }
        ("POST", "/repos/{owner}/{repo}/check-runs") => {
            let repo = readable(shared, auth, op)?;
            writer(shared, auth, &repo, true)?;
            let body = body.cloned().unwrap_or_default();
            let head = body["head_sha"].as_str().unwrap_or_default().to_string();
            let sha = resolve_or(
                &repo,
                &head,
                Reply::error(422, &format!("No commit found for SHA: {head}")),
            )
            .await?;
            let empty = CheckRunState {
                name: String::new(),
                status: "queued".into(),
                conclusion: None,
                details_url: None,
                external_id: None,
                output: CheckRunOutput::default(),
                actions: Vec::new(),
                started_at: Some(time(SystemTime::now())),
                completed_at: None,
            };
            let state = apply_check_run(empty, &body);
            let mut world = shared.world.lock().unwrap();
            let installation_id = match auth.identity {
                Identity::Installation(id) => Some(id),
                _ => None,
            };
            let run = CheckRun {
                id: world.next_id(),
                repo: repo.full_name(),
                head_sha: sha,
                installation_id,
                history: vec![state],
            };
            world.check_runs.insert(run.id, run.clone());
            Ok(Reply::ok(
                201,
                Render {
                    base,
                    world: &world,
                }
                .check_run(&run),
            ))
        }
        ("PATCH", "/repos/{owner}/{repo}/check-runs/{check_run_id}") => {
            let repo = readable(shared, auth, op)?;
            writer(shared, auth, &repo, true)?;
            let id = number(op, "check_run_id")?;
            let mut world = shared.world.lock().unwrap();
            let Some(run) = world
                .check_runs
                .get_mut(&id)
                .filter(|r| r.repo == repo.full_name())
            else {
                return Err(Reply::not_found());
            };
            let state = apply_check_run(run.current().clone(), body.unwrap_or(&Value::Null));
            run.history.push(state);
            let run = run.clone();
            Ok(Reply::ok(
                200,
                Render {
                    base,
                    world: &world,
                }
                .check_run(&run),
            ))
        }
        ("GET", "/repos/{owner}/{repo}/check-runs/{check_run_id}") => {
            let repo = readable(shared, auth, op)?;
            let id = number(op, "check_run_id")?;
            let world = shared.world.lock().unwrap();
            let run = world
                .check_runs
                .get(&id)
                .filter(|r| r.repo == repo.full_name())
                .ok_or_else(Reply::not_found)?;
            Ok(Reply::ok(
                200,
                Render {
                    base,
                    world: &world,
                }
                .check_run(run),
            ))
        }
        ("GET", "/repos/{owner}/{repo}/commits/{ref}/check-runs") => {
            let repo = readable(shared, auth, op)?;
            let reference = op.param("ref");
            let sha = resolve_or(
                &repo,
                reference,
                Reply::error(422, &format!("No commit found for SHA: {reference}")),
            )
            .await?;
            let name = query_value("check_name");
            let status = query_value("status");
            let latest = query_value("filter").is_none_or(|f| f == "latest");
            let world = shared.world.lock().unwrap();
            let mut runs: Vec<&CheckRun> = world
                .check_runs
                .values()
                .rev()
                .filter(|r| r.repo == repo.full_name() && r.head_sha == sha)
                .filter(|r| name.as_ref().is_none_or(|n| &r.current().name == n))
                .filter(|r| status.as_ref().is_none_or(|s| &r.current().status == s))
                .collect();
            if latest {
                let mut seen = std::collections::HashSet::new();
                runs.retain(|r| seen.insert(r.current().name.clone()));
            }
            let render = Render {
                base,
                world: &world,
            };
            Ok(Reply::ok(
                200,
                json!({
                    "total_count": runs.len(),
                    "check_runs": runs.iter().map(|r| render.check_run(r)).collect::<Vec<_>>(),
                }),
            ))
        }
        _ => {
            // In the description but not modelled: still a 404 and a violation.
            shared.world.lock().unwrap().violations.push(format!(
                "{} {}: the fake does not model this operation",
                op.method, op.template
            ));
            Err(Reply::not_found())
        }
    }
}

/// A check run's next state: `state` with the fields `body` sets.
fn apply_check_run(mut state: CheckRunState, body: &Value) -> CheckRunState {
    let text = |key: &str| body[key].as_str().map(str::to_string);
    if let Some(name) = text("name") {
        state.name = name;
    }
    if let Some(status) = text("status") {
        state.status = status;
    }
    if let Some(url) = text("details_url") {
        state.details_url = Some(url);
    }
    if let Some(id) = text("external_id") {
        state.external_id = Some(id);
    }
    if let Some(at) = text("started_at") {
        state.started_at = Some(at);
    }
    if let Some(conclusion) = text("conclusion") {
        // GitHub: a conclusion completes the run.
        state.conclusion = Some(conclusion);
        state.status = "completed".into();
    }
    if let Some(at) = text("completed_at") {
        state.completed_at = Some(at);
    }
    if state.status == "completed" && state.completed_at.is_none() {
        state.completed_at = Some(time(SystemTime::now()));
    }
    if let Some(output) = body.get("output").filter(|o| o.is_object()) {
        let field = |key: &str| output[key].as_str().map(str::to_string);
        state.output = CheckRunOutput {
            title: field("title"),
            summary: field("summary"),
            text: field("text"),
        };
    }
    if let Some(actions) = body["actions"].as_array() {
        state.actions = actions.clone();
    }
    state
}

/// `(owner/name, rest)` of a git smart-HTTP path `/{owner}/{name}.git/{rest}`.
fn git_path(path: &str) -> Option<(String, String)> {
    let mut parts = path.trim_start_matches('/').splitn(3, '/');
    let (owner, name, rest) = (
        parts.next()?,
        parts.next()?,
        parts.next().unwrap_or_default(),
    );
    let name = name.strip_suffix(".git")?;
    if owner == "repos" || owner.is_empty() || name.is_empty() {
        return None;
    }
    Some((format!("{owner}/{name}"), rest.to_string()))
}

#[allow(clippy::too_many_arguments)]
async fn git_handler(
    shared: &Shared,
    auth: &Auth,
    method: &Method,
    uri: &Uri,
    headers: &HeaderMap,
    full_name: &str,
    rest: &str,
    body: &[u8],
) -> (u16, Response) {
    let plain = |status: StatusCode, text: &str| {
        (status.as_u16(), (status, text.to_string()).into_response())
    };
    let repo = {
        let world = shared.world.lock().unwrap();
        match world.repo(full_name) {
            Some(repo) if world.can_read(&auth.identity, auth.token.as_deref(), repo) => {
                Ok(repo.clone())
            }
            Some(repo)
                if repo.private
                    && matches!(auth.identity, Identity::Anonymous | Identity::Invalid(_)) =>
            {
                Err(true)
            }
            _ => Err(false),
        }
    };
    let repo = match repo {
        Ok(repo) => repo,
        // GitHub asks for credentials when it got none (or bad ones) ...
        Err(true) => {
            let response = (
                StatusCode::UNAUTHORIZED,
                [("www-authenticate", "Basic realm=\"GitHub\"")],
                "Invalid username or token.",
            )
                .into_response();
            return (401, response);
        }
        // ... and otherwise does not admit the repository exists.
        Err(false) => return plain(StatusCode::NOT_FOUND, "Repository not found."),
    };
    if rest.contains("git-receive-pack") {
        return plain(
            StatusCode::FORBIDDEN,
            "Pushing to the fake GitHub goes through its model, not git.",
        );
    }
    let header = |name: &str| headers.get(name).and_then(|v| v.to_str().ok());
    // The model's repositories live at `{root}/{owner}/{name}.git`; the request's spelling of
    // the name may differ in case.
    let path_info = format!("/{}.git/{rest}", repo.full_name());
    let request = git::CgiRequest {
        method: method.as_str(),
        path_info: &path_info,
        query: uri.query().unwrap_or_default(),
        content_type: header("content-type"),
        git_protocol: header("git-protocol"),
        content_encoding: header("content-encoding"),
        body,
    };
    match git::http_backend(&shared.git_root, request).await {
        Ok(cgi) => {
            let mut response = (
                StatusCode::from_u16(cgi.status).unwrap_or(StatusCode::INTERNAL_SERVER_ERROR),
                cgi.body,
            )
                .into_response();
            for (name, value) in cgi.headers {
                if let (Ok(name), Ok(value)) = (
                    axum::http::HeaderName::from_bytes(name.as_bytes()),
                    axum::http::HeaderValue::from_str(&value),
                ) {
                    response.headers_mut().insert(name, value);
                }
            }
            (cgi.status, response)
        }
        Err(error) => plain(StatusCode::INTERNAL_SERVER_ERROR, &format!("{error:#}")),
    }
}
