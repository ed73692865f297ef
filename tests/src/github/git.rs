//! The fake's repositories are real bare git repositories: commits are made with the `git` CLI,
//! and clients fetch them over smart HTTP served by `git http-backend` run as a CGI program.

use std::path::{Path, PathBuf};
use std::process::Stdio;

use anyhow::{Context as _, bail};
use tokio::io::AsyncWriteExt as _;

/// The identity commits made by the model carry (author and committer).
const AUTHOR: (&str, &str) = ("Fake GitHub", "fake-github@example.com");

/// Runs `git` in `git_dir` with `args`, feeding `stdin`; its stdout, trimmed of the last newline.
pub async fn git(git_dir: &Path, args: &[&str], stdin: Option<&[u8]>) -> anyhow::Result<String> {
    git_with_index(git_dir, None, args, stdin).await
}

/// [`git`], with `GIT_INDEX_FILE` set to `index` when given.
async fn git_with_index(
    git_dir: &Path,
    index: Option<&Path>,
    args: &[&str],
    stdin: Option<&[u8]>,
) -> anyhow::Result<String> {
    let mut command = tokio::process::Command::new("git");
    command
        .arg("--git-dir")
        .arg(git_dir)
        .args(args)
        .env("GIT_AUTHOR_NAME", AUTHOR.0)
        .env("GIT_AUTHOR_EMAIL", AUTHOR.1)
        .env("GIT_COMMITTER_NAME", AUTHOR.0)
        .env("GIT_COMMITTER_EMAIL", AUTHOR.1)
        .env("GIT_CONFIG_NOSYSTEM", "1")
        .env("GIT_CONFIG_GLOBAL", "/dev/null")
        .env("TZ", "UTC")
        .stdin(if stdin.is_some() {
            Stdio::piped()
        } else {
            Stdio::null()
        })
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .kill_on_drop(true);
    if let Some(index) = index {
        command.env("GIT_INDEX_FILE", index);
    }
    let mut child = command.spawn().context("Cannot run git")?;
    if let Some(input) = stdin {
        let mut pipe = child.stdin.take().expect("stdin is piped");
        pipe.write_all(input).await?;
        drop(pipe);
    }
    let output = child.wait_with_output().await?;
    if !output.status.success() {
        bail!(
            "git {} failed: {}",
            args.join(" "),
            String::from_utf8_lossy(&output.stderr).trim()
        );
    }
    let mut stdout = String::from_utf8(output.stdout).context("git printed non-UTF-8")?;
    if stdout.ends_with('\n') {
        stdout.pop();
    }
    Ok(stdout)
}

/// Creates an empty bare repository whose default branch is `default_branch`.
pub async fn init_bare(git_dir: &Path, default_branch: &str) -> anyhow::Result<()> {
    tokio::fs::create_dir_all(git_dir).await?;
    git(
        git_dir,
        &[
            "init",
            "--bare",
            "--quiet",
            &format!("--initial-branch={default_branch}"),
        ],
        None,
    )
    .await?;
    // Clients fetch exact commits (`git fetch <url> <sha>`), as they can from GitHub.
    for (key, value) in [
        ("uploadpack.allowAnySHA1InWant", "true"),
        ("uploadpack.allowReachableSHA1InWant", "true"),
        ("uploadpack.allowTipSHA1InWant", "true"),
        ("http.receivepack", "false"),
    ] {
        git(git_dir, &["config", key, value], None).await?;
    }
    Ok(())
}

/// The commit `rev` names, if any (a branch, tag, `refs/...` name or sha).
pub async fn resolve(git_dir: &Path, rev: &str) -> Option<String> {
    if rev.starts_with('-') {
        return None;
    }
    git(
        git_dir,
        &[
            "rev-parse",
            "--verify",
            "--quiet",
            &format!("{rev}^{{commit}}"),
        ],
        None,
    )
    .await
    .ok()
    .filter(|sha| !sha.is_empty())
}

