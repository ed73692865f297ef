//! Collecting a job's result files (JUnit XML and the like) from its workspace once the script
//! has ended, whether it passed, failed or timed out, so that they can be uploaded to the broker.
//!
//! A job names its files with globs relative to its workspace (`results =
//! ["build/**/junit*.xml"]`; `*` stays within one directory, `**` crosses any number, as GitHub
//! Actions and gitignore read them). [`validate_patterns`] checks them before the job runs;
//! [`collect`] walks the workspace, matches every path against them and opens the files that
//! match, in path order and within [`CollectLimits`]. It blocks: the job flow runs it with
//! `spawn_blocking` after the executor's `run` and hands the [`ResultFile`]s to the upload.
//!
//! Everything in the workspace belongs to the job, and the job may still have processes running
//! while the agent collects (a daemon it left behind, or a race set up on purpose), so nothing
//! found there is trusted:
//! - Symbolic links are never followed, to files or to directories: a `junit.xml` that points
//!   at `/etc/shadow` or at the agent's key is reported, not read.
//! - Each directory is opened relative to its parent's descriptor with `O_NOFOLLOW`, and each
//!   file relative to its directory's, so a directory replaced by a symbolic link after the
//!   walk cannot lead the open outside the workspace.
//! - A file is judged on the descriptor that was opened (a regular file, one hard link, its
//!   size), and the [`ResultFile`] keeps that descriptor: what is uploaded is what was checked,
//!   never whatever the path names later, and never more than the size that was checked.
//! - Opens are `O_NONBLOCK`, so a FIFO (or a file under a lease) put where a result file was
//!   cannot make the agent wait.
//!
//! What is left out is said in a note for the job's log. Only a bad pattern or a workspace that
//! cannot be opened is an error.

use std::borrow::Cow;
use std::ffi::OsStr;
use std::fs::File;
use std::io::{self, Read, Seek, SeekFrom};
use std::os::fd::{AsFd, BorrowedFd, OwnedFd};
use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::{FileExt, FileTypeExt, MetadataExt};
use std::path::{Path, PathBuf};

use globset::GlobSet;
use nix::dir::{Dir, Type};
use nix::errno::Errno;
use nix::fcntl::{AtFlags, OFlag};
use nix::sys::stat::{Mode, SFlag};
use testbot_proto::results::result_globs as compile;
pub use testbot_proto::results::{
    MAX_RESULT_PATTERN_BYTES as MAX_PATTERN_BYTES, MAX_RESULT_PATTERNS as MAX_PATTERNS,
    validate_result_patterns as validate_patterns,
};

/// Notes about single files and directories (a link, a file too large) kept for the log; the
/// rest are counted in one note, so a workspace of a million symbolic links cannot flood it.
/// Notes about the whole collection (a limit reached, a pattern that matched nothing) are
/// always kept.
const MAX_ITEM_NOTES: usize = 50;

const MIB: u64 = 1024 * 1024;

/// Directories are opened only as directories and never through a symbolic link, and their
/// descriptors do not leak into the job processes the agent starts later.
const DIR_FLAGS: OFlag = OFlag::O_RDONLY
    .union(OFlag::O_DIRECTORY)
    .union(OFlag::O_NOFOLLOW)
    .union(OFlag::O_CLOEXEC);

/// `O_NONBLOCK` because the type is known only once the file is open: opening a FIFO to read
/// blocks until a writer comes, and opening a file under a lease until the lease is broken.
/// Reads of a regular file are not affected by it. `O_NOCTTY` in case the name is a terminal.
const FILE_FLAGS: OFlag = OFlag::O_RDONLY
    .union(OFlag::O_NOFOLLOW)
    .union(OFlag::O_NONBLOCK)
    .union(OFlag::O_NOCTTY)
    .union(OFlag::O_CLOEXEC);

/// How much [`collect`] looks at and takes.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CollectLimits {
    /// Most files collected; the first ones in path order are kept. Default 100.
    pub max_files: usize,
    /// Largest file collected, in bytes; a larger one is left out. Default 100 MiB.
    pub max_file_bytes: u64,
    /// Most bytes of all files together; a file that would pass it is left out, and smaller
    /// files after it in path order may still be kept. Default 200 MiB.
    pub max_total_bytes: u64,
    /// Directories nested deeper than this below the workspace are not searched: with 2,
    /// `a/b/junit.xml` is found but not `a/b/c/junit.xml`. Default 32.
    pub max_depth: usize,
    /// Most directory entries read in the whole walk; the walk stops there. Which entries of
    /// the last directory were read then depends on the file system's order. Default 100,000.
    pub max_entries_walked: usize,
}

