//! Job cgroups: each shell job runs in a cgroup v2 of its own, so the agent can stop all of it.
//!
//! A process group is not enough: a job that calls `setsid` (or double-forks into a new session)
//! leaves it, and a process group dies with nobody when the agent itself is killed. A cgroup
//! holds every descendant whatever it does, and outlives the agent: it is the record of what the
//! agent started.
//!
//! - The cgroup v2 hierarchy is found in `/proc/self/mountinfo` (it may be `/sys/fs/cgroup`, or
//!   `/sys/fs/cgroup/unified` on a hybrid layout). The agent makes a parent cgroup of its own
//!   beside itself, `testbot-agent-INSTANCE` (a hash of its state directory, stable across
//!   restarts), and one child per job, `job-ID-ATTEMPT`.
//! - The job's first process moves itself into its cgroup between fork and exec (see
//!   [`super::command_as`]), before it can start anything.
//! - Killing a job writes `1` to its `cgroup.kill` (Linux 5.14 and later); on older kernels the
//!   cgroup is frozen, every process in it sent SIGKILL, and thawed.
//! - At start-up the agent kills and removes every job cgroup left under its parent: shell jobs
//!   cannot be resumed, so any process still there belongs to an attempt the broker has handed on.

use std::path::{Path, PathBuf};
use std::time::Duration;

use anyhow::Context as _;
use nix::sys::signal::Signal;
use nix::unistd::Pid;
use testbot_proto::jobs::JobId;

/// How long a killed cgroup may take to empty.
const EMPTY_TIMEOUT: Duration = Duration::from_secs(10);
/// How often a cgroup is checked while it empties.
const EMPTY_POLL: Duration = Duration::from_millis(20);

/// The agent's parent cgroup, under which each job gets its own.
#[derive(Debug)]
pub struct JobCgroups {
    parent: PathBuf,
}

impl JobCgroups {
    /// Creates (or finds, after a restart) the agent's parent cgroup `testbot-agent-INSTANCE`
    /// beside the agent's own cgroup. `Err` says why jobs cannot have cgroups here.
    pub fn create(instance: &str) -> Result<JobCgroups, String> {
        let mountinfo = std::fs::read_to_string("/proc/self/mountinfo")
            .map_err(|e| format!("cannot read /proc/self/mountinfo: {e}"))?;
        let (mount_root, mount_point) = cgroup2_mount(&mountinfo).ok_or(
            "no cgroup v2 file system is mounted (no line of type cgroup2 in /proc/self/mountinfo)",
        )?;
        let own = std::fs::read_to_string("/proc/self/cgroup")
            .map_err(|e| format!("cannot read /proc/self/cgroup: {e}"))?;
        let own = own
            .lines()
            .find_map(|line| line.strip_prefix("0::"))
            .ok_or("the agent is in no cgroup v2 (no 0:: line in /proc/self/cgroup)")?;
        // The agent's cgroup relative to the mount (which may show only part of the tree).
        let relative = Path::new(own).strip_prefix(&mount_root).map_err(|_| {
            format!(
                "the agent's cgroup {own} is outside the cgroup v2 mount {}",
                mount_point.display()
            )
        })?;
        let parent = mount_point
            .join(relative)
            .join(format!("testbot-agent-{instance}"));
        match std::fs::create_dir(&parent) {
            Ok(()) => {}
            Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => {}
            Err(e) => {
                return Err(format!(
                    "cannot create the cgroup {}: {e}",
                    parent.display()
                ));
            }
        }
        // Moving a process in needs write access to cgroup.procs; check it now, not per job.
        std::fs::OpenOptions::new()
            .write(true)
            .open(parent.join("cgroup.procs"))
            .map_err(|e| {
                format!(
                    "cannot write {}: {e}",
                    parent.join("cgroup.procs").display()
                )
            })?;
        Ok(JobCgroups { parent })
    }

    /// Where the agent's job cgroups are.
    pub fn parent(&self) -> &Path {
        &self.parent
    }

    /// A fresh cgroup for one attempt of a job (one left by an earlier agent run is killed
    /// first).
    pub async fn job(&self, id: JobId, attempt: u32) -> anyhow::Result<JobCgroup> {
        let cgroup = JobCgroup {
            path: self.parent.join(format!("job-{id}-{attempt}")),
        };
        if cgroup.path.exists() {
            cgroup.kill().await;
        }
        std::fs::create_dir(&cgroup.path)
            .with_context(|| format!("Cannot create the job's cgroup {}", cgroup.path.display()))?;
        Ok(cgroup)
    }

    /// Kills and removes every job cgroup under the parent: what an earlier run of this agent
    /// started and did not live to stop.
    pub async fn reap(&self) {
        let Ok(entries) = std::fs::read_dir(&self.parent) else {
            return;
        };
        for entry in entries.flatten() {
            let path = entry.path();
            let name = entry.file_name().to_string_lossy().into_owned();
            if !(name.starts_with("job-") && path.is_dir()) {
                continue;
            }
            let cgroup = JobCgroup { path };
            let left = cgroup.pids();
            if !left.is_empty() {
                tracing::warn!(
                    cgroup = %cgroup.path.display(),
                    processes = left.len(),
                    "Killing the processes of a shell job the agent started before it last stopped."
                );
            }
            cgroup.kill().await;
        }
    }
}

