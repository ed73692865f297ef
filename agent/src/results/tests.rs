//! Every test builds a real workspace in a temporary directory. `ws` is the workspace, and
//! `outside` a sibling on the same file system standing for the rest of the machine (the
//! agent's key, another job's files).

use std::fs;
use std::io::{Read, Write};
use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::symlink;
use std::path::{Path, PathBuf};
use std::sync::mpsc;
use std::time::Duration;

use super::*;

struct Scene {
    _tmp: tempfile::TempDir,
    ws: PathBuf,
    outside: PathBuf,
}

fn scene() -> Scene {
    let tmp = tempfile::tempdir().unwrap();
    let ws = tmp.path().join("ws");
    let outside = tmp.path().join("outside");
    fs::create_dir(&ws).unwrap();
    fs::create_dir(&outside).unwrap();
    Scene {
        _tmp: tmp,
        ws,
        outside,
    }
}

fn write(root: &Path, rel: &str, content: &str) {
    let path = root.join(rel);
    fs::create_dir_all(path.parent().unwrap()).unwrap();
    fs::write(path, content).unwrap();
}

fn patterns(list: &[&str]) -> Vec<String> {
    list.iter().map(|p| p.to_string()).collect()
}

fn run(ws: &Path, list: &[&str], limits: &CollectLimits) -> Collected {
    collect(ws, &patterns(list), limits).unwrap()
}

fn paths(collected: &Collected) -> Vec<&str> {
    collected.files.iter().map(|f| f.path.as_str()).collect()
}

fn note_with<'c>(collected: &'c Collected, needle: &str) -> &'c str {
    collected
        .notes
        .iter()
        .find(|n| n.contains(needle))
        .unwrap_or_else(|| panic!("no note with {needle:?} in {:#?}", collected.notes))
}

/// Runs `f` on another thread and fails the test if it has not returned within 10 s: a FIFO
/// that is opened for reading blocks until a writer comes, which would otherwise hang the test
/// instead of failing it.
fn within_10s<T: Send + 'static>(f: impl FnOnce() -> T + Send + 'static) -> T {
    let (tx, rx) = mpsc::channel();
    std::thread::spawn(move || {
        let _ = tx.send(f());
    });
    rx.recv_timeout(Duration::from_secs(10))
        .expect("did not return within 10 s: blocked on a FIFO?")
}

fn root_fd(ws: &Path) -> Dir {
    open_workspace(ws).unwrap()
}

#[test]
fn double_star_matches_at_any_depth_including_none() {
    let s = scene();
    write(&s.ws, "build/junit.xml", "top");
    write(&s.ws, "build/a/b/junit-unit.xml", "deep");
    write(&s.ws, "build/a/other.xml", "");
    write(&s.ws, "junit.xml", "");
    let c = run(&s.ws, &["build/**/junit*.xml"], &CollectLimits::default());
    assert_eq!(paths(&c), ["build/a/b/junit-unit.xml", "build/junit.xml"]);
    assert_eq!(c.files[0].read_bounded().unwrap(), b"deep");
    assert_eq!(c.files[1].bytes, 3);
    assert!(c.notes.is_empty(), "{:?}", c.notes);
}

#[test]
fn star_does_not_cross_a_slash() {
    let s = scene();
    write(&s.ws, "reports/a.xml", "");
    write(&s.ws, "reports/sub/b.xml", "");
    write(&s.ws, "top.xml", "");
    let c = run(&s.ws, &["reports/*.xml"], &CollectLimits::default());
    assert_eq!(paths(&c), ["reports/a.xml"]);
    let c = run(&s.ws, &["*.xml"], &CollectLimits::default());
    assert_eq!(paths(&c), ["top.xml"]);
}