impl Default for CollectLimits {
    fn default() -> Self {
        Self {
            max_files: 100,
            max_file_bytes: 100 * MIB,
            max_total_bytes: 200 * MIB,
            max_depth: 32,
            max_entries_walked: 100_000,
        }
    }
}

impl CollectLimits {
    /// The limits of what is uploaded to the broker: its per-file, per-job and file-count
    /// limits, so that nothing collected is refused there.
    pub fn uploaded() -> Self {
        use testbot_proto::test_results::{
            MAX_RESULT_BYTES_PER_JOB, MAX_RESULT_FILE_BYTES, MAX_RESULT_FILES,
        };
        CollectLimits {
            max_files: MAX_RESULT_FILES,
            max_file_bytes: MAX_RESULT_FILE_BYTES,
            max_total_bytes: MAX_RESULT_BYTES_PER_JOB,
            ..CollectLimits::default()
        }
    }
}

/// A result file, open: the descriptor is the one whose type, links and size were checked.
#[derive(Debug)]
pub struct ResultFile {
    /// Relative to the workspace, `/`-separated, without `./`: `build/test/junit.xml`.
    pub path: String,
    /// Its size when it was collected: all that is ever read of it.
    pub bytes: u64,
    file: File,
}

impl ResultFile {
    /// The file's content, at most [`Self::bytes`] of it however much it has grown since
    /// (fewer if it was cut short since). Reads from the start on every call.
    pub fn read_bounded(&self) -> io::Result<Vec<u8>> {
        // Positional reads: `&self` may be read again, and no file offset is shared.
        let len = usize::try_from(self.bytes).map_err(io::Error::other)?;
        let mut data = vec![0; len];
        let mut filled = 0;
        while filled < len {
            match self.file.read_at(&mut data[filled..], filled as u64) {
                Ok(0) => break,
                Ok(n) => filled += n,
                Err(err) if err.kind() == io::ErrorKind::Interrupted => {}
                Err(err) => return Err(err),
            }
        }
        data.truncate(filled);
        Ok(data)
    }

    /// A reader of the file from its start that stops after [`Self::bytes`], for streaming it
    /// instead of holding it in memory.
    pub fn into_reader(self) -> io::Result<io::Take<File>> {
        let mut file = self.file;
        file.seek(SeekFrom::Start(0))?;
        Ok(file.take(self.bytes))
    }
}

/// What [`collect`] found.
#[derive(Debug, Default)]
pub struct Collected {
    /// The files to upload, sorted by path.
    pub files: Vec<ResultFile>,
    /// Lines for the job's log: what was left out and why, and patterns that matched nothing.
    pub notes: Vec<String>,
}

/// Why nothing could be collected at all.
#[derive(Debug, thiserror::Error)]
pub enum CollectError {
    /// A pattern cannot be used (see [`validate_patterns`]): the job's configuration is at fault.
    #[error("results: {0}")]
    Pattern(String),
    /// The workspace itself cannot be opened.
    #[error(
        "results: cannot open the workspace {}: {problem}; no result files were collected",
        path.display()
    )]
    Workspace { path: PathBuf, problem: String },
}

