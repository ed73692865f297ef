//! A fake of the two GitHub REST endpoints the broker calls to check a user token: `GET /user`
//! and `GET /repos/{owner}/{repo}` (with the caller's `permissions` and the repository's and
//! owner's ids). Served on loopback.

use std::collections::HashMap;
use std::sync::Arc;

use axum::extract::{Path, State};
use axum::http::{HeaderMap, StatusCode};
use serde_json::json;

/// One user of the fake: their token, login, and the repositories they administer or can read.
#[derive(Clone, Debug)]
pub struct FakeUser {
    pub login: String,
    pub admin_of: Vec<String>,
    pub reader_of: Vec<String>,
}

pub struct FakeGitHub {
    pub url: String,
    server: tokio::task::JoinHandle<()>,
}

impl Drop for FakeGitHub {
    fn drop(&mut self) {
        self.server.abort();
    }
}

type Users = Arc<HashMap<String, FakeUser>>;

impl FakeGitHub {
    /// Serves `users`, keyed by token.
    pub async fn start(users: HashMap<String, FakeUser>) -> FakeGitHub {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let url = format!("http://{}", listener.local_addr().unwrap());
        let app = axum::Router::new()
            .route("/user", axum::routing::get(user_handler))
            .route("/repos/{owner}/{repo}", axum::routing::get(repo_handler))
            .with_state(Arc::new(users));
        let server = tokio::spawn(async move {
            let _ = axum::serve(listener, app).await;
        });
        FakeGitHub { url, server }
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

fn caller(users: &Users, headers: &HeaderMap) -> Option<FakeUser> {
    let token = headers
        .get("authorization")?
        .to_str()
        .ok()?
        .strip_prefix("Bearer ")?;
    users.get(token).cloned()
}

fn unauthorized() -> (StatusCode, axum::Json<serde_json::Value>) {
    (
        StatusCode::UNAUTHORIZED,
        axum::Json(json!({"message": "Bad credentials"})),
    )
}

async fn user_handler(
    State(users): State<Users>,
    headers: HeaderMap,
) -> (StatusCode, axum::Json<serde_json::Value>) {
    match caller(&users, &headers) {
        Some(user) => (
            StatusCode::OK,
            axum::Json(json!({"login": user.login, "id": 1, "type": "User"})),
        ),
        None => unauthorized(),
    }
}

async fn repo_handler(
    State(users): State<Users>,
    headers: HeaderMap,
    Path((owner, repo)): Path<(String, String)>,
) -> (StatusCode, axum::Json<serde_json::Value>) {
    let Some(user) = caller(&users, &headers) else {
        return unauthorized();
    };
    let full = format!("{owner}/{repo}");
    let admin = user.admin_of.contains(&full);
    if !admin && !user.reader_of.contains(&full) {
        return (
            StatusCode::NOT_FOUND,
            axum::Json(json!({"message": "Not Found"})),
        );
    }
    (
        StatusCode::OK,
        axum::Json(json!({
            "id": repository_id(&full),
            "owner": {"login": owner, "id": owner_id(&owner)},
            "full_name": full,
            "private": false,
            "permissions": {"admin": admin, "maintain": admin, "push": admin, "triage": true, "pull": true}
        })),
    )
}
