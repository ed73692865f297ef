//! The webhooks model actions emit: GitHub's example payload of the event and action, with the
//! model's values patched in (ids, names, shas, refs, `installation.id`, `sender`).

use serde_json::{Value, json};

use super::Shared;
use super::git::{CommitInfo, FileChange};
use super::model::{CheckRun, Comment, Installation, PullRequest, Review, World};
use super::render::{Render, time};
use super::webhooks::{Delivery, example, merge_into};

/// The example of `event`/`action` with `repository`, `sender` and `installation` of the model.
fn base_payload(
    shared: &Shared,
    world: &World,
    event: &str,
    action: Option<&str>,
    repo: Option<&str>,
    sender: &str,
) -> Value {
    patched(shared, world, example(event, action), repo, sender)
}

/// `payload` with `repository`, `sender` and `installation` of the model.
fn patched(
    shared: &Shared,
    world: &World,
    mut payload: Value,
    repo: Option<&str>,
    sender: &str,
) -> Value {
    let render = Render::new(&shared.url, world);
    let object = payload.as_object_mut().expect("a payload is an object");
    object.remove("organization");
    object.remove("enterprise");
    object.insert("sender".into(), render.user(sender));
    match repo.and_then(|r| world.repo(r)) {
        Some(repo) => {
            let mut value = object.remove("repository").unwrap_or_else(|| json!({}));
            merge_into(&mut value, render.repository(repo));
            object.insert("repository".into(), value);
            match world.installation_of(&repo.full_name()) {
                Some(installation) => {
                    object.insert("installation".into(), json!({"id": installation.id, "node_id": format!("MDIz{}", installation.id)}));
                }
                None => {
                    object.remove("installation");
                }
            }
        }
        None => {
            object.remove("repository");
        }
    }
    payload
}

fn delivery(shared: &Shared, world: &World, event: &str, payload: Value) -> Delivery {
    let mut delivery = Delivery::new(event, shared.hook_id, payload);
    delivery.installation_target_id = world.app_id;
    delivery
}

/// A branch or tag that moved, as a `push` webhook describes it.
pub(crate) struct RefUpdate<'a> {
    /// The full name, `refs/heads/...` or `refs/tags/...`.
    pub reference: &'a str,
    /// Where it pointed before (forty zeros: it is new).
    pub before: &'a str,
    pub after: &'a str,
    pub pusher: &'a str,
    pub forced: bool,
    /// The commits pushed, oldest first, with the files each changed.
    pub commits: &'a [(CommitInfo, Vec<FileChange>)],
}

/// `push` of `update` to `repo`.
pub(crate) fn push(shared: &Shared, world: &World, repo: &str, update: &RefUpdate<'_>) -> Delivery {
    let RefUpdate {
        reference,
        before,
        after,
        pusher,
        forced,
        commits,
    } = *update;
    let mut payload = base_payload(shared, world, "push", None, Some(repo), pusher);
    let base = &shared.url;
    merge_into(
        &mut payload,
        json!({
            "ref": reference,
            "before": before,
            "after": after,
            "created": before.chars().all(|c| c == '0'),
            "deleted": after.chars().all(|c| c == '0'),
            "forced": forced,
            "base_ref": null,
            "compare": format!("{base}/{repo}/compare/{}...{}", &before[..12.min(before.len())], &after[..12.min(after.len())]),
            "commits": commits.iter().map(|(info, files)| pushed_commit(base, repo, info, files)).collect::<Vec<_>>(),
            "head_commit": commits.last().map(|(info, files)| pushed_commit(base, repo, info, files)),
            "pusher": {"name": pusher, "email": format!("{pusher}@users.noreply.example.com")},
        }),
    );
    delivery(shared, world, "push", payload)
}

/// One commit of a `push` payload.
fn pushed_commit(base: &str, repo: &str, info: &CommitInfo, files: &[FileChange]) -> Value {
    let person =
        |(name, email, _): &(String, String, String)| json!({"name": name, "email": email});
    let with_status = |status: &str| {
        files
            .iter()
            .filter(|f| f.status == status)
            .map(|f| f.filename.clone())
            .collect::<Vec<_>>()
    };
    json!({
        "id": info.sha,
        "tree_id": info.tree,
        "distinct": true,
        "message": info.message,
        "timestamp": info.committer.2,
        "url": format!("{base}/{repo}/commit/{}", info.sha),
        "author": person(&info.author),
        "committer": person(&info.committer),
        "added": with_status("added"),
        "removed": with_status("removed"),
        "modified": with_status("modified"),
    })
}

/// `pull_request` with `action` (opened, synchronize, closed, ...).
pub(crate) fn pull_request(
    shared: &Shared,
    world: &World,
    pr: &PullRequest,
    action: &str,
    sender: &str,
    before: Option<&str>,
) -> Delivery {
    let mut payload = base_payload(
        shared,
        world,
        "pull_request",
        Some(action),
        Some(&pr.repo),
        sender,
    );
    let render = Render::new(&shared.url, world);
    merge_into(&mut payload["pull_request"], render.pull_request(pr, false));
    payload["number"] = json!(pr.number);
    if action == "synchronize" {
        payload["before"] = json!(before.unwrap_or_default());
        payload["after"] = json!(pr.head_sha);
    }
    delivery(shared, world, "pull_request", payload)
}