/// Collects the files under `workspace` that match any of `patterns`. Blocking.
///
/// A file matched by several patterns is collected once; symbolic links, special files, files
/// with more than one hard link and files past the limits are left out with a note, and so is
/// a pattern that matched nothing. `.git` directories are not searched.
pub fn collect(
    workspace: &Path,
    patterns: &[String],
    limits: &CollectLimits,
) -> Result<Collected, CollectError> {
    let set = compile(patterns).map_err(CollectError::Pattern)?;
    if patterns.is_empty() {
        return Ok(Collected::default());
    }
    let mut root = open_workspace(workspace)?;

    let mut walk = Walk {
        set: &set,
        limits,
        entries: 0,
        exhausted: false,
        matched: Vec::new(),
        pattern_hit: vec![false; patterns.len()],
        pattern_dir: vec![None; patterns.len()],
        links_skipped: 0,
        hits: Vec::new(),
        notes: Notes::default(),
    };
    walk.walk(&mut root, "", 0);
    let Walk {
        mut matched,
        pattern_hit,
        pattern_dir,
        links_skipped,
        mut notes,
        ..
    } = walk;

    // The walk went directory by directory; `a.xml` sorts before `a/b.xml` by path.
    matched.sort_unstable();
    let files = open_matched(root.as_fd(), matched, limits, &mut notes);

    for ((pattern, hit), dir) in patterns.iter().zip(pattern_hit).zip(pattern_dir) {
        if hit {
            continue;
        }
        let mut note = format!("results: {pattern:?} matched no file");
        if let Some(dir) = dir {
            let all = format!("{}/**", pattern.trim_end_matches('/'));
            note.push_str(&format!(
                "; it matches the directory {}: write {all:?} for the files in it",
                shown(&dir)
            ));
        } else if links_skipped > 0 {
            let were = if links_skipped == 1 { "was" } else { "were" };
            note.push_str(&format!(
                " (symbolic links are not followed: {links_skipped} {were} passed over)"
            ));
        }
        notes.summary(note);
    }
    Ok(Collected {
        files,
        notes: notes.finish(),
    })
}

/// The patterns as one set, or the message for the first that cannot be used.
fn open_workspace(workspace: &Path) -> Result<Dir, CollectError> {
    // Rebuilt from its components: with a trailing slash, O_NOFOLLOW would follow a link.
    let path: PathBuf = workspace.components().collect();
    let fail = |err: Errno| CollectError::Workspace {
        path: workspace.to_path_buf(),
        problem: match err {
            // Linux answers ENOTDIR for a link opened with O_DIRECTORY | O_NOFOLLOW; which of
            // the two it is matters only for the message.
            Errno::ELOOP | Errno::ENOTDIR
                if std::fs::symlink_metadata(&path).is_ok_and(|m| m.file_type().is_symlink()) =>
            {
                "it is a symbolic link, which is not followed (was it replaced by the job?)".into()
            }
            Errno::ENOTDIR => "it is not a directory".into(),
            Errno::ENOENT => "it does not exist".into(),
            err => err.desc().into(),
        },
    };
    let fd = nix::fcntl::open(&path, DIR_FLAGS, Mode::empty()).map_err(fail)?;
    Dir::from_fd(fd).map_err(fail)
}

/// What a directory entry is, as far as collecting goes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Kind {
    File,
    Directory,
    Symlink,
    /// A FIFO, socket or device, in words.
    Special(&'static str),
}

impl From<Type> for Kind {
    fn from(t: Type) -> Self {
        match t {
            Type::File => Kind::File,
            Type::Directory => Kind::Directory,
            Type::Symlink => Kind::Symlink,
            Type::Fifo => Kind::Special("a FIFO (named pipe)"),
            Type::Socket => Kind::Special("a socket"),
            Type::CharacterDevice | Type::BlockDevice => Kind::Special("a device"),
        }
    }
}

fn kind_of_mode(mode: u32) -> Kind {
    let format = SFlag::from_bits_truncate(mode) & SFlag::S_IFMT;
    if format == SFlag::S_IFREG {
        Kind::File
    } else if format == SFlag::S_IFDIR {
        Kind::Directory
    } else if format == SFlag::S_IFLNK {
        Kind::Symlink
    } else if format == SFlag::S_IFIFO {
        Kind::Special("a FIFO (named pipe)")
    } else if format == SFlag::S_IFSOCK {
        Kind::Special("a socket")
    } else {
        Kind::Special("a device")
    }
}

/// The walk of the workspace: which paths matched, and what to tell the log.
struct Walk<'a> {
    set: &'a GlobSet,
    limits: &'a CollectLimits,
    entries: usize,
    /// The entry budget is spent: no directory is read any more.
    exhausted: bool,
    /// Paths the listing called regular files that matched a pattern.
    matched: Vec<String>,
    /// Per pattern: whether it matched any entry that is not a directory.
    pattern_hit: Vec<bool>,
    /// Per pattern: the first directory it matched, for the hint in its "matched no file" note.
    pattern_dir: Vec<Option<String>>,
    /// Symbolic links that matched no pattern: a hint when a pattern matched nothing.
    links_skipped: usize,
    hits: Vec<usize>,
    notes: Notes,
}

