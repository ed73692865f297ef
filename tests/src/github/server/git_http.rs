//! Smart-HTTP git at `{url}/{owner}/{repo}.git`, served by `git http-backend`, with GitHub's
//! rules: public repositories for anyone, private ones for tokens that can read them (as the
//! password of HTTP basic auth, `x-access-token:<token>`).

use axum::http::{HeaderMap, Method, StatusCode, Uri};
use axum::response::{IntoResponse, Response};

use super::Auth;
use crate::github::Shared;
use crate::github::git;
use crate::github::model::Identity;

/// `(owner/name, rest)` of a git smart-HTTP path `/{owner}/{name}.git/{rest}`.
pub(super) fn git_path(path: &str) -> Option<(String, String)> {
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
pub(super) async fn git_handler(
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
