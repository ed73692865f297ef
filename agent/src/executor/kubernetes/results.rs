//! Result files from a pod, fetched before the pod goes.
//!
//! A pod's workspace is an `emptyDir`: it is gone with the pod, and the agent cannot read it
//! from its own machine. A job that names result files therefore runs with a second container,
//! `results`, from the same image, as the same account and as confined as the job's, that only
//! sleeps and shares the workspace. Once the job's container has ended (passed, failed, killed
//! at the time limit or for its memory) the agent asks that container, over the API server's
//! `exec`, first for the workspace's list of regular files (`find`), matches the job's patterns
//! against it itself, and then for the matching files as one tar stream (`tar -c`), which it
//! unpacks into a directory of its own. From there the agent collects them as it does for every
//! executor, with the same checks and limits ([`crate::results::collect`]).
//!
//! Nothing in the stream is trusted: only regular files with plain relative names are written
//! (no links, devices, absolute names or `..`), each within the per-file limit and all within
//! the per-job one, into directories the agent creates itself. The image needs `sh`, `find`,
//! `tar`, `sleep`, `readlink` and `kill` (busybox or the GNU tools); without them the log says
//! which call failed and the job's result stands.
//!
//! The time limit of such a job is the agent's to enforce, so that a job stopped at its limit
//! still leaves its results: at the limit the agent signals the job container's processes from
//! the `results` container (`SIGTERM`, then `SIGKILL` after the grace period; they share the
//! pod's process namespace and are told apart by their mount namespace), and Kubernetes'
//! `activeDeadlineSeconds` is set later, as the backstop for an agent that is gone.

use std::io::Read as _;
use std::path::{Component, Path, PathBuf};
use std::time::Duration;

use k8s_openapi::api::core::v1::Pod;
use kube::api::{Api, AttachParams};
use tokio::io::AsyncReadExt as _;

use crate::results::CollectLimits;

/// The name of the container that holds the workspace open for the agent.
pub const CONTAINER: &str = "results";
/// What it runs: nothing but a sleep, which a pod deletion's SIGTERM ends at once (it is not
/// PID 1: the pod shares its process namespace).
pub const COMMAND: [&str; 2] = ["sleep", "2147483647"];
/// How much longer than the job's time limit Kubernetes lets a pod with a `results` container
/// run: the agent's own stop, the grace period and the fetch fit in it.
pub const DEADLINE_ALLOWANCE: Duration = Duration::from_secs(300);
/// The longest the file list and the fetch may take together.
const FETCH_TIMEOUT: Duration = Duration::from_secs(120);
/// The most bytes of file names read from the workspace's list (NUL-separated).
const MAX_LIST_BYTES: usize = 16 * 1024 * 1024;
/// The most bytes of a failed command's stderr kept for the message.
const MAX_STDERR_BYTES: usize = 4096;