#[test]
fn a_file_matched_by_several_patterns_is_collected_once_and_files_come_in_path_order() {
    let s = scene();
    write(&s.ws, "b.xml", "");
    write(&s.ws, "a/z.xml", "");
    write(&s.ws, "a.xml", "");
    let c = run(
        &s.ws,
        &["**/*.xml", "a/z.xml", "./a/*.xml", "*.xml"],
        &CollectLimits::default(),
    );
    // Byte order of the whole path: '.' sorts before '/'.
    assert_eq!(paths(&c), ["a.xml", "a/z.xml", "b.xml"]);
    assert!(c.notes.is_empty(), "{:?}", c.notes);
}

#[test]
fn a_pattern_that_matches_nothing_gets_a_note_with_a_hint_for_a_directory() {
    let s = scene();
    write(&s.ws, "reports/a.xml", "");
    let c = run(
        &s.ws,
        &["build/**/junit*.xml", "reports", "reports/*.xml"],
        &CollectLimits::default(),
    );
    assert_eq!(paths(&c), ["reports/a.xml"]);
    assert_eq!(
        c.notes,
        [
            "results: \"build/**/junit*.xml\" matched no file",
            "results: \"reports\" matched no file; it matches the directory reports: write \"reports/**\" for the files in it",
        ]
    );
}

#[test]
fn no_patterns_collect_nothing_without_looking() {
    let c = collect(Path::new("/nonexistent"), &[], &CollectLimits::default()).unwrap();
    assert!(c.files.is_empty() && c.notes.is_empty());
}

#[test]
fn a_symlink_to_a_file_outside_is_not_read() {
    let s = scene();
    write(&s.outside, "agent.key", "SECRET");
    symlink(s.outside.join("agent.key"), s.ws.join("junit.xml")).unwrap();
    write(&s.ws, "real.xml", "mine");
    let c = run(&s.ws, &["*.xml"], &CollectLimits::default());
    assert_eq!(paths(&c), ["real.xml"]);
    assert_eq!(
        note_with(&c, "junit.xml"),
        "results: junit.xml is a symbolic link; not followed"
    );
    assert!(c.notes.iter().all(|n| !n.contains("SECRET")));
}

#[test]
fn a_symlinked_directory_is_not_descended() {
    let s = scene();
    write(&s.outside, "build/junit.xml", "SECRET");
    symlink(s.outside.join("build"), s.ws.join("build")).unwrap();
    let c = run(
        &s.ws,
        &["build/**/*.xml", "**/junit.xml"],
        &CollectLimits::default(),
    );
    assert!(c.files.is_empty(), "{:?}", paths(&c));
    assert_eq!(
        c.notes,
        [
            "results: \"build/**/*.xml\" matched no file (symbolic links are not followed: 1 was passed over)",
            "results: \"**/junit.xml\" matched no file (symbolic links are not followed: 1 was passed over)",
        ]
    );
}

#[test]
fn a_hard_link_is_refused() {
    let s = scene();
    write(&s.outside, "agent.key", "SECRET");
    fs::hard_link(s.outside.join("agent.key"), s.ws.join("junit.xml")).unwrap();
    let c = run(&s.ws, &["junit.xml"], &CollectLimits::default());
    assert!(c.files.is_empty());
    assert_eq!(
        c.notes,
        [
            "results: junit.xml has 2 hard links; a result file must have one, so that it cannot be a file from outside the workspace; not uploaded"
        ]
    );
}

#[test]
fn a_fifo_named_junit_xml_is_not_opened() {
    let s = scene();
    nix::unistd::mkfifo(&s.ws.join("junit.xml"), Mode::S_IRWXU).unwrap();
    let ws = s.ws.clone();
    let c = within_10s(move || run(&ws, &["*.xml"], &CollectLimits::default()));
    assert!(c.files.is_empty());
    assert_eq!(
        c.notes,
        ["results: junit.xml is a FIFO (named pipe), not a regular file; not uploaded"]
    );
}

