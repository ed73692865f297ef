//! Check runs.

use std::time::SystemTime;

use serde_json::{Value, json};

use super::{Answer, Call, Reply, number, readable, resolve_or, writer};
use crate::github::model::{CheckRun, CheckRunOutput, CheckRunState, Identity};
use crate::github::render::{Render, time};

/// `POST /repos/{owner}/{repo}/check-runs`
pub(super) async fn create_check_run(call: &Call<'_>) -> Answer {
    let Call {
        shared,
        op,
        auth,
        body,
        ..
    } = *call;
    let base = call.base();

    let repo = readable(shared, auth, op)?;
    writer(shared, auth, &repo, true)?;
    let body = body.cloned().unwrap_or_default();
    let head = body["head_sha"].as_str().unwrap_or_default().to_string();
    // GitHub takes a commit's full sha here, not a branch name.
    let full_sha = head.len() == 40 && head.bytes().all(|b| b.is_ascii_hexdigit());
    if !full_sha {
        return Err(Reply::error(
            422,
            &format!("No commit found for SHA: {head}"),
        ));
    }
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
    Ok(Reply::ok(201, Render::new(base, &world).check_run(&run)))
}

/// `PATCH /repos/{owner}/{repo}/check-runs/{check_run_id}`
pub(super) async fn update_check_run(call: &Call<'_>) -> Answer {
    let Call {
        shared,
        op,
        auth,
        body,
        ..
    } = *call;
    let base = call.base();

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
    Ok(Reply::ok(200, Render::new(base, &world).check_run(&run)))
}

/// `GET /repos/{owner}/{repo}/check-runs/{check_run_id}`
pub(super) async fn get_check_run(call: &Call<'_>) -> Answer {
    let Call {
        shared, op, auth, ..
    } = *call;
    let base = call.base();

    let repo = readable(shared, auth, op)?;
    let id = number(op, "check_run_id")?;
    let world = shared.world.lock().unwrap();
    let run = world
        .check_runs
        .get(&id)
        .filter(|r| r.repo == repo.full_name())
        .ok_or_else(Reply::not_found)?;
    Ok(Reply::ok(200, Render::new(base, &world).check_run(run)))
}

/// `GET /repos/{owner}/{repo}/commits/{ref}/check-runs`
pub(super) async fn list_check_runs_for_ref(call: &Call<'_>) -> Answer {
    let Call {
        shared, op, auth, ..
    } = *call;
    let base = call.base();
    let query_value = |name: &str| call.query_value(name);

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
    let render = Render::new(base, &world);
    Ok(Reply::ok(
        200,
        json!({
            "total_count": runs.len(),
            "check_runs": runs.iter().map(|r| render.check_run(r)).collect::<Vec<_>>(),
        }),
    ))
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
