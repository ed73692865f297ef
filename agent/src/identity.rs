//! Identity mapping (downscoping): which local account a job runs as.
//!
//! A job never runs as the agent's own account. The site policy's `[identity]` table names the
//! account, in this order:
//!
//! 1. the first `[[identity.map]]` entry whose `actor` and `repository` both match the verified
//!    claims (an entry may set either or both);
//! 2. otherwise the admin's script (`[identity.script]`), pinned by its sha256: it receives the
//!    claims as JSON on stdin and prints the account name;
//! 3. otherwise `default_account`.
//!
//! The name is then looked up in the host's user database: an account that does not exist, or
//! whose uid is 0, is refused.

use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::time::Duration;

use nix::unistd::{Gid, Uid, User};
use serde::Deserialize;
use testbot_proto::glob::glob_match;
use testbot_proto::oidc::WorkflowClaims;
use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};

use crate::policy::settings::de_duration;

/// The most output read from an identity script (stdout and stderr each).
const MAX_SCRIPT_OUTPUT: u64 = 64 * 1024;

/// The `PATH` an identity script runs with; nothing else of the agent's environment is passed.
const SCRIPT_PATH_ENV: &str = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin";

/// The `[identity]` table of a site policy.
#[derive(Debug, Clone, Default, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct IdentitySettings {
    /// The account of a job no `[[identity.map]]` entry matches. Default: none (such jobs are
    /// refused). Exclusive with `script`.
    #[serde(default)]
    pub default_account: Option<String>,
    /// Static mappings, tried in file order. Default: none.
    #[serde(default)]
    pub map: Vec<AccountMapping>,
    /// A script that picks the account of a job no `[[identity.map]]` entry matches. Default:
    /// none. Exclusive with `default_account`.
    #[serde(default)]
    pub script: Option<AccountScript>,
}

/// One `[[identity.map]]` entry: jobs of this actor and/or repository run as `account`.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct AccountMapping {
    /// The GitHub login that triggered the run (exact). Default: any actor.
    #[serde(default)]
    pub actor: Option<String>,
    /// GitHub's numeric id of `actor` (the token's `actor_id`): a job of the login whose id
    /// differs (the login was renamed and taken by someone else) is refused, not mapped.
    /// Default: not pinned.
    #[serde(default)]
    pub actor_id: Option<u64>,
    /// A repository glob (`owner/name`, `owner/*`). Default: any repository.
    #[serde(default)]
    pub repository: Option<String>,
    /// The local account. Required.
    pub account: String,
}

/// `[identity.script]`: the admin's validation script.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct AccountScript {
    /// Absolute path of the executable. Required.
    pub path: PathBuf,
    /// The sha256 of the file, 64 hex digits (`sha256sum FILE`); checked before every run.
    /// Required.
    pub sha256: String,
    /// How long the script may take. Default: `10s`.
    #[serde(default = "default_script_timeout", deserialize_with = "de_duration")]
    pub timeout: Duration,
}

fn default_script_timeout() -> Duration {
    Duration::from_secs(10)
}

/// How the policy picks a job's account, before anything is looked up.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum AccountChoice {
    /// An account the policy names.
    Named { name: String, source: AccountSource },
    /// The admin's script decides when the job is about to run.
    Script(AccountScript),
}

/// Which part of `[identity]` named an account.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum AccountSource {
    /// `[[identity.map]]` entry number `index` (0-based).
    Map { index: usize },
    /// `identity.default_account`.
    Default,
}

impl std::fmt::Display for AccountChoice {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            AccountChoice::Named {
                name,
                source: AccountSource::Map { index },
            } => write!(f, "account {name} (identity.map[{index}])"),
            AccountChoice::Named {
                name,
                source: AccountSource::Default,
            } => write!(f, "account {name} (identity.default_account)"),
            AccountChoice::Script(script) => write!(
                f,
                "the account printed by {} (identity.script)",
                script.path.display()
            ),
        }
    }
}

/// The local account a job runs as.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LocalAccount {
    pub name: String,
    pub uid: Uid,
    pub gid: Gid,
    pub home: PathBuf,
}

