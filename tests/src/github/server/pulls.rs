//! Pull requests, their reviews and files.

use serde_json::{Value, json};

use super::{Answer, Call, Reply, number, readable, resolve_or};
use crate::github::git;
use crate::github::render::Render;

/// `GET /repos/{owner}/{repo}/pulls/{pull_number}`
pub(super) async fn get_pull_request(call: &Call<'_>) -> Answer {
    let Call {
        shared, op, auth, ..
    } = *call;
    let base = call.base();

    let repo = readable(shared, auth, op)?;
    let n = number(op, "pull_number")?;
    let world = shared.world.lock().unwrap();
    let pr = world
        .pulls
        .get(&(repo.full_name(), n))
        .ok_or_else(Reply::not_found)?;
    Ok(Reply::ok(
        200,
        Render::new(base, &world).pull_request(pr, false),
    ))
}

/// `GET /repos/{owner}/{repo}/pulls/{pull_number}/reviews`
pub(super) async fn list_reviews(call: &Call<'_>) -> Answer {
    let Call {
        shared, op, auth, ..
    } = *call;
    let base = call.base();

    let repo = readable(shared, auth, op)?;
    let n = number(op, "pull_number")?;
    let world = shared.world.lock().unwrap();
    if !world.pulls.contains_key(&(repo.full_name(), n)) {
        return Err(Reply::not_found());
    }
    let render = Render::new(base, &world);
    let reviews: Vec<Value> = world
        .reviews
        .values()
        .filter(|r| r.repo == repo.full_name() && r.number == n)
        .map(|r| render.review(r))
        .collect();
    Ok(Reply::ok(200, json!(reviews)))
}

/// `GET /repos/{owner}/{repo}/pulls/{pull_number}/reviews/{review_id}`
pub(super) async fn get_review(call: &Call<'_>) -> Answer {
    let Call {
        shared, op, auth, ..
    } = *call;
    let base = call.base();

    let repo = readable(shared, auth, op)?;
    let (n, id) = (number(op, "pull_number")?, number(op, "review_id")?);
    let world = shared.world.lock().unwrap();
    let review = world
        .reviews
        .get(&id)
        .filter(|r| r.repo == repo.full_name() && r.number == n)
        .ok_or_else(Reply::not_found)?;
    Ok(Reply::ok(200, Render::new(base, &world).review(review)))
}

/// `GET /repos/{owner}/{repo}/pulls/{pull_number}/files`
pub(super) async fn list_pull_request_files(call: &Call<'_>) -> Answer {
    let Call {
        shared, op, auth, ..
    } = *call;
    let base = call.base();

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
    let render = Render::new(base, &world);
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

/// `GET /repos/{owner}/{repo}/commits/{commit_sha}/pulls`
pub(super) async fn list_pull_requests_of_commit(call: &Call<'_>) -> Answer {
    let Call {
        shared, op, auth, ..
    } = *call;
    let base = call.base();

    let repo = readable(shared, auth, op)?;
    let sha = resolve_or(
        &repo,
        op.param("commit_sha"),
        Reply::error(422, "No commit found for SHA"),
    )
    .await?;
    let world = shared.world.lock().unwrap();
    let render = Render::new(base, &world);
    let pulls: Vec<Value> = world
        .pulls
        .values()
        .filter(|p| {
            p.repo == repo.full_name()
                && (p.head_sha == sha || p.merge_commit_sha.as_deref() == Some(sha.as_str()))
        })
        .map(|p| render.pull_request(p, true))
        .collect();
    Ok(Reply::ok(200, json!(pulls)))
}