/// Sends `signal` (`TERM` or `KILL`) to every process of the pod that is neither the pod's
/// init (the pause process, PID 1) nor in the `results` container's mount namespace: the job
/// container's processes.
pub fn signal_command(signal: &str) -> Vec<String> {
    let script = format!(
        r#"me=$(readlink /proc/self/ns/mnt) || exit 1
for d in /proc/[0-9]*; do
  p=${{d#/proc/}}
  [ "$p" = 1 ] && continue
  ns=$(readlink "$d/ns/mnt" 2>/dev/null) || continue
  [ "$ns" = "$me" ] || kill -s {signal} "$p" 2>/dev/null
done
exit 0"#
    );
    vec!["sh".into(), "-c".into(), script]
}

/// Signals the job container's processes from the `results` container of `pod`.
pub async fn signal_job(pods: &Api<Pod>, pod: &str, signal: &str) -> anyhow::Result<()> {
    let run = exec(pods, pod, signal_command(signal), 0);
    let (_, outcome) = tokio::time::timeout(Duration::from_secs(30), run)
        .await
        .map_err(|_| anyhow::anyhow!("no answer within 30 s"))??;
    outcome
}

/// Fetches the files of `pod`'s workspace that match `patterns` into `dest` (which is
/// created), within the limits of `limits` that apply to files (count and sizes). Returns notes
/// for the job's log; an error says which step failed.
pub async fn fetch(
    pods: &Api<Pod>,
    pod: &str,
    patterns: &[String],
    dest: &Path,
    limits: &CollectLimits,
) -> anyhow::Result<Vec<String>> {
    tokio::time::timeout(
        FETCH_TIMEOUT,
        fetch_within(pods, pod, patterns, dest, limits),
    )
    .await
    .map_err(|_| {
        anyhow::anyhow!(
            "fetching the result files from the pod took longer than {}",
            humantime::format_duration(FETCH_TIMEOUT)
        )
    })?
}

async fn fetch_within(
    pods: &Api<Pod>,
    pod: &str,
    patterns: &[String],
    dest: &Path,
    limits: &CollectLimits,
) -> anyhow::Result<Vec<String>> {
    let set = testbot_proto::results::result_globs(patterns).map_err(anyhow::Error::msg)?;
    // Left by an earlier attempt to fetch (an agent restarted in the middle).
    match std::fs::remove_dir_all(dest) {
        Ok(()) => {}
        Err(err) if err.kind() == std::io::ErrorKind::NotFound => {}
        Err(err) => {
            return Err(anyhow::Error::new(err).context(format!("Cannot empty {}", dest.display())));
        }
    }
    super::super::private_dir(dest)?;
    let list = vec![
        "sh".into(),
        "-c".into(),
        "cd /work && exec find . -name .git -prune -o -type f -print0".into(),
    ];
    let (listing, outcome) = exec(pods, pod, list, MAX_LIST_BYTES).await?;
    outcome.map_err(|err| anyhow::anyhow!("listing the pod's workspace failed: {err:#}"))?;
    let mut notes = Vec::new();
    if listing.len() >= MAX_LIST_BYTES {
        notes.push(format!(
            "results: the pod's workspace lists more than {} MiB of file names; the files past them are not looked at",
            MAX_LIST_BYTES / (1024 * 1024)
        ));
    }
    let chosen = choose(&listing, &set, limits.max_files);
    if chosen.is_empty() {
        // The collection that follows says which pattern matched nothing.
        return Ok(notes);
    }
    let mut command: Vec<String> = ["tar", "-c", "-f", "-", "-C", "/work", "--"]
        .map(String::from)
        .into();
    command.extend(chosen);
    let (dest_dir, limits) = (dest.to_path_buf(), limits.clone());
    let (unpacked, outcome) = exec_with(pods, pod, command, |stdout| {
        tokio::task::spawn_blocking(move || {
            unpack(
                tokio_util::io::SyncIoBridge::new(stdout),
                &dest_dir,
                &limits,
            )
        })
    })
    .await?;
    let unpacked = unpacked.map_err(|err| anyhow::anyhow!("unpacking failed: {err}"))?;
    let unpack_notes = unpacked.map_err(|err| anyhow::anyhow!("unpacking failed: {err:#}"))?;
    notes.extend(unpack_notes);
    if let Err(err) = outcome {
        notes.push(format!(
            "results: tar in the pod did not end cleanly ({err:#}); the files it sent whole are kept"
        ));
    }
    Ok(notes)
}

/// The file names in `listing` (NUL-separated, `./`-prefixed, as `find -print0` writes them)
/// that `set` matches, in path order, at most `max`.
fn choose(listing: &[u8], set: &globset::GlobSet, max: usize) -> Vec<String> {
    let mut chosen: Vec<String> = listing
        .split(|b| *b == 0)
        .filter_map(|name| std::str::from_utf8(name).ok())
        .filter_map(|name| name.strip_prefix("./"))
        .filter(|name| !name.is_empty() && set.is_match(name))
        .map(String::from)
        .collect();
    chosen.sort_unstable();
    chosen.dedup();
    // One more than the limit, so that the collection says the limit was reached.
    chosen.truncate(max.saturating_add(1));
    chosen
}

/// Unpacks the regular files of the tar stream `reader` into `dest`, within `limits`.
/// Returns notes for what was left out.
fn unpack(
    reader: impl std::io::Read,
    dest: &Path,
    limits: &CollectLimits,
) -> anyhow::Result<Vec<String>> {
    let mut notes = Vec::new();
    let mut archive = tar::Archive::new(reader);
    let (mut files, mut total) = (0usize, 0u64);
    for entry in archive.entries()? {
        let mut entry = entry?;
        let header = entry.header();
        let kind = header.entry_type();
        let name = String::from_utf8_lossy(&entry.path_bytes()).into_owned();
        if kind.is_dir() {
            continue;
        }
        if !(kind.is_file() || kind == tar::EntryType::Continuous) {
            notes.push(format!(
                "results: {name:?} in the pod is not a regular file; it is left out"
            ));
            continue;
        }
        let Some(relative) = plain_relative(&name) else {
            notes.push(format!(
                "results: {name:?} from the pod is not a plain relative name; it is left out"
            ));
            continue;
        };
        let size = entry.size();
        if size > limits.max_file_bytes {
            notes.push(format!(
                "results: {name} is {size} bytes, over the limit of {} per file; it is left out",
                limits.max_file_bytes
            ));
            continue;
        }
        if total + size > limits.max_total_bytes {
            notes.push(format!(
                "results: {name} would pass the limit of {} bytes of result files per job; it is left out",
                limits.max_total_bytes
            ));
            continue;
        }
        if files > limits.max_files {
            break;
        }
        let path = dest.join(&relative);
        if let Some(parent) = path.parent()
            && let Err(err) = std::fs::create_dir_all(parent)
        {
            notes.push(format!(
                "results: {name} cannot be written: {err}; it is left out"
            ));
            continue;
        }
        let mut out = match std::fs::OpenOptions::new()
            .write(true)
            .create_new(true)
            .open(&path)
        {
            Ok(out) => out,
            Err(err) if err.kind() == std::io::ErrorKind::AlreadyExists => {
                notes.push(format!(
                    "results: {name} came twice from the pod; the first is kept"
                ));
                continue;
            }
            Err(err) => return Err(err.into()),
        };
        let written = std::io::copy(&mut (&mut entry).take(size), &mut out)?;
        anyhow::ensure!(
            written == size,
            "the stream ended inside {name} ({written} of {size} bytes)"
        );
        files += 1;
        total += size;
    }
    Ok(notes)
}

/// `name` as a path of normal components only (`./` allowed), or `None`.
fn plain_relative(name: &str) -> Option<PathBuf> {
    let mut path = PathBuf::new();
    for component in Path::new(name).components() {
        match component {
            Component::Normal(part) => path.push(part),
            Component::CurDir => {}
            Component::ParentDir | Component::RootDir | Component::Prefix(_) => return None,
        }
    }
    (!path.as_os_str().is_empty()).then_some(path)
}

fn attach_params() -> AttachParams {
    AttachParams::default()
        .container(CONTAINER)
        .stdin(false)
        .stdout(true)
        .stderr(true)
}

/// Runs `command` in the `results` container of `pod`: its stdout (at most `max_stdout`
/// bytes; the rest is drained) and whether it succeeded.
async fn exec(
    pods: &Api<Pod>,
    pod: &str,
    command: Vec<String>,
    max_stdout: usize,
) -> anyhow::Result<(Vec<u8>, anyhow::Result<()>)> {
    exec_with(pods, pod, command, |stdout| {
        read_bounded(stdout, max_stdout)
    })
    .await
}

/// Runs `command` in the `results` container of `pod`, its stdout read by `read` while its
/// stderr is kept for the message: what `read` made of it, and whether the command succeeded.
async fn exec_with<T, F>(
    pods: &Api<Pod>,
    pod: &str,
    command: Vec<String>,
    read: impl FnOnce(tokio::io::ReadHalf<tokio::io::SimplexStream>) -> F,
) -> anyhow::Result<(T, anyhow::Result<()>)>
where
    F: Future<Output = T>,
{
    let program = command.first().cloned().unwrap_or_default();
    let mut attached = pods
        .exec(pod, command, &attach_params())
        .await
        .map_err(|err| {
            anyhow::anyhow!(
                "cannot run {program} in the pod's {CONTAINER} container: {}; the agent's account needs get and create on pods/exec in the namespace",
                super::describe(&err)
            )
        })?;
    let stdout = attached.stdout().expect("stdout was asked for");
    let stderr = attached.stderr().expect("stderr was asked for");
    let status = attached.take_status().expect("status is taken once");
    let (read, stderr) = tokio::join!(read(stdout), read_bounded(stderr, MAX_STDERR_BYTES));
    let outcome = status_outcome(status.await, &stderr);
    attached.abort();
    Ok((read, outcome))
}

/// Reads up to `max` bytes of `reader`, then drains the rest so the command is not held up.
async fn read_bounded(mut reader: impl tokio::io::AsyncRead + Unpin, max: usize) -> Vec<u8> {
    let mut kept = Vec::new();
    let mut buf = vec![0u8; 64 * 1024];
    loop {
        match reader.read(&mut buf).await {
            Ok(0) | Err(_) => return kept,
            Ok(n) => {
                let room = max.saturating_sub(kept.len());
                kept.extend_from_slice(&buf[..n.min(room)]);
            }
        }
    }
}

/// The command's end as the API server reports it: `Success`, or its message and stderr.
fn status_outcome(
    status: Option<k8s_openapi::apimachinery::pkg::apis::meta::v1::Status>,
    stderr: &[u8],
) -> anyhow::Result<()> {
    let stderr = String::from_utf8_lossy(stderr);
    let stderr = stderr.trim();
    match status {
        Some(status) if status.status.as_deref() == Some("Success") => Ok(()),
        Some(status) => {
            let message = status.message.unwrap_or_else(|| "no message".into());
            if stderr.is_empty() {
                anyhow::bail!("{message}")
            }
            anyhow::bail!("{message}: {stderr}")
        }
        None if stderr.is_empty() => anyhow::bail!("the command's status never came"),
        None => anyhow::bail!("the command's status never came: {stderr}"),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn limits() -> CollectLimits {
        CollectLimits {
            max_files: 10,
            max_file_bytes: 100,
            max_total_bytes: 150,
            ..CollectLimits::default()
        }
    }

    fn archive(build: impl FnOnce(&mut tar::Builder<Vec<u8>>)) -> Vec<u8> {
        let mut builder = tar::Builder::new(Vec::new());
        build(&mut builder);
        builder.into_inner().unwrap()
    }

    fn file(builder: &mut tar::Builder<Vec<u8>>, name: &str, data: &[u8]) {
        let mut header = tar::Header::new_gnu();
        header.set_size(data.len() as u64);
        header.set_entry_type(tar::EntryType::Regular);
        header.set_mode(0o644);
        // Written raw: `append_data` itself refuses the names an attacker would send.
        let bytes = name.as_bytes();
        header.as_old_mut().name[..bytes.len()].copy_from_slice(bytes);
        header.set_cksum();
        builder.append(&header, data).unwrap();
    }

    #[test]
    fn only_regular_files_with_plain_names_within_the_limits_are_unpacked() {
        let dest = tempfile::tempdir().unwrap();
        let stream = archive(|b| {
            file(b, "./build/junit.xml", b"<testsuite/>");
            file(b, "../escape.xml", b"x");
            file(b, "/etc/cron.d/evil", b"x");
            file(b, "big.xml", &[b'a'; 101]);
            file(b, "a.xml", &[b'a'; 100]);
            file(b, "b.xml", &[b'b'; 60]);
            let mut link = tar::Header::new_gnu();
            link.set_entry_type(tar::EntryType::Symlink);
            link.set_size(0);
            b.append_link(&mut link, "link.xml", "/etc/shadow").unwrap();
        });
        let notes = unpack(&stream[..], dest.path(), &limits()).unwrap();
        let text = notes.join("\n");
        assert_eq!(
            std::fs::read(dest.path().join("build/junit.xml")).unwrap(),
            b"<testsuite/>"
        );
        assert!(dest.path().join("a.xml").is_file());
        assert!(
            text.contains("\"../escape.xml\" from the pod is not a plain relative name"),
            "{text}"
        );
        assert!(
            text.contains("\"/etc/cron.d/evil\" from the pod is not a plain relative name"),
            "{text}"
        );
        assert!(
            text.contains("big.xml is 101 bytes, over the limit of 100"),
            "{text}"
        );
        assert!(
            text.contains("b.xml would pass the limit of 150 bytes"),
            "{text}"
        );
        assert!(
            text.contains("\"link.xml\" in the pod is not a regular file"),
            "{text}"
        );
        assert!(!dest.path().join("b.xml").exists());
        assert!(!dest.path().join("link.xml").exists());
        assert!(!dest.path().parent().unwrap().join("escape.xml").exists());
    }

    #[test]
    fn a_stream_cut_inside_a_file_is_an_error_naming_it() {
        let dest = tempfile::tempdir().unwrap();
        let stream = archive(|b| file(b, "junit.xml", &[b'a'; 90]));
        let err = unpack(&stream[..600], dest.path(), &limits()).unwrap_err();
        assert!(format!("{err:#}").contains("junit.xml"), "{err:#}");
    }

    #[test]
    fn the_listing_is_matched_in_path_order_without_git_or_odd_names() {
        let set = testbot_proto::results::result_globs(&["**/junit*.xml".into()]).unwrap();
        let listing =
            b"./b/junit.xml\0./a/junit-1.xml\0./a/other.xml\0./a/junit\xff.xml\0./junit.xml\0";
        assert_eq!(
            choose(listing, &set, 10),
            vec!["a/junit-1.xml", "b/junit.xml", "junit.xml"]
        );
        assert_eq!(
            choose(listing, &set, 1),
            vec!["a/junit-1.xml", "b/junit.xml"]
        );
    }
}