impl Walk<'_> {
    /// Walks `dir`, at `rel` (`""` for the workspace), `level` directories deep.
    fn walk(&mut self, dir: &mut Dir, rel: &str, level: usize) {
        for (name, listed) in self.list(dir, rel) {
            let Ok(name_text) = std::str::from_utf8(&name) else {
                self.non_utf8(rel, &name, listed);
                continue;
            };
            let path = join(rel, name_text);
            let kind = match listed {
                Some(t) => Kind::from(t),
                // The file system does not say (`DT_UNKNOWN`): ask it, without following.
                None => match nix::sys::stat::fstatat(
                    dir.as_fd(),
                    name.as_slice(),
                    AtFlags::AT_SYMLINK_NOFOLLOW,
                ) {
                    Ok(stat) => kind_of_mode(stat.st_mode),
                    // Removed since it was listed.
                    Err(Errno::ENOENT) => continue,
                    Err(err) => {
                        self.notes.item(format!(
                            "results: {} cannot be examined ({}); skipped",
                            shown(&path),
                            err.desc()
                        ));
                        continue;
                    }
                },
            };
            match kind {
                Kind::Directory => self.directory(dir, &name, &path, level + 1),
                Kind::File => {
                    if self.matches(&path) {
                        self.matched.push(path);
                    }
                }
                Kind::Symlink => {
                    if self.matches(&path) {
                        self.notes.item(format!(
                            "results: {} is a symbolic link; not followed",
                            shown(&path)
                        ));
                    } else {
                        self.links_skipped += 1;
                    }
                }
                Kind::Special(what) => {
                    if self.matches(&path) {
                        self.notes.item(format!(
                            "results: {} is {what}, not a regular file; not uploaded",
                            shown(&path)
                        ));
                    }
                }
            }
        }
    }

    /// The entries of `dir`, sorted so that the walk (and where it stops) does not depend on
    /// the file system's order, within the entry budget.
    fn list(&mut self, dir: &mut Dir, rel: &str) -> Vec<(Vec<u8>, Option<Type>)> {
        let mut names = Vec::new();
        if self.exhausted {
            return names;
        }
        for entry in dir.iter() {
            let entry = match entry {
                Ok(entry) => entry,
                Err(err) => {
                    self.notes.item(format!(
                        "results: {} could not be read to its end ({}); the rest of it was not searched",
                        dir_text(rel),
                        err.desc()
                    ));
                    break;
                }
            };
            let name = entry.file_name().to_bytes();
            if name == b"." || name == b".." {
                continue;
            }
            if self.entries == self.limits.max_entries_walked {
                self.exhausted = true;
                self.notes.summary(format!(
                    "results: stopped searching the workspace after {} entries (the limit); files further on were not considered",
                    self.entries
                ));
                break;
            }
            self.entries += 1;
            names.push((name.to_vec(), entry.file_type()));
        }
        // Names are unique within a directory.
        names.sort_unstable_by(|a, b| a.0.cmp(&b.0));
        names
    }

    fn directory(&mut self, parent: &Dir, name: &[u8], path: &str, level: usize) {
        // A repository's objects and hooks, never result files, and possibly huge.
        if name == b".git" {
            return;
        }
        self.set.matches_into(path, &mut self.hits);
        for &i in &self.hits {
            self.pattern_dir[i].get_or_insert_with(|| path.to_string());
        }
        if self.exhausted {
            return;
        }
        if level > self.limits.max_depth {
            self.notes.item(format!(
                "results: {} is nested more than {} directories deep; not searched",
                dir_text(path),
                self.limits.max_depth
            ));
            return;
        }
        match open_dir(parent.as_fd(), name) {
            Ok(mut sub) => self.walk(&mut sub, path, level),
            // Removed since it was listed.
            Err(Errno::ENOENT) => {}
            Err(Errno::ELOOP | Errno::ENOTDIR) => self.notes.item(format!(
                "results: {} was replaced by a symbolic link or a file while the workspace was searched; not followed",
                dir_text(path)
            )),
            Err(err) => self.notes.item(format!(
                "results: {} cannot be read ({}); not searched",
                dir_text(path),
                err.desc()
            )),
        }
    }

    fn matches(&mut self, path: &str) -> bool {
        self.set.matches_into(path, &mut self.hits);
        for &i in &self.hits {
            self.pattern_hit[i] = true;
        }
        !self.hits.is_empty()
    }

    /// A name that cannot be reported as text: skipped, with a note when it could have mattered.
    fn non_utf8(&mut self, rel: &str, name: &[u8], listed: Option<Type>) {
        let lossy = join(rel, &String::from_utf8_lossy(name));
        if listed == Some(Type::Directory) {
            self.notes.item(format!(
                "results: the directory {} has a name that is not UTF-8; not searched",
                shown(&lossy)
            ));
            return;
        }
        let mut raw = Vec::with_capacity(rel.len() + 1 + name.len());
        if !rel.is_empty() {
            raw.extend_from_slice(rel.as_bytes());
            raw.push(b'/');
        }
        raw.extend_from_slice(name);
        // Counted as a match, so its pattern does not also read "matched no file".
        self.set
            .matches_into(OsStr::from_bytes(&raw), &mut self.hits);
        for &i in &self.hits {
            self.pattern_hit[i] = true;
        }
        if !self.hits.is_empty() {
            self.notes.item(format!(
                "results: {} has a name that is not UTF-8; not uploaded",
                shown(&lossy)
            ));
        }
    }
}