/// `issue_comment` with `action` (created, edited: `before` is the old body).
pub(crate) fn issue_comment(
    shared: &Shared,
    world: &World,
    comment: &Comment,
    action: &str,
    before: Option<&str>,
) -> Delivery {
    let on_pull_request = world
        .pulls
        .contains_key(&(comment.repo.clone(), comment.issue_number));
    let mut template = if on_pull_request {
        super::webhooks::issue_comment_on_pull_request()
    } else {
        example("issue_comment", Some(action))
    };
    template["action"] = json!(action);
    let mut payload = patched(
        shared,
        world,
        template,
        Some(&comment.repo),
        &comment.author,
    );
    let render = Render::new(&shared.url, world);
    merge_into(&mut payload["comment"], render.comment(comment));
    if let Some(pr) = world
        .pulls
        .get(&(comment.repo.clone(), comment.issue_number))
    {
        let pull = render.pull_request(pr, true);
        let base = &shared.url;
        merge_into(
            &mut payload["issue"],
            json!({
                "id": pr.id,
                "number": pr.number,
                "title": pr.title,
                "body": pr.body,
                "user": render.user(&pr.author),
                "state": if pr.open { "open" } else { "closed" },
                "url": format!("{base}/repos/{}/issues/{}", pr.repo, pr.number),
                "html_url": pull["html_url"],
                "comments_url": pull["comments_url"],
                "pull_request": {
                    "url": pull["url"], "html_url": pull["html_url"], "diff_url": pull["diff_url"],
                    "patch_url": pull["patch_url"], "merged_at": pull["merged_at"],
                },
            }),
        );
    }
    match before {
        Some(before) => payload["changes"] = json!({"body": {"from": before}}),
        None => {
            if let Some(object) = payload.as_object_mut() {
                object.remove("changes");
            }
        }
    }
    delivery(shared, world, "issue_comment", payload)
}

/// `pull_request_review` submitted.
pub(crate) fn review_submitted(shared: &Shared, world: &World, review: &Review) -> Delivery {
    let mut payload = base_payload(
        shared,
        world,
        "pull_request_review",
        Some("submitted"),
        Some(&review.repo),
        &review.author,
    );
    let render = Render::new(&shared.url, world);
    let mut value = render.review(review);
    // Webhooks spell review states in lower case.
    value["state"] = json!(review.state.to_ascii_lowercase());
    merge_into(&mut payload["review"], value);
    if let Some(pr) = world.pulls.get(&(review.repo.clone(), review.number)) {
        merge_into(&mut payload["pull_request"], render.pull_request(pr, true));
    }
    delivery(shared, world, "pull_request_review", payload)
}

/// `check_run` with `action` (rerequested; requested_action with `identifier`).
pub(crate) fn check_run(
    shared: &Shared,
    world: &World,
    run: &CheckRun,
    action: &str,
    sender: &str,
    identifier: Option<&str>,
) -> Delivery {
    let mut payload = base_payload(
        shared,
        world,
        "check_run",
        Some(action),
        Some(&run.repo),
        sender,
    );
    let render = Render::new(&shared.url, world);
    let mut value = render.check_run(run);
    value["check_suite"] = json!({
        "id": run.id + 500_000_000,
        "head_sha": run.head_sha,
        "head_branch": null,
        "status": run.current().status,
        "conclusion": run.current().conclusion,
        "url": format!("{}/repos/{}/check-suites/{}", shared.url, run.repo, run.id + 500_000_000),
        "before": null, "after": run.head_sha, "pull_requests": value["pull_requests"],
        "app": value["app"],
        "created_at": run.current().started_at, "updated_at": run.current().started_at,
    });
    merge_into(&mut payload["check_run"], value);
    if let Some(identifier) = identifier {
        payload["requested_action"] = json!({"identifier": identifier});
    }
    delivery(shared, world, "check_run", payload)
}

/// `installation` created or deleted.
pub(crate) fn installation(
    shared: &Shared,
    world: &World,
    installation: &Installation,
    action: &str,
    sender: &str,
) -> Delivery {
    let mut payload = base_payload(shared, world, "installation", Some(action), None, sender);
    let render = Render::new(&shared.url, world);
    merge_into(
        &mut payload["installation"],
        render.installation(installation),
    );
    let repositories: Vec<Value> = installation
        .repositories
        .iter()
        .filter_map(|r| world.repo(r))
        .map(|r| json!({"id": r.id, "node_id": format!("R_{}", r.id), "name": r.name, "full_name": r.full_name(), "private": r.private}))
        .collect();
    payload["repositories"] = json!(repositories);
    if let Some(object) = payload.as_object_mut() {
        object.remove("requester");
    }
    delivery(shared, world, "installation", payload)
}

/// `ping`, as GitHub sends when a webhook is set up.
pub(crate) fn ping(shared: &Shared, world: &World) -> Delivery {
    let mut payload = example("ping", None);
    let hook_id = shared.hook_id;
    merge_into(
        &mut payload,
        json!({"hook_id": hook_id, "sender": Render::new(&shared.url, world).user(&world.app_owner)}),
    );
    if let Some(hook) = payload.get_mut("hook") {
        hook["id"] = json!(hook_id);
        hook["app_id"] = json!(world.app_id);
        hook["updated_at"] = json!(time(std::time::SystemTime::now()));
    }
    delivery(shared, world, "ping", payload)
}
