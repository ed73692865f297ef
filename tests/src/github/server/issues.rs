//! Issue comments, their reactions, and commit comments.

use std::time::SystemTime;

use serde_json::{Value, json};

use super::{Answer, Call, Reply, number, readable, resolve_or, writer};
use crate::github::model::{Comment, CommitComment, Permission, Reaction};
use crate::github::render::Render;

/// `GET /repos/{owner}/{repo}/issues/{issue_number}/comments`
pub(super) async fn list_comments(call: &Call<'_>) -> Answer {
    let Call {
        shared, op, auth, ..
    } = *call;
    let base = call.base();

    let repo = readable(shared, auth, op)?;
    let n = number(op, "issue_number")?;
    let world = shared.world.lock().unwrap();
    let render = Render::new(base, &world);
    let comments: Vec<Value> = world
        .comments
        .values()
        .filter(|c| c.repo == repo.full_name() && c.issue_number == n)
        .map(|c| render.comment(c))
        .collect();
    Ok(Reply::ok(200, json!(comments)))
}

/// `GET /repos/{owner}/{repo}/issues/{issue_number}/labels`
pub(super) async fn list_labels(call: &Call<'_>) -> Answer {
    let Call {
        shared, op, auth, ..
    } = *call;
    let base = call.base();

    let repo = readable(shared, auth, op)?;
    let n = number(op, "issue_number")?;
    let world = shared.world.lock().unwrap();
    let pr = world
        .pulls
        .get(&(repo.full_name(), n))
        .ok_or_else(Reply::not_found)?;
    let render = Render::new(base, &world);
    let labels: Vec<Value> = pr
        .labels
        .iter()
        .map(|l| render.label(&pr.repo, l))
        .collect();
    Ok(Reply::ok(200, json!(labels)))
}

/// `GET /repos/{owner}/{repo}/issues/{issue_number}/events`: the label events, oldest first,
/// paged as GitHub pages them (`per_page`, default 30; `page` from 1).
pub(super) async fn list_events(call: &Call<'_>) -> Answer {
    let Call {
        shared, op, auth, ..
    } = *call;
    let base = call.base();

    let repo = readable(shared, auth, op)?;
    let n = number(op, "issue_number")?;
    let query = |name: &str| call.query_value(name).and_then(|v| v.parse::<usize>().ok());
    let per_page = query("per_page").unwrap_or(30).clamp(1, 100);
    let page = query("page").unwrap_or(1).max(1);
    let world = shared.world.lock().unwrap();
    if !world.pulls.contains_key(&(repo.full_name(), n)) {
        return Err(Reply::not_found());
    }
    let render = Render::new(base, &world);
    let events: Vec<Value> = world
        .issue_events
        .values()
        .filter(|e| e.repo == repo.full_name() && e.issue_number == n)
        .skip((page - 1) * per_page)
        .take(per_page)
        .map(|e| render.issue_event(e))
        .collect();
    Ok(Reply::ok(200, json!(events)))
}

/// `GET /repos/{owner}/{repo}/issues/comments/{comment_id}`
pub(super) async fn get_comment(call: &Call<'_>) -> Answer {
    let Call {
        shared, op, auth, ..
    } = *call;
    let base = call.base();

    let repo = readable(shared, auth, op)?;
    let id = number(op, "comment_id")?;
    let world = shared.world.lock().unwrap();
    let comment = world
        .comments
        .get(&id)
        .filter(|c| c.repo == repo.full_name())
        .ok_or_else(Reply::not_found)?;
    Ok(Reply::ok(200, Render::new(base, &world).comment(comment)))
}

/// `POST /repos/{owner}/{repo}/issues/{issue_number}/comments`
pub(super) async fn create_comment(call: &Call<'_>) -> Answer {
    let Call {
        shared,
        op,
        auth,
        body,
        ..
    } = *call;
    let base = call.base();

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
        let reply = Render::new(base, &world).comment(&comment);
        (
            reply,
            crate::github::events::issue_comment(shared, &world, &comment, "created", None),
        )
    };
    shared.emit_in_background(delivery);
    Ok(Reply::ok(201, reply))
}

/// `PATCH /repos/{owner}/{repo}/issues/comments/{comment_id}`
pub(super) async fn update_comment(call: &Call<'_>) -> Answer {
    let Call {
        shared,
        op,
        auth,
        body,
        ..
    } = *call;
    let base = call.base();

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
        let reply = Render::new(base, &world).comment(&comment);
        (
            reply,
            crate::github::events::issue_comment(shared, &world, &comment, "edited", Some(&before)),
        )
    };
    shared.emit_in_background(delivery);
    Ok(Reply::ok(200, reply))
}

/// `POST /repos/{owner}/{repo}/issues/comments/{comment_id}/reactions`
pub(super) async fn create_reaction(call: &Call<'_>) -> Answer {
    let Call {
        shared,
        op,
        auth,
        body,
        ..
    } = *call;
    let base = call.base();

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
        return Ok(Reply::ok(200, Render::new(base, &world).reaction(existing)));
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
        Render::new(base, &world).reaction(&reaction),
    ))
}

/// `POST /repos/{owner}/{repo}/commits/{commit_sha}/comments`
pub(super) async fn create_commit_comment(call: &Call<'_>) -> Answer {
    let Call {
        shared,
        op,
        auth,
        body,
        ..
    } = *call;
    let base = call.base();

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
        Render::new(base, &world).commit_comment(&comment),
    ))
}