fn open_dir(parent: BorrowedFd<'_>, name: &[u8]) -> nix::Result<Dir> {
    let fd = nix::fcntl::openat(parent, name, DIR_FLAGS, Mode::empty())?;
    Dir::from_fd(fd)
}

/// Opens the matched files in path order, within the limits.
fn open_matched(
    root: BorrowedFd<'_>,
    matched: Vec<String>,
    limits: &CollectLimits,
    notes: &mut Notes,
) -> Vec<ResultFile> {
    let count = matched.len();
    let mut files = Vec::new();
    let mut total: u64 = 0;
    for path in matched {
        if files.len() == limits.max_files {
            notes.summary(format!(
                "results: {count} files matched; only the first {} (in path order) are uploaded",
                limits.max_files
            ));
            break;
        }
        match open_result(root, &path, limits.max_file_bytes) {
            Err(note) => notes.item(note),
            Ok((file, bytes)) if total.saturating_add(bytes) > limits.max_total_bytes => {
                drop(file);
                notes.item(format!(
                    "results: {} is {}; with it the result files would pass the {} limit for all of them together; not uploaded",
                    shown(&path),
                    size_text(bytes),
                    size_text(limits.max_total_bytes)
                ));
            }
            Ok((file, bytes)) => {
                total += bytes;
                files.push(ResultFile { path, bytes, file });
            }
        }
    }
    files
}

/// Opens `path` below `root` and checks what was opened; the error is the note for the log.
fn open_result(
    root: BorrowedFd<'_>,
    path: &str,
    max_file_bytes: u64,
) -> Result<(File, u64), String> {
    let shown_path = shown(path);
    let file = open_beneath(root, path).map_err(|failure| match failure {
        OpenFailure::Directory(_, Errno::ENOENT) | OpenFailure::File(Errno::ENOENT) => {
            format!("results: {shown_path} was removed before it could be opened; not uploaded")
        }
        OpenFailure::Directory(dir, Errno::ELOOP | Errno::ENOTDIR) => format!(
            "results: {shown_path} is not uploaded: {} was replaced by a symbolic link or a file after the workspace was searched, and is not followed",
            dir_text(dir)
        ),
        OpenFailure::File(Errno::ELOOP) => {
            format!("results: {shown_path} is a symbolic link; not followed")
        }
        OpenFailure::File(Errno::EAGAIN) => format!(
            "results: {shown_path} is held under a lease by another process; not uploaded"
        ),
        OpenFailure::Directory(dir, err) => format!(
            "results: {shown_path} is not uploaded: {} cannot be opened ({})",
            dir_text(dir),
            err.desc()
        ),
        OpenFailure::File(err) => format!(
            "results: {shown_path} cannot be opened ({}); not uploaded",
            err.desc()
        ),
    })?;
    let meta = file
        .metadata()
        .map_err(|err| format!("results: {shown_path} cannot be examined ({err}); not uploaded"))?;
    let file_type = meta.file_type();
    if !file_type.is_file() {
        let what = if file_type.is_fifo() {
            "a FIFO (named pipe)"
        } else if file_type.is_socket() {
            "a socket"
        } else if file_type.is_dir() {
            "a directory"
        } else {
            "a device"
        };
        return Err(format!(
            "results: {shown_path} is {what}, not a regular file; not uploaded"
        ));
    }
    // A second name for a file elsewhere (the agent's key, another job's output) is a link
    // the job could make to any file of its account; a file it wrote itself has one name.
    if meta.nlink() > 1 {
        return Err(format!(
            "results: {shown_path} has {} hard links; a result file must have one, so that it cannot be a file from outside the workspace; not uploaded",
            meta.nlink()
        ));
    }
    if meta.len() > max_file_bytes {
        return Err(format!(
            "results: {shown_path} is {}, over the {} limit for one file; not uploaded",
            size_text(meta.len()),
            size_text(max_file_bytes)
        ));
    }
    Ok((file, meta.len()))
}