#[test]
fn a_fifo_put_in_place_of_a_listed_file_does_not_block_the_open() {
    // The walk saw a regular file; by the time it is opened the job has put a FIFO there.
    let s = scene();
    nix::unistd::mkfifo(&s.ws.join("junit.xml"), Mode::S_IRWXU).unwrap();
    let ws = s.ws.clone();
    let opened = within_10s(move || {
        let root = root_fd(&ws);
        open_result(root.as_fd(), "junit.xml", u64::MAX).map(|(_, bytes)| bytes)
    });
    assert_eq!(
        opened.unwrap_err(),
        "results: junit.xml is a FIFO (named pipe), not a regular file; not uploaded"
    );
}

#[test]
fn a_file_over_the_limit_for_one_file_is_left_out() {
    let s = scene();
    write(&s.ws, "big.xml", "12345678901");
    write(&s.ws, "small.xml", "1234567890");
    let limits = CollectLimits {
        max_file_bytes: 10,
        ..CollectLimits::default()
    };
    let c = run(&s.ws, &["*.xml"], &limits);
    assert_eq!(paths(&c), ["small.xml"]);
    assert_eq!(
        c.notes,
        ["results: big.xml is 11 bytes, over the 10 bytes limit for one file; not uploaded"]
    );
}

#[test]
fn files_past_the_total_limit_are_left_out_and_smaller_later_ones_kept() {
    let s = scene();
    write(&s.ws, "a.xml", "aaaaaa");
    write(&s.ws, "b.xml", "bbbbbb");
    write(&s.ws, "c.xml", "cc");
    write(&s.ws, "d.xml", "dd");
    let limits = CollectLimits {
        max_total_bytes: 10,
        ..CollectLimits::default()
    };
    let c = run(&s.ws, &["*.xml"], &limits);
    assert_eq!(paths(&c), ["a.xml", "c.xml", "d.xml"]);
    assert_eq!(
        c.notes,
        [
            "results: b.xml is 6 bytes; with it the result files would pass the 10 bytes limit for all of them together; not uploaded"
        ]
    );
}

#[test]
fn only_the_first_files_in_path_order_are_kept() {
    let s = scene();
    for i in 0..25 {
        write(&s.ws, &format!("r/{i:02}.xml"), "");
    }
    // Refused files do not take a place.
    symlink("/etc/passwd", s.ws.join("r/00-link.xml")).unwrap();
    let limits = CollectLimits {
        max_files: 10,
        ..CollectLimits::default()
    };
    let c = run(&s.ws, &["r/*.xml"], &limits);
    let expected: Vec<String> = (0..10).map(|i| format!("r/{i:02}.xml")).collect();
    assert_eq!(paths(&c), expected);
    assert_eq!(
        c.notes,
        [
            "results: r/00-link.xml is a symbolic link; not followed",
            "results: 25 files matched; only the first 10 (in path order) are uploaded",
        ]
    );
}

#[test]
fn directories_deeper_than_the_limit_are_not_searched() {
    let s = scene();
    write(&s.ws, "a/b/junit.xml", "");
    write(&s.ws, "a/b/c/junit.xml", "");
    let limits = CollectLimits {
        max_depth: 2,
        ..CollectLimits::default()
    };
    let c = run(&s.ws, &["**/junit.xml"], &limits);
    assert_eq!(paths(&c), ["a/b/junit.xml"]);
    assert_eq!(
        c.notes,
        ["results: a/b/c/ is nested more than 2 directories deep; not searched"]
    );
}

