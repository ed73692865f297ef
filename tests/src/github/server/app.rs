//! The App, its installations and their tokens; the authenticated user.

use std::time::SystemTime;

use serde_json::{Value, json};

use super::{Answer, Call, Reply, jwt_required, number};
use crate::github::model::{Identity, Token};
use crate::github::render::{Render, time};

/// `GET /user`
pub(super) async fn get_authenticated_user(call: &Call<'_>) -> Answer {
    let Call { shared, auth, .. } = *call;
    let base = call.base();
    match &auth.identity {
        Identity::User(login) => {
            let world = shared.world.lock().unwrap();
            Ok(Reply::ok(200, Render::new(base, &world).public_user(login)))
        }
        Identity::Anonymous => Err(Reply::error(401, "Requires authentication")),
        _ => Err(Reply::error(403, "Resource not accessible by integration")),
    }
}

/// `GET /app`
pub(super) async fn get_app(call: &Call<'_>) -> Answer {
    let Call { shared, .. } = *call;
    let base = call.base();
    let is_app = call.is_app();

    if !is_app {
        return Err(jwt_required());
    }
    let world = shared.world.lock().unwrap();
    Ok(Reply::ok(200, Render::new(base, &world).app()))
}

/// `GET /app/installations/{installation_id}`
pub(super) async fn get_installation(call: &Call<'_>) -> Answer {
    let Call { shared, op, .. } = *call;
    let base = call.base();
    let is_app = call.is_app();

    if !is_app {
        return Err(jwt_required());
    }
    let id = number(op, "installation_id")?;
    let world = shared.world.lock().unwrap();
    let installation = world.installations.get(&id).ok_or_else(Reply::not_found)?;
    Ok(Reply::ok(
        200,
        Render::new(base, &world).installation(installation),
    ))
}

/// `POST /app/installations/{installation_id}/access_tokens`
pub(super) async fn create_installation_token(call: &Call<'_>) -> Answer {
    let Call {
        shared, op, body, ..
    } = *call;
    let base = call.base();
    let is_app = call.is_app();

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
    let only: Option<Vec<String>> = body
        .and_then(|b| b["repositories"].as_array())
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
        crate::github::webhooks::new_delivery_id().replace('-', "")
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
    let render = Render::new(base, &world);
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

/// `GET /installation/repositories`
pub(super) async fn list_installation_repositories(call: &Call<'_>) -> Answer {
    let Call { shared, auth, .. } = *call;
    let base = call.base();

    let world = shared.world.lock().unwrap();
    if !matches!(auth.identity, Identity::Installation(_)) {
        return Err(Reply::error(
            403,
            "This endpoint requires you to authenticate as an installation (an installation access token).",
        ));
    }
    let render = Render::new(base, &world);
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

/// `GET /repos/{owner}/{repo}/installation`
pub(super) async fn get_repository_installation(call: &Call<'_>) -> Answer {
    let Call { shared, op, .. } = *call;
    let base = call.base();
    let is_app = call.is_app();

    if !is_app {
        return Err(jwt_required());
    }
    let world = shared.world.lock().unwrap();
    let full = format!("{}/{}", op.param("owner"), op.param("repo"));
    let installation = world.installation_of(&full).ok_or_else(Reply::not_found)?;
    Ok(Reply::ok(
        200,
        Render::new(base, &world).installation(installation),
    ))
}