impl IdentitySettings {
    /// How the account of a job with these claims is chosen; `None` when nothing maps it. `Err`
    /// (a sentence for the submitter) when the entry matching the job's login pins another
    /// `actor_id`: the job is refused, not passed on to a later entry or the default.
    pub fn choose(&self, claims: &WorkflowClaims) -> Result<Option<AccountChoice>, String> {
        let mapped = self.map.iter().position(|entry| {
            entry.actor.as_ref().is_none_or(|a| *a == claims.actor)
                && entry
                    .repository
                    .as_ref()
                    .is_none_or(|r| glob_match(r, &claims.repository))
        });
        if let Some(index) = mapped {
            let entry = &self.map[index];
            if let Some(pinned) = entry.actor_id
                && claims.actor_id.as_deref() != Some(pinned.to_string().as_str())
            {
                return Err(format!(
                    "actor {} has id {}, but identity.map[{index}] pins that login to id {pinned}: the login may have passed to someone else, so the job is not mapped to account {}",
                    claims.actor,
                    claims
                        .actor_id
                        .as_deref()
                        .unwrap_or("none (the token carries no actor_id)"),
                    entry.account
                ));
            }
            return Ok(Some(AccountChoice::Named {
                name: entry.account.clone(),
                source: AccountSource::Map { index },
            }));
        }
        if let Some(script) = &self.script {
            return Ok(Some(AccountChoice::Script(script.clone())));
        }
        Ok(self
            .default_account
            .as_ref()
            .map(|name| AccountChoice::Named {
                name: name.clone(),
                source: AccountSource::Default,
            }))
    }

    /// Every account name the file writes (map entries, then the default).
    pub fn named_accounts(&self) -> impl Iterator<Item = &str> {
        self.map
            .iter()
            .map(|m| m.account.as_str())
            .chain(self.default_account.as_deref())
    }
}

/// Resolves a choice to a local account: runs the script if the choice is one, then looks the
/// name up. The error is a sentence for the job's log.
pub async fn resolve(
    choice: &AccountChoice,
    claims: &WorkflowClaims,
) -> Result<LocalAccount, String> {
    let name = match choice {
        AccountChoice::Named { name, .. } => name.clone(),
        AccountChoice::Script(script) => run_script(script, claims).await?,
    };
    tokio::task::spawn_blocking(move || lookup_account(&name))
        .await
        .map_err(|e| format!("cannot look up the account: {e}"))?
}

/// Looks an account up in the host's user database (blocking: it may ask LDAP or SSSD).
/// Accounts that do not exist and uid 0 are refused.
pub fn lookup_account(name: &str) -> Result<LocalAccount, String> {
    let user = User::from_name(name)
        .map_err(|e| format!("cannot look up account {name}: {e}"))?
        .ok_or_else(|| format!("account {name} does not exist on this host"))?;
    if user.uid.is_root() {
        return Err(format!("account {name} has uid 0: jobs never run as root"));
    }
    Ok(LocalAccount {
        name: user.name,
        uid: user.uid,
        gid: user.gid,
        home: user.dir,
    })
}

/// The lowercase hex sha256 of a file's contents.
pub fn sha256_file(path: &Path) -> std::io::Result<String> {
    let bytes = std::fs::read(path)?;
    let digest = ring::digest::digest(&ring::digest::SHA256, &bytes);
    Ok(digest.as_ref().iter().map(|b| format!("{b:02x}")).collect())
}

/// Checks that the script on disk is the one the policy pins, and that nobody but its owner can
/// change it. The error says what to do.
pub fn check_script(script: &AccountScript) -> Result<(), String> {
    open_script(script).map(|_| ())
}