/// Commits `files` (path, content) on top of `branch` and moves the branch there; the new
/// commit's sha. An absent branch starts at `start` (a root commit when that is absent too).
pub async fn commit_files(
    git_dir: &Path,
    scratch: &Path,
    branch: &str,
    start: Option<&str>,
    files: &[(&str, &str)],
    message: &str,
) -> anyhow::Result<String> {
    let mut parent = resolve(git_dir, &format!("refs/heads/{branch}")).await;
    if parent.is_none()
        && let Some(start) = start
    {
        parent = resolve(git_dir, start).await;
    }
    let index = tempfile_path(&scratch.join("index"));
    let run = |args: &[&str], stdin: Option<&[u8]>| {
        let args: Vec<String> = args.iter().map(|a| a.to_string()).collect();
        let stdin = stdin.map(<[u8]>::to_vec);
        let index = index.clone();
        async move {
            let args: Vec<&str> = args.iter().map(String::as_str).collect();
            git_with_index(git_dir, Some(&index), &args, stdin.as_deref()).await
        }
    };
    match &parent {
        Some(parent) => run(&["read-tree", parent], None).await?,
        None => run(&["read-tree", "--empty"], None).await?,
    };
    for (path, content) in files {
        let blob = run(&["hash-object", "-w", "--stdin"], Some(content.as_bytes())).await?;
        run(
            &[
                "update-index",
                "--add",
                "--cacheinfo",
                &format!("100644,{blob},{path}"),
            ],
            None,
        )
        .await?;
    }
    let tree = run(&["write-tree"], None).await?;
    let mut args = vec!["commit-tree", tree.as_str(), "-m", message];
    if let Some(parent) = &parent {
        args.extend(["-p", parent.as_str()]);
    }
    let sha = run(&args, None).await?;
    let _ = tokio::fs::remove_file(&index).await;
    update_ref(git_dir, &format!("refs/heads/{branch}"), &sha).await?;
    Ok(sha)
}

/// A path beside `base` no other call uses at the same time.
fn tempfile_path(base: &Path) -> PathBuf {
    static NEXT: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);
    let n = NEXT.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
    base.with_extension(n.to_string())
}

/// Points `reference` (a full name, `refs/...`) at `sha`, whatever it pointed at before.
pub async fn update_ref(git_dir: &Path, reference: &str, sha: &str) -> anyhow::Result<()> {
    git(git_dir, &["update-ref", reference, sha], None).await?;
    Ok(())
}

/// Copies `reference` of the repository at `from` into `to` as `into` (objects included).
pub async fn fetch_ref(to: &Path, from: &Path, reference: &str, into: &str) -> anyhow::Result<()> {
    let from = from.to_string_lossy();
    git(
        to,
        &[
            "fetch",
            "--quiet",
            "--no-tags",
            &from,
            &format!("+{reference}:{into}"),
        ],
        None,
    )
    .await?;
    Ok(())
}

/// A merge commit of `head` into `base` (no conflicts allowed); its sha.
pub async fn merge_commit(
    git_dir: &Path,
    base: &str,
    head: &str,
    message: &str,
) -> anyhow::Result<String> {
    let tree = git(git_dir, &["merge-tree", "--write-tree", base, head], None)
        .await
        .context("Cannot merge: the branches conflict")?;
    let tree = tree.lines().next().unwrap_or_default().to_string();
    git(
        git_dir,
        &["commit-tree", &tree, "-p", base, "-p", head, "-m", message],
        None,
    )
    .await
}

/// How `head` compares with `base`: (commits only in base, commits only in head, merge base).
pub async fn ahead_behind(
    git_dir: &Path,
    base: &str,
    head: &str,
) -> anyhow::Result<(u64, u64, Option<String>)> {
    let counts = git(
        git_dir,
        &[
            "rev-list",
            "--left-right",
            "--count",
            &format!("{base}...{head}"),
        ],
        None,
    )
    .await?;
    let mut counts = counts
        .split_whitespace()
        .map(|n| n.parse::<u64>().unwrap_or_default());
    let behind = counts.next().unwrap_or_default();
    let ahead = counts.next().unwrap_or_default();
    let merge_base = git(git_dir, &["merge-base", base, head], None).await.ok();
    Ok((behind, ahead, merge_base))
}

/// The commits in `head` that are not in `base`, oldest first.
pub async fn commits_between(
    git_dir: &Path,
    base: &str,
    head: &str,
) -> anyhow::Result<Vec<String>> {
    let list = git(
        git_dir,
        &["rev-list", "--reverse", &format!("{base}..{head}")],
        None,
    )
    .await?;
    Ok(list.lines().map(str::to_string).collect())
}

/// One commit as `git` describes it.
#[derive(Clone, Debug)]
pub struct CommitInfo {
    pub sha: String,
    pub tree: String,
    pub parents: Vec<String>,
    pub author: (String, String, String),
    pub committer: (String, String, String),
    pub message: String,
}

/// The commit `sha`.
pub async fn commit_info(git_dir: &Path, sha: &str) -> anyhow::Result<CommitInfo> {
    let out = git(
        git_dir,
        &[
            "show",
            "-s",
            "--date=format-local:%Y-%m-%dT%H:%M:%SZ",
            "--format=%H%n%T%n%P%n%an%n%ae%n%ad%n%cn%n%ce%n%cd%n%B",
            sha,
        ],
        None,
    )
    .await?;
    let mut lines = out.splitn(10, '\n');
    let mut next = || lines.next().unwrap_or_default().to_string();
    Ok(CommitInfo {
        sha: next(),
        tree: next(),
        parents: next().split_whitespace().map(str::to_string).collect(),
        author: (next(), next(), next()),
        committer: (next(), next(), next()),
        message: next().trim_end().to_string(),
    })
}