#[test]
fn the_walk_stops_after_the_entry_limit() {
    let s = scene();
    // The walk reads the workspace (`a`, `b`: 2 entries), the 5 files in `a` (7), then 4 of
    // the 10 in `b` (11).
    for i in 0..5 {
        write(&s.ws, &format!("a/{i}.xml"), "");
    }
    for i in 0..10 {
        write(&s.ws, &format!("b/{i}.xml"), "");
    }
    let limits = CollectLimits {
        max_entries_walked: 11,
        ..CollectLimits::default()
    };
    let c = run(&s.ws, &["**/*.xml"], &limits);
    let a: Vec<_> = paths(&c)
        .into_iter()
        .filter(|p| p.starts_with("a/"))
        .collect();
    assert_eq!(a.len(), 5, "{:?}", paths(&c));
    assert_eq!(c.files.len(), 9, "{:?}", paths(&c));
    assert_eq!(
        c.notes,
        [
            "results: stopped searching the workspace after 11 entries (the limit); files further on were not considered"
        ]
    );

    // Exactly at the limit nothing was left unread, so there is no note.
    let limits = CollectLimits {
        max_entries_walked: 17,
        ..CollectLimits::default()
    };
    let c = run(&s.ws, &["**/*.xml"], &limits);
    assert_eq!(c.files.len(), 15);
    assert!(c.notes.is_empty(), "{:?}", c.notes);
}

#[test]
fn git_directories_are_not_searched() {
    let s = scene();
    write(&s.ws, ".git/junit.xml", "");
    write(&s.ws, "sub/.git/hooks/junit.xml", "");
    write(&s.ws, "sub/junit.xml", "");
    let limits = CollectLimits {
        // The workspace's 4 entries (`.git`, `sub`, and in it `.git`, `junit.xml`), none of
        // those inside the `.git` directories.
        max_entries_walked: 4,
        ..CollectLimits::default()
    };
    let c = run(&s.ws, &["**/junit.xml"], &limits);
    assert_eq!(paths(&c), ["sub/junit.xml"]);
    assert!(c.notes.is_empty(), "{:?}", c.notes);
}

#[test]
fn bad_patterns_are_refused_naming_the_pattern() {
    let cases: &[(&[&str], &str)] = &[
        (
            &["/etc/*"],
            "pattern \"/etc/*\" is absolute; patterns are relative to the workspace, e.g. \"etc/*\"",
        ),
        (
            &["ok.xml", "../x"],
            "pattern \"../x\" has a \"..\" component; only files inside the workspace are collected, so name them from the workspace down",
        ),
        (
            &["a/../../b"],
            "pattern \"a/../../b\" has a \"..\" component",
        ),
        (&[""], "pattern \"\" names no file; write a glob"),
        (&["./"], "pattern \"./\" names no file"),
        (
            &["a["],
            "pattern \"a[\" is not a valid glob: unclosed character class; missing ']'",
        ),
    ];
    for (list, expected) in cases {
        let err = validate_patterns(&patterns(list)).unwrap_err();
        assert!(err.starts_with(expected), "{list:?}: {err}");
        // collect() refuses them the same way, before looking at the workspace.
        let err = collect(
            Path::new("/nonexistent"),
            &patterns(list),
            &Default::default(),
        )
        .unwrap_err();
        assert!(matches!(err, CollectError::Pattern(_)), "{err:?}");
        assert!(
            err.to_string().starts_with(&format!("results: {expected}")),
            "{err}"
        );
    }

    let long = "a".repeat(MAX_PATTERN_BYTES + 1);
    let err = validate_patterns(&[long]).unwrap_err();
    assert!(
        err.ends_with("…\" is 501 bytes long; at most 500 are allowed"),
        "{err}"
    );
    let many: Vec<String> = (0..=MAX_PATTERNS).map(|i| format!("{i}.xml")).collect();
    let err = validate_patterns(&many).unwrap_err();
    assert!(err.starts_with("51 patterns given; at most 50"), "{err}");

    validate_patterns(&patterns(&[
        "build/**/junit*.xml",
        "./reports/*.xml",
        "reports//x.xml",
        "{a,b}/*.xml",
        "..junit.xml",
    ]))
    .unwrap();
    validate_patterns(
        &(0..MAX_PATTERNS)
            .map(|i| format!("{i}.xml"))
            .collect::<Vec<_>>(),
    )
    .unwrap();
}

