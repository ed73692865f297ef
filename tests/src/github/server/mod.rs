//! The fake's HTTP server: one handler matches each request to the GitHub operation it is (by
//! GitHub's own path templates), checks it against the description, answers from the model and
//! checks the answer too. Paths ending in `.git/...` are smart-HTTP git.

mod app;
mod checks;
mod git_http;
mod issues;
mod pulls;
mod repos;

use std::sync::Arc;

use axum::body::Bytes;
use axum::extract::State;
use axum::http::{HeaderMap, Method, StatusCode, Uri};
use axum::response::{IntoResponse, Response};
use base64::Engine as _;
use serde_json::{Value, json};

use super::Shared;
use super::git;
use super::model::{Identity, RecordedRequest, Repository};
use super::openapi::{self, Operation};

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

/// One call of a REST operation, as its handler sees it.
#[derive(Clone, Copy)]
struct Call<'a> {
    shared: &'a Shared,
    op: &'a Operation,
    auth: &'a Auth,
    query: &'a [(String, String)],
    /// The JSON body, already checked against the operation's schema.
    body: Option<&'a Value>,
}

impl Call<'_> {
    fn base(&self) -> &str {
        &self.shared.url
    }

    fn query_value(&self, name: &str) -> Option<String> {
        self.query
            .iter()
            .find(|(k, _)| k == name)
            .map(|(_, v)| v.clone())
    }

    /// Whether the caller authenticated as the App itself (a JWT).
    fn is_app(&self) -> bool {
        self.auth.identity == Identity::App
    }
}

/// GitHub's answer to an `/app` call without a valid App JWT.
fn jwt_required() -> Reply {
    Reply::error(401, "A JSON web token could not be decoded")
}

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
    if let Some((repo, rest)) = git_http::git_path(&path) {
        let (status, response) =
            git_http::git_handler(&shared, &auth, &method, &uri, &headers, &repo, &rest, &body)
                .await;
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
    let bad_body = !request_problems.body.is_empty();
    problems.extend(request_problems.all().cloned());
    let injected = {
        let mut world = shared.world.lock().unwrap();
        let position = world
            .injected_failures
            .iter()
            .position(|(m, t, _)| *m == op.method && *t == op.template);
        position.map(|i| world.injected_failures.remove(i).2)
    };
    let reply = if !body.is_empty() && json_body.is_none() {
        Reply::error(400, "Problems parsing JSON")
    } else if let Some(status) = injected {
        Reply::error(status, "The fake GitHub was told to fail this call.")
    } else if bad_body {
        Reply::error(422, "Invalid request.")
    } else {
        match dispatch(Call {
            shared: &shared,
            op: &op,
            auth: &auth,
            query: &query,
            body: json_body.as_ref(),
        })
        .await
        {
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

async fn dispatch(call: Call<'_>) -> Answer {
    if let Identity::Invalid(message) = &call.auth.identity {
        return Err(Reply::error(401, message));
    }
    let op = call.op;
    match (op.method.as_str(), op.template.as_str()) {
        ("GET", "/user") => app::get_authenticated_user(&call).await,
        ("GET", "/app") => app::get_app(&call).await,
        ("GET", "/app/installations/{installation_id}") => app::get_installation(&call).await,
        ("POST", "/app/installations/{installation_id}/access_tokens") => {
            app::create_installation_token(&call).await
        }
        ("GET", "/installation/repositories") => app::list_installation_repositories(&call).await,
        ("GET", "/repos/{owner}/{repo}") => repos::get_repository(&call).await,
        ("GET", "/repos/{owner}/{repo}/installation") => {
            app::get_repository_installation(&call).await
        }
        ("GET", "/repos/{owner}/{repo}/contents/{path}") => repos::get_content(&call).await,
        ("GET", "/repos/{owner}/{repo}/commits/{ref}") => repos::get_commit(&call).await,
        ("GET", "/repos/{owner}/{repo}/compare/{basehead}") => repos::compare_commits(&call).await,
        ("GET", "/repos/{owner}/{repo}/branches/{branch}") => repos::get_branch(&call).await,
        ("GET", "/repos/{owner}/{repo}/pulls/{pull_number}") => {
            pulls::get_pull_request(&call).await
        }
        ("GET", "/repos/{owner}/{repo}/pulls/{pull_number}/reviews") => {
            pulls::list_reviews(&call).await
        }
        ("GET", "/repos/{owner}/{repo}/pulls/{pull_number}/reviews/{review_id}") => {
            pulls::get_review(&call).await
        }
        ("GET", "/repos/{owner}/{repo}/pulls/{pull_number}/files") => {
            pulls::list_pull_request_files(&call).await
        }
        ("GET", "/repos/{owner}/{repo}/commits/{commit_sha}/pulls") => {
            pulls::list_pull_requests_of_commit(&call).await
        }
        ("GET", "/repos/{owner}/{repo}/issues/{issue_number}/comments") => {
            issues::list_comments(&call).await
        }
        ("GET", "/repos/{owner}/{repo}/issues/{issue_number}/labels") => {
            issues::list_labels(&call).await
        }
        ("GET", "/repos/{owner}/{repo}/issues/{issue_number}/events") => {
            issues::list_events(&call).await
        }
        ("GET", "/repos/{owner}/{repo}/issues/comments/{comment_id}") => {
            issues::get_comment(&call).await
        }
        ("POST", "/repos/{owner}/{repo}/issues/{issue_number}/comments") => {
            issues::create_comment(&call).await
        }
        ("PATCH", "/repos/{owner}/{repo}/issues/comments/{comment_id}") => {
            issues::update_comment(&call).await
        }
        ("POST", "/repos/{owner}/{repo}/issues/comments/{comment_id}/reactions") => {
            issues::create_reaction(&call).await
        }
        ("POST", "/repos/{owner}/{repo}/commits/{commit_sha}/comments") => {
            issues::create_commit_comment(&call).await
        }
        ("GET", "/repos/{owner}/{repo}/collaborators/{username}/permission") => {
            repos::get_collaborator_permission(&call).await
        }
        ("POST", "/repos/{owner}/{repo}/check-runs") => checks::create_check_run(&call).await,
        ("PATCH", "/repos/{owner}/{repo}/check-runs/{check_run_id}") => {
            checks::update_check_run(&call).await
        }
        ("GET", "/repos/{owner}/{repo}/check-runs/{check_run_id}") => {
            checks::get_check_run(&call).await
        }
        ("GET", "/repos/{owner}/{repo}/commits/{ref}/check-runs") => {
            checks::list_check_runs_for_ref(&call).await
        }
        _ => {
            // In the description but not modelled: still a 404 and a violation.
            call.shared.world.lock().unwrap().violations.push(format!(
                "{} {}: the fake does not model this operation",
                op.method, op.template
            ));
            Err(Reply::not_found())
        }
    }
}