/// Where opening a path component by component failed.
#[derive(Debug)]
enum OpenFailure<'p> {
    /// At this directory (a prefix of the path).
    Directory(&'p str, Errno),
    /// At the file itself.
    File(Errno),
}

/// Opens the file at `path` (relative, `/`-separated, as the walk spelled it) one component at
/// a time from `root`, each directory with `O_NOFOLLOW`: however the job rearranges the
/// workspace meanwhile, what is opened is a file inside it, reached without a symbolic link.
fn open_beneath<'p>(root: BorrowedFd<'_>, path: &'p str) -> Result<File, OpenFailure<'p>> {
    let (dirs, name) = match path.rsplit_once('/') {
        Some((dirs, name)) => (Some(dirs), name),
        None => (None, path),
    };
    let mut current: Option<OwnedFd> = None;
    if let Some(dirs) = dirs {
        let mut end = 0;
        for component in dirs.split('/') {
            end += component.len();
            let parent = current.as_ref().map_or(root, |fd| fd.as_fd());
            let fd = nix::fcntl::openat(parent, component, DIR_FLAGS, Mode::empty())
                .map_err(|err| OpenFailure::Directory(&path[..end], err))?;
            current = Some(fd);
            end += 1;
        }
    }
    let parent = current.as_ref().map_or(root, |fd| fd.as_fd());
    nix::fcntl::openat(parent, name, FILE_FLAGS, Mode::empty())
        .map(File::from)
        .map_err(OpenFailure::File)
}

/// Notes for the log, with the ones about single files and directories capped.
#[derive(Debug, Default)]
struct Notes {
    list: Vec<String>,
    items: usize,
}

impl Notes {
    fn item(&mut self, note: String) {
        self.items += 1;
        if self.items <= MAX_ITEM_NOTES {
            self.list.push(note);
        }
    }

    fn summary(&mut self, note: String) {
        self.list.push(note);
    }

    fn finish(mut self) -> Vec<String> {
        if self.items > MAX_ITEM_NOTES {
            self.list.push(format!(
                "results: {} more notes about single files and directories were left out",
                self.items - MAX_ITEM_NOTES
            ));
        }
        self.list
    }
}

fn join(rel: &str, name: &str) -> String {
    if rel.is_empty() {
        name.to_string()
    } else {
        format!("{rel}/{name}")
    }
}

/// A directory for a note: `build/`, or the workspace itself.
fn dir_text(rel: &str) -> String {
    if rel.is_empty() {
        "the workspace".to_string()
    } else {
        format!("{}/", shown(rel))
    }
}

/// A path for a note, as it is when it is plain text, quoted and escaped when it holds control
/// or invisible characters: the job chose the name, and a newline in it must not start a line
/// of its own in the log (one that reads like the agent's).
fn shown(path: &str) -> Cow<'_, str> {
    let plain = path
        .chars()
        .all(|c| matches!(c, '"' | '\'' | '\\') || c.escape_debug().len() == 1);
    if plain {
        Cow::Borrowed(path)
    } else {
        Cow::Owned(format!("{path:?}"))
    }
}

/// A size for a note: `300 MiB`, `1.5 KiB`, `12 bytes`.
fn size_text(bytes: u64) -> String {
    const KIB: u64 = 1024;
    const GIB: u64 = 1024 * MIB;
    let in_unit = |unit: u64, name: &str| {
        if bytes.is_multiple_of(unit) {
            format!("{} {name}", bytes / unit)
        } else {
            format!("{:.1} {name}", bytes as f64 / unit as f64)
        }
    };
    match bytes {
        1 => "1 byte".to_string(),
        b if b < KIB => format!("{b} bytes"),
        b if b < MIB => in_unit(KIB, "KiB"),
        b if b < GIB => in_unit(MIB, "MiB"),
        _ => in_unit(GIB, "GiB"),
    }
}

#[cfg(test)]
mod tests;