/// Opens the identity script once and checks what was opened: a regular file (not a link) owned
/// by root or the agent's account, writable by no one else, in directories no one else can
/// write to (sticky ones aside), whose sha256 is the pinned one. The caller executes this open
/// file ([`run_opened`]), never the path again, so the file cannot be swapped between the check
/// and the run.
pub fn open_script(script: &AccountScript) -> Result<std::fs::File, String> {
    use std::io::Read as _;
    use std::os::unix::fs::{MetadataExt as _, OpenOptionsExt as _};
    let path = script.path.display();
    let agent = Uid::effective().as_raw();
    let owned_by_us = |uid: u32| uid == 0 || uid == agent;
    let mut ancestors = script.path.ancestors().skip(1).peekable();
    let parent = ancestors.peek().copied();
    for dir in ancestors {
        let meta = std::fs::metadata(dir).map_err(|e| {
            format!(
                "cannot read directory {} of identity script {path}: {e}",
                dir.display()
            )
        })?;
        if Some(dir) == parent && !owned_by_us(meta.uid()) {
            return Err(format!(
                "directory {} of identity script {path} is owned by uid {}: it must be owned by root or by the agent's account",
                dir.display(),
                meta.uid()
            ));
        }
        if meta.mode() & 0o022 != 0 && meta.mode() & 0o1000 == 0 {
            return Err(format!(
                "directory {} of identity script {path} is writable by group or others (mode {:o}), so the script could be swapped: chmod go-w it",
                dir.display(),
                meta.mode() & 0o7777
            ));
        }
    }
    let mut file = std::fs::OpenOptions::new()
        .read(true)
        .custom_flags(nix::fcntl::OFlag::O_NOFOLLOW.bits())
        .open(&script.path)
        .map_err(|e| {
            if e.raw_os_error() == Some(nix::errno::Errno::ELOOP as i32) {
                format!("identity script {path} is a symbolic link: set identity.script.path to the file itself")
            } else {
                format!("cannot read identity script {path}: {e}")
            }
        })?;
    let meta = file
        .metadata()
        .map_err(|e| format!("cannot read identity script {path}: {e}"))?;
    if !meta.is_file() {
        return Err(format!("identity script {path} is not a regular file"));
    }
    let owner = meta.uid();
    if !owned_by_us(owner) {
        return Err(format!(
            "identity script {path} is owned by uid {owner}: it must be owned by root or by the agent's account"
        ));
    }
    if meta.mode() & 0o022 != 0 {
        return Err(format!(
            "identity script {path} is writable by group or others (mode {:o}): chmod go-w it",
            meta.mode() & 0o7777
        ));
    }
    let mut bytes = Vec::new();
    file.read_to_end(&mut bytes)
        .map_err(|e| format!("cannot read identity script {path}: {e}"))?;
    let digest = ring::digest::digest(&ring::digest::SHA256, &bytes);
    let actual: String = digest.as_ref().iter().map(|b| format!("{b:02x}")).collect();
    if !actual.eq_ignore_ascii_case(&script.sha256) {
        return Err(format!(
            "identity script {path} has sha256 {actual}, but the policy pins {}: refusing to run it; if the change is intended, put the new hash in identity.script.sha256",
            script.sha256
        ));
    }
    Ok(file)
}

/// Runs the identity script: hash checked first, claims as JSON on stdin, a clean environment,
/// its own process group, a time limit. Returns the account name it printed.
pub async fn run_script(script: &AccountScript, claims: &WorkflowClaims) -> Result<String, String> {
    let file = open_script(script)?;
    run_opened(&file, script, claims).await
}

/// Makes `fd` survive the `exec` of `command` in the child only. The interpreter of a `#!`
/// script opens `/proc/self/fd/N` after the exec, so the descriptor must still be open then;
/// clearing close-on-exec in the agent itself instead would hand it to every process the agent
/// starts meanwhile, jobs included.
#[allow(unsafe_code)]
fn keep_open_across_exec(command: &mut tokio::process::Command, fd: std::os::fd::RawFd) {
    // SAFETY: between fork and exec the closure calls only fcntl(2), which is
    // async-signal-safe, on a descriptor the parent keeps open until the child has started.
    unsafe {
        command.pre_exec(move || {
            let fd = std::os::fd::BorrowedFd::borrow_raw(fd);
            nix::fcntl::fcntl(
                fd,
                nix::fcntl::FcntlArg::F_SETFD(nix::fcntl::FdFlag::empty()),
            )
            .map(|_| ())
            .map_err(std::io::Error::from)
        });
    }
}