/// A changed file between two commits.
#[derive(Clone, Debug)]
pub struct FileChange {
    pub filename: String,
    /// GitHub's word: `added`, `removed`, `modified`, `renamed`.
    pub status: &'static str,
    pub additions: u64,
    pub deletions: u64,
    /// The blob after the change (before it, for a removed file).
    pub sha: String,
}

/// The files that differ from `base` to `head` (`base` may be `None`: the root commit).
pub async fn changed_files(
    git_dir: &Path,
    base: Option<&str>,
    head: &str,
) -> anyhow::Result<Vec<FileChange>> {
    let empty_tree = git(
        git_dir,
        &["hash-object", "-t", "tree", "-w", "--stdin"],
        Some(b""),
    )
    .await?;
    let base = base.unwrap_or(&empty_tree).to_string();
    let raw = git(
        git_dir,
        &[
            "diff",
            "--no-renames",
            "--raw",
            "-z",
            "--abbrev=40",
            &base,
            head,
        ],
        None,
    )
    .await?;
    let numstat = git(
        git_dir,
        &["diff", "--no-renames", "--numstat", &base, head],
        None,
    )
    .await?;
    let mut counts = std::collections::HashMap::new();
    for line in numstat.lines() {
        let mut parts = line.splitn(3, '\t');
        let (add, del, name) = (parts.next(), parts.next(), parts.next());
        if let (Some(add), Some(del), Some(name)) = (add, del, name) {
            counts.insert(
                name.to_string(),
                (add.parse().unwrap_or(0), del.parse().unwrap_or(0)),
            );
        }
    }
    let mut changes = Vec::new();
    let mut fields = raw.split('\0');
    while let Some(meta) = fields.next() {
        let Some(name) = fields.next() else { break };
        // `:old_mode new_mode old_sha new_sha status`
        let parts: Vec<&str> = meta.trim_start_matches(':').split(' ').collect();
        if parts.len() < 5 {
            continue;
        }
        let (status, sha) = match parts[4] {
            "A" => ("added", parts[3]),
            "D" => ("removed", parts[2]),
            _ => ("modified", parts[3]),
        };
        let (additions, deletions) = counts.get(name).copied().unwrap_or((0, 0));
        changes.push(FileChange {
            filename: name.to_string(),
            status,
            additions,
            deletions,
            sha: sha.to_string(),
        });
    }
    Ok(changes)
}

/// What a pull request from `head` into `base` changes (GitHub's `commits`, `additions`,
/// `deletions`, `changed_files`).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct PullStats {
    pub commits: u64,
    pub additions: u64,
    pub deletions: u64,
    pub changed_files: u64,
}

/// [`PullStats`] of `head` against `base`, from their merge base.
pub async fn pull_stats(git_dir: &Path, base: &str, head: &str) -> anyhow::Result<PullStats> {
    let (_, _, merge_base) = ahead_behind(git_dir, base, head).await?;
    let merge_base = merge_base.context("the pull request shares no history with its base")?;
    let commits = commits_between(git_dir, &merge_base, head).await?.len() as u64;
    let files = changed_files(git_dir, Some(&merge_base), head).await?;
    Ok(PullStats {
        commits,
        additions: files.iter().map(|f| f.additions).sum(),
        deletions: files.iter().map(|f| f.deletions).sum(),
        changed_files: files.len() as u64,
    })
}

/// One entry of a directory.
#[derive(Clone, Debug)]
pub struct TreeEntry {
    /// `blob`, `tree` or `commit` (a submodule).
    pub kind: String,
    pub sha: String,
    /// Blobs only.
    pub size: Option<u64>,
    pub name: String,
}

/// The entries of directory `path` in commit `sha`, or `None` when it is not a directory.
pub async fn directory_at(git_dir: &Path, sha: &str, path: &str) -> Option<Vec<TreeEntry>> {
    let spec = format!("{sha}:{path}");
    if git(git_dir, &["cat-file", "-t", &spec], None).await.ok()? != "tree" {
        return None;
    }
    let listing = git(git_dir, &["ls-tree", "-l", "-z", &spec], None)
        .await
        .ok()?;
    let entries = listing
        .split('\0')
        .filter(|line| !line.is_empty())
        .filter_map(|line| {
            // `<mode> <type> <sha> <size>\t<name>`
            let (meta, name) = line.split_once('\t')?;
            let mut fields = meta.split_whitespace().skip(1);
            Some(TreeEntry {
                kind: fields.next()?.to_string(),
                sha: fields.next()?.to_string(),
                size: fields.next().and_then(|s| s.parse().ok()),
                name: name.to_string(),
            })
        })
        .collect();
    Some(entries)
}