#[test]
fn a_file_that_grows_after_collect_is_read_only_up_to_the_size_seen() {
    let s = scene();
    write(&s.ws, "junit.xml", "<ok/>");
    let c = run(&s.ws, &["junit.xml"], &CollectLimits::default());
    let mut appender = fs::OpenOptions::new()
        .append(true)
        .open(s.ws.join("junit.xml"))
        .unwrap();
    appender.write_all(&[b'x'; 4096]).unwrap();
    let mut files = c.files.into_iter();
    let file = files.next().unwrap();
    assert_eq!(file.bytes, 5);
    assert_eq!(file.read_bounded().unwrap(), b"<ok/>");
    // Again, from the start.
    assert_eq!(file.read_bounded().unwrap(), b"<ok/>");
    let mut streamed = Vec::new();
    file.into_reader()
        .unwrap()
        .read_to_end(&mut streamed)
        .unwrap();
    assert_eq!(streamed, b"<ok/>");
}

#[test]
fn a_parent_directory_swapped_for_a_symlink_after_collect_does_not_change_what_is_read() {
    let s = scene();
    write(&s.ws, "reports/junit.xml", "mine");
    write(&s.outside, "junit.xml", "SECRET");
    let c = run(&s.ws, &["reports/*.xml"], &CollectLimits::default());
    assert_eq!(paths(&c), ["reports/junit.xml"]);

    fs::rename(s.ws.join("reports"), s.ws.join("reports.old")).unwrap();
    symlink(&s.outside, s.ws.join("reports")).unwrap();
    // By its path, the file is now the one outside.
    assert_eq!(fs::read(s.ws.join("reports/junit.xml")).unwrap(), b"SECRET");

    assert_eq!(c.files[0].read_bounded().unwrap(), b"mine");
}

#[test]
fn a_parent_directory_swapped_for_a_symlink_before_the_open_is_not_followed() {
    // The race between the walk and the open: the walk saw `reports/` as a directory, the
    // open meets a symbolic link there.
    let s = scene();
    write(&s.outside, "junit.xml", "SECRET");
    write(&s.outside, "deeper/junit.xml", "SECRET");
    fs::create_dir(s.ws.join("a")).unwrap();
    symlink(&s.outside, s.ws.join("reports")).unwrap();
    symlink(&s.outside, s.ws.join("a/b")).unwrap();
    let root = root_fd(&s.ws);
    assert_eq!(
        open_result(root.as_fd(), "reports/junit.xml", u64::MAX).unwrap_err(),
        "results: reports/junit.xml is not uploaded: reports/ was replaced by a symbolic link or a file after the workspace was searched, and is not followed"
    );
    assert_eq!(
        open_result(root.as_fd(), "a/b/deeper/junit.xml", u64::MAX).unwrap_err(),
        "results: a/b/deeper/junit.xml is not uploaded: a/b/ was replaced by a symbolic link or a file after the workspace was searched, and is not followed"
    );
    // And a file swapped for a link.
    symlink(s.outside.join("junit.xml"), s.ws.join("a/junit.xml")).unwrap();
    assert_eq!(
        open_result(root.as_fd(), "a/junit.xml", u64::MAX).unwrap_err(),
        "results: a/junit.xml is a symbolic link; not followed"
    );
}

#[test]
fn names_that_are_not_utf8_are_skipped_with_a_note() {
    let s = scene();
    let bad = OsStr::from_bytes(b"junit-\xff.xml");
    fs::write(s.ws.join(bad), "").unwrap();
    fs::create_dir(s.ws.join(OsStr::from_bytes(b"dir-\xfe"))).unwrap();
    fs::write(s.ws.join(OsStr::from_bytes(b"other-\xff.txt")), "").unwrap();
    write(&s.ws, "ok.xml", "");
    let c = run(&s.ws, &["**/*.xml", "junit-*"], &CollectLimits::default());
    assert_eq!(paths(&c), ["ok.xml"]);
    // And no "matched no file" for `junit-*`: the note says what became of its match.
    assert_eq!(
        c.notes,
        [
            "results: the directory dir-\u{fffd} has a name that is not UTF-8; not searched",
            "results: junit-\u{fffd}.xml has a name that is not UTF-8; not uploaded",
        ]
    );
}