/// Runs the identity script `file` (opened and checked by [`open_script`]) through
/// `/proc/self/fd/N`: the kernel, and the script's interpreter after it, open the very file
/// whose hash was checked.
pub async fn run_opened(
    file: &std::fs::File,
    script: &AccountScript,
    claims: &WorkflowClaims,
) -> Result<String, String> {
    use std::os::fd::AsRawFd as _;
    let fd = file.as_raw_fd();
    let mut command = tokio::process::Command::new(format!("/proc/self/fd/{fd}"));
    keep_open_across_exec(&mut command, fd);
    let path = script.path.display();
    let input = serde_json::to_vec(claims).map_err(|e| format!("cannot encode the claims: {e}"))?;
    let mut child = command
        .env_clear()
        .env("PATH", SCRIPT_PATH_ENV)
        .env("LC_ALL", "C")
        .current_dir("/")
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .process_group(0)
        .kill_on_drop(true)
        .spawn()
        .map_err(|e| format!("cannot run identity script {path}: {e}"))?;
    let pid = child.id();
    let (mut stdin, stdout, stderr) = (
        child.stdin.take().expect("piped stdin"),
        child.stdout.take().expect("piped stdout"),
        child.stderr.take().expect("piped stderr"),
    );
    let talk = async {
        // A script that ignores its input closes the pipe early; that is its business.
        let write = async {
            let _ = stdin.write_all(&input).await;
            drop(stdin);
        };
        let (_, out, err, status) = tokio::join!(
            write,
            read_limited(stdout),
            read_limited(stderr),
            child.wait()
        );
        (out, err, status)
    };
    let (out, err, status) = match tokio::time::timeout(script.timeout, talk).await {
        Ok(done) => done,
        Err(_) => {
            if let Some(pid) = pid {
                // The whole group: a script's children must not outlive it.
                let _ = nix::sys::signal::killpg(
                    nix::unistd::Pid::from_raw(pid as i32),
                    nix::sys::signal::Signal::SIGKILL,
                );
            }
            return Err(format!(
                "identity script {path} did not answer within {}",
                humantime::format_duration(script.timeout)
            ));
        }
    };
    let status = status.map_err(|e| format!("cannot wait for identity script {path}: {e}"))?;
    if !status.success() {
        let why = err
            .lines()
            .rev()
            .find(|l| !l.trim().is_empty())
            .unwrap_or("");
        return Err(format!(
            "identity script {path} refused the job ({status}){}{why}",
            if why.is_empty() { "" } else { ": " }
        ));
    }
    let name = out.lines().next().unwrap_or("").trim().to_string();
    if name.is_empty() {
        return Err(format!("identity script {path} printed no account name"));
    }
    validate_account_name(&name)
        .map_err(|e| format!("identity script {path} printed a bad account name: {e}"))?;
    Ok(name)
}

async fn read_limited(stream: impl tokio::io::AsyncRead + Unpin) -> String {
    let mut bytes = Vec::new();
    let _ = stream.take(MAX_SCRIPT_OUTPUT).read_to_end(&mut bytes).await;
    String::from_utf8_lossy(&bytes).into_owned()
}

