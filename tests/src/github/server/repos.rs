//! Repositories: metadata, contents, commits, compares, branches, permissions.

use serde_json::json;

use super::{Answer, Call, Reply, readable, resolve_or};
use crate::github::git;
use crate::github::model::{Identity, Permission};
use crate::github::render::Render;

/// `GET /repos/{owner}/{repo}`
pub(super) async fn get_repository(call: &Call<'_>) -> Answer {
    let Call {
        shared, op, auth, ..
    } = *call;
    let base = call.base();

    let repo = readable(shared, auth, op)?;
    let world = shared.world.lock().unwrap();
    let login = match &auth.identity {
        Identity::User(login) => Some(login.as_str()),
        _ => None,
    };
    Ok(Reply::ok(
        200,
        Render::new(base, &world).repository_for(&repo, login),
    ))
}

/// `GET /repos/{owner}/{repo}/contents/{path}`
pub(super) async fn get_content(call: &Call<'_>) -> Answer {
    let Call {
        shared, op, auth, ..
    } = *call;
    let base = call.base();
    let query_value = |name: &str| call.query_value(name);

    let repo = readable(shared, auth, op)?;
    let reference = query_value("ref").unwrap_or(repo.default_branch.clone());
    let sha = resolve_or(
        &repo,
        &reference,
        Reply::error(404, &format!("No commit found for the ref {reference}")),
    )
    .await?;
    let path = op.param("path").trim_matches('/').to_string();
    if let Some(entries) = git::directory_at(&repo.git_dir, &sha, &path).await {
        let world = shared.world.lock().unwrap();
        return Ok(Reply::ok(
            200,
            Render::new(base, &world).content_directory(&repo, &path, &reference, &entries),
        ));
    }
    let (blob, content) = git::file_at(&repo.git_dir, &sha, &path)
        .await
        .ok_or_else(Reply::not_found)?;
    let world = shared.world.lock().unwrap();
    Ok(Reply::ok(
        200,
        Render::new(base, &world).content_file(&repo, &path, &reference, &blob, &content),
    ))
}

/// `GET /repos/{owner}/{repo}/commits/{ref}`
pub(super) async fn get_commit(call: &Call<'_>) -> Answer {
    let Call {
        shared, op, auth, ..
    } = *call;
    let base = call.base();

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
        Render::new(base, &world).commit(&repo, &info, Some(&files)),
    ))
}

/// `GET /repos/{owner}/{repo}/compare/{basehead}`
pub(super) async fn compare_commits(call: &Call<'_>) -> Answer {
    let Call {
        shared, op, auth, ..
    } = *call;
    let base = call.base();

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
    let render = Render::new(base, &world);
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

/// `GET /repos/{owner}/{repo}/branches/{branch}`
pub(super) async fn get_branch(call: &Call<'_>) -> Answer {
    let Call {
        shared, op, auth, ..
    } = *call;
    let base = call.base();

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
            "commit": Render::new(base, &world).commit(&repo, &info, None),
            "_links": {"html": format!("{base}/{full}/tree/{branch}"), "self": api},
            "protected": false,
            "protection": {"enabled": false, "required_status_checks": {"enforcement_level": "off", "contexts": [], "checks": []}},
            "protection_url": format!("{api}/protection"),
        }),
    ))
}

/// `GET /repos/{owner}/{repo}/collaborators/{username}/permission`
pub(super) async fn get_collaborator_permission(call: &Call<'_>) -> Answer {
    let Call {
        shared, op, auth, ..
    } = *call;
    let base = call.base();

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
    let render = Render::new(base, &world);
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