impl Drop for JobCgroups {
    fn drop(&mut self) {
        // Empty once every job has ended; a busy parent stays for the next run to reap.
        let _ = std::fs::remove_dir(&self.parent);
    }
}

/// One job's cgroup.
#[derive(Debug)]
pub struct JobCgroup {
    path: PathBuf,
}

impl JobCgroup {
    /// The cgroup's `cgroup.procs`, open for the job's first process to move itself in.
    pub fn procs(&self) -> anyhow::Result<std::fs::File> {
        let path = self.path.join("cgroup.procs");
        std::fs::OpenOptions::new()
            .write(true)
            .open(&path)
            .with_context(|| format!("Cannot open {}", path.display()))
    }

    /// The processes in the cgroup now.
    pub fn pids(&self) -> Vec<Pid> {
        std::fs::read_to_string(self.path.join("cgroup.procs"))
            .unwrap_or_default()
            .lines()
            .filter_map(|line| line.trim().parse().ok())
            .map(Pid::from_raw)
            .collect()
    }

    /// Sends `signal` to every process in the cgroup.
    pub fn signal(&self, signal: Signal) {
        for pid in self.pids() {
            let _ = nix::sys::signal::kill(pid, signal);
        }
    }

    /// Kills every process in the cgroup, waits for it to empty, and removes it.
    pub async fn kill(&self) {
        if std::fs::write(self.path.join("cgroup.kill"), b"1").is_err() {
            // Before Linux 5.14: freeze, so nothing forks while we kill, then kill and thaw
            // (SIGKILL reaches frozen processes once they thaw).
            let _ = std::fs::write(self.path.join("cgroup.freeze"), b"1");
            self.signal(Signal::SIGKILL);
            let _ = std::fs::write(self.path.join("cgroup.freeze"), b"0");
        }
        let deadline = tokio::time::Instant::now() + EMPTY_TIMEOUT;
        while self.populated() {
            if tokio::time::Instant::now() > deadline {
                tracing::warn!(cgroup = %self.path.display(), "The job's cgroup did not empty after SIGKILL.");
                return;
            }
            // Processes forked before the freeze or the kill are killed on the next round.
            self.signal(Signal::SIGKILL);
            tokio::time::sleep(EMPTY_POLL).await;
        }
        if let Err(err) = std::fs::remove_dir(&self.path)
            && err.kind() != std::io::ErrorKind::NotFound
        {
            tracing::warn!(cgroup = %self.path.display(), ?err, "Cannot remove the job's cgroup.");
        }
    }

    /// Whether any process is still in the cgroup (or below it).
    fn populated(&self) -> bool {
        match std::fs::read_to_string(self.path.join("cgroup.events")) {
            Ok(events) => events.lines().any(|line| line == "populated 1"),
            Err(_) => false,
        }
    }
}

/// The root and mount point of the cgroup v2 file system in a mountinfo listing.
fn cgroup2_mount(mountinfo: &str) -> Option<(PathBuf, PathBuf)> {
    mountinfo.lines().find_map(|line| {
        // ID PARENT MAJ:MIN ROOT MOUNT_POINT OPTIONS [OPTIONAL...] - FSTYPE SOURCE SUPER_OPTIONS
        let (before, after) = line.split_once(" - ")?;
        if after.split_whitespace().next()? != "cgroup2" {
            return None;
        }
        let mut fields = before.split_whitespace();
        let root = fields.nth(3)?;
        let mount_point = fields.next()?;
        Some((unescape(root).into(), unescape(mount_point).into()))
    })
}

/// Undoes mountinfo's octal escapes (`\040` for a space).
fn unescape(field: &str) -> String {
    let bytes = field.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        let code = bytes
            .get(i + 1..i + 4)
            .and_then(|digits| std::str::from_utf8(digits).ok())
            .and_then(|digits| u8::from_str_radix(digits, 8).ok());
        if bytes[i] == b'\\'
            && let Some(code) = code
        {
            out.push(code);
            i += 4;
        } else {
            out.push(bytes[i]);
            i += 1;
        }
    }
    String::from_utf8_lossy(&out).into_owned()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_cgroup2_mount_is_found_on_a_hybrid_layout() {
        let mountinfo = "\
24 29 0:22 / /sys rw,nosuid,nodev,noexec,relatime shared:7 - sysfs sysfs rw
30 24 0:26 / /sys/fs/cgroup ro,nosuid,nodev,noexec shared:9 - tmpfs tmpfs ro,mode=755
31 30 0:27 / /sys/fs/cgroup/unified rw,nosuid,nodev,noexec,relatime shared:10 - cgroup2 cgroup2 rw,nsdelegate
32 30 0:28 / /sys/fs/cgroup/memory rw,nosuid,nodev,noexec,relatime shared:11 - cgroup cgroup rw,memory
";
        assert_eq!(
            cgroup2_mount(mountinfo),
            Some(("/".into(), "/sys/fs/cgroup/unified".into()))
        );
        let spaced = "40 30 0:29 /a\\040b /mnt/cg\\040two rw - cgroup2 none rw\n";
        assert_eq!(
            cgroup2_mount(spaced),
            Some(("/a b".into(), "/mnt/cg two".into()))
        );
        assert_eq!(
            cgroup2_mount("32 30 0:28 / /x rw - cgroup cgroup rw,memory\n"),
            None
        );
    }
}