/// A local account name as POSIX tools accept it: `[a-z_][a-z0-9_.-]*`, at most 32 characters,
/// and never `root`.
pub fn validate_account_name(name: &str) -> Result<(), String> {
    let mut chars = name.chars();
    let ok = chars
        .next()
        .is_some_and(|c| c.is_ascii_lowercase() || c == '_')
        && chars.all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || "_.-".contains(c))
        && name.len() <= 32;
    if !ok {
        return Err(format!(
            "{name:?} is not a valid account name: use 1-32 characters of a-z 0-9 _ . - starting with a letter or _"
        ));
    }
    if name == "root" {
        return Err("account root is never allowed: jobs never run as root".to_string());
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use std::os::unix::fs::PermissionsExt as _;

    use super::*;
    use crate::policy::SitePolicy;

    fn claims(actor: &str, repository: &str) -> WorkflowClaims {
        let fixture = include_str!("../../tests/fixtures/oidc/real-token-rgl.decoded.json");
        let mut claims = crate::policy::claims_from_json(fixture).unwrap();
        claims.actor = actor.into();
        claims.repository = repository.into();
        claims
    }

    fn policy(identity: &str) -> SitePolicy {
        SitePolicy::parse(&format!(
            "[oidc]\naudience = \"a\"\n[executors.shell]\n[[rules]]\nname = \"r\"\nrepositories = [\"o/*\"]\n{identity}"
        ))
        .unwrap()
    }

    const MAP: &str = r#"
[identity]
default_account = "nobody"
[[identity.map]]
actor = "alice"
account = "daemon"
[[identity.map]]
repository = "o/special-*"
account = "bin"
[[identity.map]]
actor = "bob"
repository = "o/app"
account = "no-such-account-here"
"#;

    #[tokio::test]
    async fn static_map_then_default() {
        let policy = policy(MAP);
        let by_actor = policy
            .resolve_account(&claims("alice", "o/app"))
            .await
            .unwrap();
        assert_eq!(by_actor.name, "daemon");
        assert_eq!(by_actor.uid, Uid::from_raw(1));
        assert_eq!(by_actor.gid, Gid::from_raw(1));
        assert_eq!(by_actor.home, PathBuf::from("/usr/sbin"));
        let by_repository = policy
            .resolve_account(&claims("carol", "o/special-x"))
            .await
            .unwrap();
        assert_eq!(by_repository.name, "bin");
        let default = policy
            .resolve_account(&claims("carol", "o/app"))
            .await
            .unwrap();
        assert_eq!(default.name, "nobody");
        assert_eq!(default.uid, Uid::from_raw(65534));
    }

    #[tokio::test]
    async fn missing_accounts_and_root_are_refused() {
        let policy = policy(MAP);
        let err = policy
            .resolve_account(&claims("bob", "o/app"))
            .await
            .unwrap_err();
        assert_eq!(
            err,
            "account no-such-account-here does not exist on this host"
        );
        assert_eq!(
            lookup_account("root").unwrap_err(),
            "account root has uid 0: jobs never run as root"
        );
        let unmapped = policy_without_default();
        let err = unmapped
            .resolve_account(&claims("carol", "o/app"))
            .await
            .unwrap_err();
        assert_eq!(
            err,
            "no local account is mapped for actor carol of repository o/app"
        );
    }

    fn policy_without_default() -> SitePolicy {
        policy(&MAP.replace("default_account = \"nobody\"", ""))
    }

    /// A script in its own directory, executable, and the policy text pinning its hash.
    fn script(dir: &Path, body: &str) -> (PathBuf, String) {
        let path = dir.join("map-account");
        std::fs::write(&path, format!("#!/bin/bash\nset -u\n{body}\n")).unwrap();
        std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o755)).unwrap();
        let sha256 = sha256_file(&path).unwrap();
        (path, sha256)
    }

    /// Runs the policy's script. A file just written can be briefly "busy" for exec while a
    /// concurrent test forks; that is a property of tests, not of the script.
    async fn resolve_retrying(
        policy: &SitePolicy,
        claims: &WorkflowClaims,
    ) -> Result<LocalAccount, String> {
        for _ in 0..20 {
            match policy.resolve_account(claims).await {
                Err(e) if e.contains("Text file busy") => {
                    tokio::time::sleep(Duration::from_millis(50)).await;
                }
                other => return other,
            }
        }
        panic!("the script stayed busy")
    }

    const PICKY_SCRIPT: &str = r#"
input=$(cat)
# The environment is clean: no HOME or anything else of the agent's.
if [ -n "${HOME:-}" ]; then echo "HOME leaked" >&2; exit 4; fi
case "$input" in
  *'"actor":"alice"'*) echo daemon ;;
  *) echo "no cluster account for this actor" >&2; exit 3 ;;