/// The blob at `path` in commit `sha`: (blob sha, content), or `None` when there is no file.
pub async fn file_at(git_dir: &Path, sha: &str, path: &str) -> Option<(String, Vec<u8>)> {
    let spec = format!("{sha}:{path}");
    let kind = git(git_dir, &["cat-file", "-t", &spec], None).await.ok()?;
    if kind != "blob" {
        return None;
    }
    let blob = git(git_dir, &["rev-parse", &spec], None).await.ok()?;
    let output = tokio::process::Command::new("git")
        .arg("--git-dir")
        .arg(git_dir)
        .args(["cat-file", "blob", &blob])
        .output()
        .await
        .ok()?;
    output.status.success().then_some((blob, output.stdout))
}

/// What `git http-backend` answered: status, headers and body.
pub struct CgiResponse {
    pub status: u16,
    pub headers: Vec<(String, String)>,
    pub body: Vec<u8>,
}

/// One smart-HTTP request, in CGI's terms.
pub struct CgiRequest<'a> {
    pub method: &'a str,
    /// The path under the project root, `/{owner}/{name}.git/info/refs`.
    pub path_info: &'a str,
    pub query: &'a str,
    pub content_type: Option<&'a str>,
    /// The `Git-Protocol` header (protocol v2).
    pub git_protocol: Option<&'a str>,
    /// The `Content-Encoding` header (git gzips large requests).
    pub content_encoding: Option<&'a str>,
    pub body: &'a [u8],
}

/// Runs `git http-backend` for one request on the repositories under `project_root`.
pub async fn http_backend(
    project_root: &Path,
    request: CgiRequest<'_>,
) -> anyhow::Result<CgiResponse> {
    let CgiRequest {
        method,
        path_info,
        query,
        content_type,
        git_protocol,
        content_encoding,
        body,
    } = request;
    let exec_path = tokio::process::Command::new("git")
        .arg("--exec-path")
        .output()
        .await?;
    let exec_path = String::from_utf8(exec_path.stdout)?.trim().to_string();
    let mut command = tokio::process::Command::new(Path::new(&exec_path).join("git-http-backend"));
    command
        .env_clear()
        .env("PATH", std::env::var_os("PATH").unwrap_or_default())
        .env("GIT_PROJECT_ROOT", project_root)
        .env("GIT_HTTP_EXPORT_ALL", "1")
        .env("GIT_CONFIG_NOSYSTEM", "1")
        .env("GIT_CONFIG_GLOBAL", "/dev/null")
        .env("PATH_INFO", path_info)
        .env("QUERY_STRING", query)
        .env("REQUEST_METHOD", method)
        .env("CONTENT_TYPE", content_type.unwrap_or_default())
        .env("CONTENT_LENGTH", body.len().to_string())
        .env("REMOTE_USER", "fake-github")
        .env("REMOTE_ADDR", "127.0.0.1")
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .kill_on_drop(true);
    if let Some(protocol) = git_protocol {
        command.env("GIT_PROTOCOL", protocol);
    }
    // git sends large requests gzipped; http-backend inflates them itself when told.
    if let Some(encoding) = content_encoding {
        command.env("HTTP_CONTENT_ENCODING", encoding);
    }
    let mut child = command.spawn().context("Cannot run git http-backend")?;
    let mut stdin = child.stdin.take().expect("stdin is piped");
    let body = body.to_vec();
    // Write the request while reading the response: a large fetch fills both pipes.
    let writer = tokio::spawn(async move {
        let _ = stdin.write_all(&body).await;
    });
    let output = child.wait_with_output().await?;
    let _ = writer.await;
    parse_cgi(&output.stdout)
}

fn parse_cgi(output: &[u8]) -> anyhow::Result<CgiResponse> {
    let split = output
        .windows(4)
        .position(|w| w == b"\r\n\r\n")
        .map(|i| (i, 4))
        .or_else(|| output.windows(2).position(|w| w == b"\n\n").map(|i| (i, 2)))
        .context("git http-backend sent no header block")?;
    let head = std::str::from_utf8(&output[..split.0])?;
    let mut status = 200;
    let mut headers = Vec::new();
    for line in head.lines() {
        let Some((name, value)) = line.split_once(':') else {
            continue;
        };
        let value = value.trim().to_string();
        if name.eq_ignore_ascii_case("status") {
            status = value
                .split_whitespace()
                .next()
                .and_then(|s| s.parse().ok())
                .unwrap_or(500);
        } else {
            headers.push((name.to_string(), value));
        }
    }
    Ok(CgiResponse {
        status,
        headers,
        body: output[split.0 + split.1..].to_vec(),
    })
}