#[test]
fn names_with_control_characters_are_escaped_in_notes() {
    let s = scene();
    symlink("/etc/passwd", s.ws.join("x\ntestbot: job passed.xml")).unwrap();
    // A right-to-left override shows `y.xml` as `ylmx.`; it is invisible, so it is escaped.
    symlink("/etc/passwd", s.ws.join("y\u{202e}lmx.xml")).unwrap();
    let c = run(&s.ws, &["*.xml"], &CollectLimits::default());
    assert_eq!(
        c.notes,
        [
            "results: \"x\\ntestbot: job passed.xml\" is a symbolic link; not followed",
            "results: \"y\\u{202e}lmx.xml\" is a symbolic link; not followed",
        ]
    );
}

#[test]
fn notes_about_single_files_are_capped() {
    let s = scene();
    for i in 0..MAX_ITEM_NOTES + 7 {
        symlink("/etc/passwd", s.ws.join(format!("{i:03}.xml"))).unwrap();
    }
    let c = run(&s.ws, &["*.xml"], &CollectLimits::default());
    assert_eq!(c.notes.len(), MAX_ITEM_NOTES + 1);
    assert_eq!(
        c.notes.last().unwrap(),
        "results: 7 more notes about single files and directories were left out"
    );
}

#[test]
fn an_unreadable_directory_is_skipped_with_a_note() {
    use std::os::unix::fs::PermissionsExt;
    if nix::unistd::geteuid().is_root() {
        // Root reads any directory; there is nothing to see.
        eprintln!("skipped: running as root");
        return;
    }
    let s = scene();
    write(&s.ws, "locked/junit.xml", "");
    write(&s.ws, "open/junit.xml", "");
    fs::set_permissions(s.ws.join("locked"), fs::Permissions::from_mode(0o000)).unwrap();
    let c = run(&s.ws, &["**/junit.xml"], &CollectLimits::default());
    fs::set_permissions(s.ws.join("locked"), fs::Permissions::from_mode(0o755)).unwrap();
    assert_eq!(paths(&c), ["open/junit.xml"]);
    assert_eq!(
        c.notes,
        ["results: locked/ cannot be read (Permission denied); not searched"]
    );
}

#[test]
fn a_workspace_that_is_a_symlink_or_missing_is_an_error() {
    let s = scene();
    let link = s.outside.join("ws-link");
    symlink(&s.ws, &link).unwrap();
    let err = collect(&link, &patterns(&["*.xml"]), &Default::default()).unwrap_err();
    assert!(matches!(err, CollectError::Workspace { .. }), "{err:?}");
    assert!(err.to_string().contains("it is a symbolic link"), "{err}");
    // A trailing slash would make the open follow the link; it is dropped first.
    let with_slash = PathBuf::from(format!("{}/", link.display()));
    let err = collect(&with_slash, &patterns(&["*.xml"]), &Default::default()).unwrap_err();
    assert!(err.to_string().contains("it is a symbolic link"), "{err}");

    let err = collect(
        &s.outside.join("gone"),
        &patterns(&["*.xml"]),
        &Default::default(),
    )
    .unwrap_err();
    assert_eq!(
        err.to_string(),
        format!(
            "results: cannot open the workspace {}: it does not exist; no result files were collected",
            s.outside.join("gone").display()
        )
    );
}

#[test]
fn sizes_read_as_people_write_them() {
    assert_eq!(size_text(1), "1 byte");
    assert_eq!(size_text(1023), "1023 bytes");
    assert_eq!(size_text(1536), "1.5 KiB");
    assert_eq!(size_text(300 * MIB), "300 MiB");
    assert_eq!(size_text(5 * 1024 * MIB), "5 GiB");
}