esac"#;

    #[tokio::test]
    async fn script_pinned_by_hash_picks_the_account() {
        let dir = tempfile::tempdir().unwrap();
        let (path, sha256) = script(dir.path(), PICKY_SCRIPT);
        let policy = policy(&format!(
            "[identity]\n[identity.script]\npath = \"{}\"\nsha256 = \"{sha256}\"\ntimeout = \"5s\"\n",
            path.display()
        ));
        let account = resolve_retrying(&policy, &claims("alice", "o/app"))
            .await
            .unwrap();
        assert_eq!(account.name, "daemon");
        let err = resolve_retrying(&policy, &claims("mallory", "o/app"))
            .await
            .unwrap_err();
        assert_eq!(
            err,
            format!(
                "identity script {} refused the job (exit status: 3): no cluster account for this actor",
                path.display()
            )
        );
    }

    #[tokio::test]
    async fn script_with_another_hash_is_not_run() {
        let dir = tempfile::tempdir().unwrap();
        let marker = dir.path().join("ran");
        let (path, sha256) = script(
            dir.path(),
            &format!("touch {}\necho daemon", marker.display()),
        );
        let pinned = "0".repeat(64);
        let policy = policy(&format!(
            "[identity]\n[identity.script]\npath = \"{}\"\nsha256 = \"{pinned}\"\n",
            path.display()
        ));
        let err = resolve_retrying(&policy, &claims("alice", "o/app"))
            .await
            .unwrap_err();
        assert_eq!(
            err,
            format!(
                "identity script {} has sha256 {sha256}, but the policy pins {pinned}: refusing to run it; if the change is intended, put the new hash in identity.script.sha256",
                path.display()
            )
        );
        assert!(
            !marker.exists(),
            "a script with the wrong hash must not run"
        );
    }

    #[tokio::test]
    async fn the_script_that_runs_is_the_one_whose_hash_was_checked() {
        let dir = tempfile::tempdir().unwrap();
        let marker = dir.path().join("swapped-in-ran");
        let (path, sha256) = script(dir.path(), "cat >/dev/null; echo daemon");
        let pinned = AccountScript {
            path: path.clone(),
            sha256,
            timeout: Duration::from_secs(5),
        };
        let file = open_script(&pinned).unwrap();
        // Between the check and the run, someone puts another file at the path.
        let other = dir.path().join("other");
        std::fs::write(
            &other,
            format!("#!/bin/bash\ntouch {}\necho bin\n", marker.display()),
        )
        .unwrap();
        std::fs::set_permissions(&other, std::fs::Permissions::from_mode(0o755)).unwrap();
        std::fs::rename(&other, &path).unwrap();
        let mut ran = Err(String::new());
        for _ in 0..20 {
            ran = run_opened(&file, &pinned, &claims("alice", "o/app")).await;
            match &ran {
                Err(e) if e.contains("Text file busy") => {
                    tokio::time::sleep(Duration::from_millis(50)).await
                }
                _ => break,
            }
        }
        assert_eq!(ran.unwrap(), "daemon");
        assert!(!marker.exists(), "the swapped-in file ran");
        // The path now holds a file of another hash: the next run refuses it.
        assert!(
            run_script(&pinned, &claims("alice", "o/app"))
                .await
                .unwrap_err()
                .contains("but the policy pins")
        );
    }

    #[tokio::test]
    async fn a_script_in_a_directory_others_can_write_or_behind_a_link_is_refused() {
        let dir = tempfile::tempdir().unwrap();
        let open = dir.path().join("open");
        std::fs::create_dir(&open).unwrap();
        let (path, sha256) = script(&open, "echo daemon");
        std::fs::set_permissions(&open, std::fs::Permissions::from_mode(0o777)).unwrap();
        let in_open_dir = AccountScript {
            path: path.clone(),
            sha256: sha256.clone(),
            timeout: Duration::from_secs(5),
        };
        let err = run_script(&in_open_dir, &claims("alice", "o/app"))
            .await
            .unwrap_err();
        assert_eq!(
            err,
            format!(
                "directory {} of identity script {} is writable by group or others (mode 777), so the script could be swapped: chmod go-w it",
                open.display(),
                path.display()
            )
        );
        std::fs::set_permissions(&open, std::fs::Permissions::from_mode(0o755)).unwrap();
        let link = dir.path().join("link");
        std::os::unix::fs::symlink(&path, &link).unwrap();
        let behind_link = AccountScript {
            path: link.clone(),
            sha256,
            timeout: Duration::from_secs(5),
        };
        let err = run_script(&behind_link, &claims("alice", "o/app"))
            .await
            .unwrap_err();
        assert_eq!(
            err,
            format!(
                "identity script {} is a symbolic link: set identity.script.path to the file itself",
                link.display()
            )
        );
    }

    #[tokio::test]
    async fn script_that_is_slow_or_writable_or_prints_root_is_refused() {
        let dir = tempfile::tempdir().unwrap();
        let (path, sha256) = script(dir.path(), "sleep 30");
        let slow = AccountScript {
            path: path.clone(),
            sha256,
            timeout: Duration::from_millis(300),
        };
        let started = std::time::Instant::now();
        let err = run_script(&slow, &claims("alice", "o/app"))
            .await
            .unwrap_err();
        assert!(err.ends_with("did not answer within 300ms"), "{err}");
        assert!(started.elapsed() < Duration::from_secs(10));

        let (path, sha256) = script(dir.path(), "echo root");
        let root = AccountScript {
            path: path.clone(),
            sha256,
            timeout: Duration::from_secs(5),
        };
        let err = run_script(&root, &claims("alice", "o/app"))
            .await
            .unwrap_err();
        assert!(
            err.ends_with("account root is never allowed: jobs never run as root"),
            "{err}"
        );

        std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o777)).unwrap();
        let err = run_script(&root, &claims("alice", "o/app"))
            .await
            .unwrap_err();
        assert!(
            err.contains("is writable by group or others (mode 777)"),
            "{err}"
        );
    }
}
