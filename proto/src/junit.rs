//! JUnit XML result files, as the test runners of a job write them, read into a [`TestReport`].
//!
//! A job uploads these files and the broker reads them, so the input is untrusted and may be of
//! any size. [`parse_junit`] reads a [`BufRead`] as a stream and keeps memory bounded whatever
//! the input: every limit is in [`JunitLimits`]. Past the limit on test cases (or attempts) it
//! stops and returns what it read with [`TestReport::truncated`] set; long texts (outputs,
//! messages, stack traces) keep a prefix and count what they dropped ([`Excerpt`]). A file that
//! is not well-formed XML, or not JUnit, is a [`JunitError`] placed at `LINE:COL`; oddities in a
//! readable file are [`TestReport::warnings`].
//!
//! Dialects read (fixtures for each in `tests/fixtures/junit/`): pytest `--junitxml` (with
//! pytest-rerunfailures), CTest `--output-junit`, cargo-nextest, gotestsum, Maven Surefire
//! (with `rerunFailure`, `rerunError`, `flakyFailure`, `flakyError`) and jest-junit; a
//! `<testsuites>` root (named or not) or a bare `<testsuite>` root, nested suites, properties.
//!
//! Attempts: every run of a test is an [`Attempt`]. Surefire and nextest write reruns inside one
//! `<testcase>`: `flakyFailure`/`flakyError` are failed attempts before a final pass,
//! `rerunFailure`/`rerunError` are failed attempts after a first failure. gotestsum and
//! pytest-rerunfailures repeat the `<testcase>` element instead; repeated elements with the
//! same suite, classname and name become attempts of one case, in document order.
//!
//! Why text is not read by quick-xml: its reader collects a whole text node (and a whole CDATA
//! section or comment) into one buffer before returning it, so a 500 MB `<system-out>` would be
//! 500 MB of memory. quick-xml reads only the markup here; the text between tags is read by
//! [`Source::scan_text`], which keeps a bounded prefix and counts the rest. The reader's
//! [`BufRead`] (a [`Source`]) also refuses to hand quick-xml more than
//! [`JunitLimits::max_markup_bytes`] for one tag, so an endless attribute is an error rather than
//! an allocation.

use std::collections::HashMap;
use std::fmt;
use std::io::{self, BufRead, Read};

use quick_xml::events::{BytesStart, Event};
use serde::{Deserialize, Serialize};

#[cfg(test)]
mod tests;

/// Joins the names of nested `<testsuite>` elements in [`TestCase::suite`]: `outer > inner`.
/// Suites without a name add nothing to the path.
pub const SUITE_SEPARATOR: &str = " > ";

/// How much of an input [`parse_junit`] reads and keeps.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct JunitLimits {
    /// Distinct test cases kept; past this the parser stops and sets `truncated`. Default 10,000.
    pub max_cases: usize,
    /// Attempts kept over all cases; past this the parser stops and sets `truncated`.
    /// Default 50,000.
    pub max_attempts: usize,
    /// `<testsuite>` elements read; past this the parser stops and sets `truncated`.
    /// Default 1,000.
    pub max_suites: usize,
    /// Bytes kept of each text: an output, a message, a stack trace. Default 64 KiB.
    pub max_text_bytes: usize,
    /// Bytes of text kept over the whole report; once spent, texts keep nothing (and say how
    /// much they dropped). Default 32 MiB.
    pub max_total_text_bytes: usize,
    /// Bytes kept of a name, classname, file, timestamp or property. Default 4 KiB.
    pub max_attribute_bytes: usize,
    /// Longest tag (with its attributes), processing instruction or DOCTYPE read; a longer
    /// one is an error. Default 4 MiB.
    pub max_markup_bytes: usize,
    /// Deepest nesting of elements; deeper is an error. Default 64.
    pub max_depth: usize,
    /// Properties kept per suite. Default 64.
    pub max_properties: usize,
    /// Warnings kept; one more says how many were left out. Default 50.
    pub max_warnings: usize,
}

impl Default for JunitLimits {
    fn default() -> Self {
        JunitLimits {
            max_cases: 10_000,
            max_attempts: 50_000,
            max_suites: 1_000,
            max_text_bytes: 64 * 1024,
            max_total_text_bytes: 32 * 1024 * 1024,
            max_attribute_bytes: 4 * 1024,
            max_markup_bytes: 4 * 1024 * 1024,
            max_depth: 64,
            max_properties: 64,
            max_warnings: 50,
        }
    }
}

/// What one JUnit file says. Stored and served by the broker; fields may be added, so readers
/// should not refuse unknown ones.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct TestReport {
    /// The `name` of a `<testsuites>` root.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub name: Option<String>,
    /// Every `<testsuite>`, in the order they close (inner suites before the outer one).
    pub suites: Vec<TestSuite>,
    /// The test cases, in the order of their first `<testcase>` element.
    pub cases: Vec<TestCase>,
    /// Counts over `cases`, by final outcome.
    pub totals: Totals,
    /// The parser stopped at a limit of [`JunitLimits`]; cases after that point are missing.
    pub truncated: bool,
    /// What was odd but readable, each placed at `LINE:COL` where it has a place.
    pub warnings: Vec<String>,
}

/// One `<testsuite>` element.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct TestSuite {
    /// The path of suite names, joined by [`SUITE_SEPARATOR`].
    pub name: String,
    /// As written, with or without a zone.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub timestamp: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub hostname: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub duration_secs: Option<f64>,
    /// `<properties><property name value/></properties>`, in document order.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub properties: Vec<Property>,
    /// A suite-level `<system-out>` (Ant, some JUnit 4 reporters).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub system_out: Option<Excerpt>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub system_err: Option<Excerpt>,
}

/// One `<property name="..." value="..."/>` of a suite.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Property {
    pub name: String,
    pub value: String,
}

/// One test, with every attempt the file records.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct TestCase {
    /// The path of the enclosing suites' names, joined by [`SUITE_SEPARATOR`]; empty outside
    /// any named suite.
    pub suite: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub classname: Option<String>,
    pub name: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub file: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub line: Option<u32>,
    /// In the order they ran; never empty.
    pub attempts: Vec<Attempt>,
}

/// One run of a test.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Attempt {
    pub outcome: TestOutcome,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub duration_secs: Option<f64>,
    /// As written, with or without a zone.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub timestamp: Option<String>,
    /// The `message` of the failure, error or skip.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub message: Option<Excerpt>,
    /// The `type` of the failure or error: an exception class, an assertion kind.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub kind: Option<String>,
    /// The body of the failure, error or skip, or a rerun's `<stackTrace>`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub details: Option<Excerpt>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub system_out: Option<Excerpt>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub system_err: Option<Excerpt>,
}

/// How one attempt ended. `Failed` is an assertion that did not hold (`<failure>`); `Error` is
/// anything else that stopped the test (`<error>`: an exception, a setup failure, a timeout in
/// some runners).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum TestOutcome {
    Passed,
    Failed,
    Error,
    Skipped,
}

impl TestOutcome {
    /// Failed or errored.
    pub fn is_failure(self) -> bool {
        matches!(self, TestOutcome::Failed | TestOutcome::Error)
    }
}

/// A bounded prefix of a text, and how much of it was left out.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Excerpt {
    pub text: String,
    /// Bytes of the text (after entities were decoded) not kept. 0: the text is whole.
    #[serde(default, skip_serializing_if = "is_zero")]
    pub omitted_bytes: u64,
}

fn is_zero(n: &u64) -> bool {
    *n == 0
}

impl Excerpt {
    /// Some of the text was left out.
    pub fn is_cut(&self) -> bool {
        self.omitted_bytes > 0
    }
}

/// Counts of cases by final outcome (the last attempt's); `flaky` cases are counted in their
/// final outcome too.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Totals {
    pub cases: usize,
    pub attempts: usize,
    pub passed: usize,
    pub failed: usize,
    pub errors: usize,
    pub skipped: usize,
    pub flaky: usize,
}

impl TestCase {
    /// The outcome of the last attempt.
    pub fn final_outcome(&self) -> TestOutcome {
        self.attempts
            .last()
            .map_or(TestOutcome::Passed, |attempt| attempt.outcome)
    }

    /// Both a pass and a failure (or error) among the attempts.
    pub fn is_flaky(&self) -> bool {
        let passed = self
            .attempts
            .iter()
            .any(|a| a.outcome == TestOutcome::Passed);
        passed && self.attempts.iter().any(|a| a.outcome.is_failure())
    }
}

impl Totals {
    /// The counts over `cases`.
    pub fn of(cases: &[TestCase]) -> Totals {
        let mut totals = Totals {
            cases: cases.len(),
            ..Totals::default()
        };
        for case in cases {
            totals.attempts += case.attempts.len();
            match case.final_outcome() {
                TestOutcome::Passed => totals.passed += 1,
                TestOutcome::Failed => totals.failed += 1,
                TestOutcome::Error => totals.errors += 1,
                TestOutcome::Skipped => totals.skipped += 1,
            }
            if case.is_flaky() {
                totals.flaky += 1;
            }
        }
        totals
    }
}

/// A place in the input: 1-based line, 1-based column in bytes, 0-based byte offset.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Position {
    pub line: u64,
    pub column: u64,
    pub offset: u64,
}

impl fmt::Display for Position {
    /// `LINE:COL`, as compilers and the TOML errors of [`crate::toml_errors`] write it.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}:{}", self.line, self.column)
    }
}

/// Why a file could not be read as JUnit XML. The caller reports it and goes on; it does not
/// fail the job.
#[derive(Debug, thiserror::Error)]
pub enum JunitError {
    #[error("cannot read the file: {0}")]
    Io(#[from] io::Error),
    #[error("the file has no XML element (it is empty, or not XML)")]
    Empty,
    #[error("{at}: not well-formed XML: {message}")]
    Malformed { at: Position, message: String },
    #[error("{at}: unexpected end of file inside <{element}> (opened at {opened})")]
    UnexpectedEof {
        at: Position,
        element: String,
        opened: Position,
    },
    #[error("{at}: unexpected end of file inside {what}")]
    Unclosed { at: Position, what: &'static str },
    #[error("{at}: the root element is <{element}>; a JUnit file has <testsuites> or <testsuite>")]
    NotJunit { at: Position, element: String },
    #[error(
        "{at}: the file is encoded as {encoding}; only UTF-8 is read (ask the test runner for UTF-8)"
    )]
    Encoding { at: Position, encoding: String },
    #[error("{at}: elements nest deeper than {max} levels")]
    TooDeep { at: Position, max: usize },
    #[error("{at}: a tag longer than {max} bytes")]
    MarkupTooLong { at: Position, max: usize },
    #[error("{at}: an element name longer than {max} bytes")]
    NameTooLong { at: Position, max: usize },
}

/// Reads one JUnit XML file. See the module docs for what is read and how memory stays bounded.
pub fn parse_junit<R: BufRead>(input: R, limits: &JunitLimits) -> Result<TestReport, JunitError> {
    let mut source = Source::new(input);
    check_encoding_marks(&mut source)?;
    let mut reader = quick_xml::Reader::from_reader(source);
    let mut parser = Parser::new(limits);
    let mut buf = Vec::new();
    loop {
        // Text, CDATA and comments are read here, bounded, before quick-xml sees the next tag.
        let target = parser.target();
        let Parser {
            case,
            suites,
            remaining_text,
            text_flags,
            ..
        } = &mut parser;
        let mut sink = TextSink {
            target: text_buf(target, case, suites).map(|buf| (buf, limits.max_text_bytes)),
            remaining_total: remaining_text,
            flags: text_flags,
        };
        let stop = reader.get_mut().scan_text(&mut sink)?;
        if let ScanStop::Eof = stop {
            return parser.finish_at_eof(reader.get_ref().position());
        }
        let at = reader.get_ref().position();
        reader.get_mut().limit_markup(limits.max_markup_bytes);
        buf.clear();
        let event = reader.read_event_into(&mut buf);
        let over = reader.get_ref().over_limit;
        reader.get_mut().unlimit_markup();
        let event = match event {
            Ok(event) => event,
            Err(_) if over => {
                return Err(JunitError::MarkupTooLong {
                    at,
                    max: limits.max_markup_bytes,
                });
            }
            Err(quick_xml::Error::Io(err)) => {
                return Err(JunitError::Io(io::Error::new(err.kind(), err.to_string())));
            }
            Err(err) => {
                return Err(JunitError::Malformed {
                    at,
                    message: err.to_string(),
                });
            }
        };
        let flow = match event {
            Event::Start(start) => parser.open(&start, at)?,
            Event::Empty(start) => match parser.open(&start, at)? {
                Flow::Continue => parser.close(at),
                stop => stop,
            },
            Event::End(_) => parser.close(at),
            Event::Decl(decl) => {
                if let Some(Ok(encoding)) = decl.encoding()
                    && !is_utf8_label(&encoding)
                {
                    return Err(JunitError::Encoding {
                        at,
                        encoding: encoding.into_owned(),
                    });
                }
                Flow::Continue
            }
            Event::Eof => return parser.finish_at_eof(reader.get_ref().position()),
            // Text, CDATA and references are consumed by `scan_text` before quick-xml can see
            // them; comments, processing instructions and a DOCTYPE mean nothing here.
            _ => Flow::Continue,
        };
        match flow {
            Flow::Continue => {}
            Flow::RootClosed => {
                let source = reader.get_mut();
                if let Some(at) = source.content_after_root()? {
                    parser.warn(format!(
                        "{at}: the file goes on after its root element; the rest is not read"
                    ));
                }
                return Ok(parser.finish());
            }
            Flow::LimitReached => return Ok(parser.finish()),
        }
    }
}

/// `encoding="..."` labels that mean bytes this parser reads as they are.
fn is_utf8_label(label: &str) -> bool {
    let label = label.trim().to_ascii_lowercase();
    matches!(
        label.as_str(),
        "utf-8" | "utf8" | "us-ascii" | "ascii" | "unicode-1-1-utf-8"
    )
}

/// Drops a UTF-8 byte order mark and refuses UTF-16 and UTF-32, which quick-xml would misread
/// as a stream of invalid UTF-8.
fn check_encoding_marks<R: BufRead>(source: &mut Source<R>) -> Result<(), JunitError> {
    let at = source.position();
    let head = source.peek(4)?;
    let encoding = if head.starts_with(&[0xEF, 0xBB, 0xBF]) {
        source.consume_bytes(3);
        return Ok(());
    } else if head.starts_with(&[0xFF, 0xFE, 0, 0]) || head.starts_with(&[0, 0, 0xFE, 0xFF]) {
        "UTF-32"
    } else if head.starts_with(&[0xFF, 0xFE]) || head.starts_with(&[0xFE, 0xFF]) {
        "UTF-16"
    } else if head.starts_with(&[b'<', 0]) || head.starts_with(&[0, b'<']) {
        "UTF-16 (without a byte order mark)"
    } else {
        return Ok(());
    };
    Err(JunitError::Encoding {
        at,
        encoding: encoding.to_string(),
    })
}

/// What the parser does after an element.
enum Flow {
    Continue,
    /// The root element closed: the document is read.
    RootClosed,
    /// A limit on cases, attempts or suites was reached.
    LimitReached,
}

/// What an open element is to the parser.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Kind {
    Testsuites,
    Testsuite,
    Properties,
    Testcase,
    /// `<failure>`, `<error>`, `<skipped>` of the case's own attempt.
    Outcome,
    /// `rerunFailure`, `rerunError`, `flakyFailure`, `flakyError`: an attempt of their own.
    Rerun,
    /// A rerun's `<stackTrace>`.
    StackTrace,
    SystemOut,
    SystemErr,
    /// Anything else, with everything inside it.
    Other,
}

struct Frame {
    kind: Kind,
    /// For messages; at most [`MAX_NAME_IN_MESSAGES`] bytes.
    name: String,
    opened: Position,
}

/// Longest element name read; JUnit's are a dozen bytes.
const MAX_ELEMENT_NAME_BYTES: usize = 1024;

/// Element names in error messages are cut to this many bytes.
const MAX_NAME_IN_MESSAGES: usize = 64;

/// Where the text being read goes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Target {
    Discard,
    CaseDetails,
    CaseOut,
    CaseErr,
    RerunDetails,
    RerunOut,
    RerunErr,
    SuiteOut,
    SuiteErr,
}

/// The buffer of `target`, if the element it belongs to is being read.
fn text_buf<'a>(
    target: Target,
    case: &'a mut Option<CaseBuilder>,
    suites: &'a mut [SuiteBuilder],
) -> Option<&'a mut TextBuf> {
    Some(match target {
        Target::Discard => return None,
        Target::CaseDetails => &mut case.as_mut()?.main.details,
        Target::CaseOut => &mut case.as_mut()?.main.system_out,
        Target::CaseErr => &mut case.as_mut()?.main.system_err,
        Target::RerunDetails => &mut case.as_mut()?.reruns.last_mut()?.details,
        Target::RerunOut => &mut case.as_mut()?.reruns.last_mut()?.system_out,
        Target::RerunErr => &mut case.as_mut()?.reruns.last_mut()?.system_err,
        Target::SuiteOut => &mut suites.last_mut()?.system_out,
        Target::SuiteErr => &mut suites.last_mut()?.system_err,
    })
}

/// A text being collected: at most `cap` bytes kept, the rest counted.
#[derive(Debug, Default)]
struct TextBuf {
    bytes: Vec<u8>,
    omitted: u64,
    /// The element was present (even if empty), so the field is `Some`.
    present: bool,
}

impl TextBuf {
    fn present() -> TextBuf {
        TextBuf {
            present: true,
            ..TextBuf::default()
        }
    }

    fn push(&mut self, bytes: &[u8], cap: usize, remaining_total: &mut usize) {
        let room = cap
            .saturating_sub(self.bytes.len())
            .min(*remaining_total)
            .min(bytes.len());
        self.bytes.extend_from_slice(&bytes[..room]);
        *remaining_total -= room;
        self.omitted += (bytes.len() - room) as u64;
    }

    /// The kept bytes as text. Invalid UTF-8 becomes U+FFFD, which is longer than the byte it
    /// replaces: the growth is charged to `remaining_total`, and the text still keeps within
    /// `cap` (what does not fit is omitted). A character the cut split in two is dropped.
    fn finish(
        self,
        cap: usize,
        remaining_total: &mut usize,
        flags: &mut TextFlags,
    ) -> Option<Excerpt> {
        if !self.present {
            return None;
        }
        let mut bytes = self.bytes;
        let mut omitted = self.omitted;
        if omitted > 0 {
            let split = split_char_len(&bytes);
            bytes.truncate(bytes.len() - split);
            omitted += split as u64;
            flags.cut += 1;
        }
        let kept = bytes.len();
        let max = cap.min(kept.saturating_add(*remaining_total));
        let (text, used) = match String::from_utf8(bytes) {
            Ok(text) => {
                let used = text.len();
                (text, used)
            }
            Err(err) => {
                flags.invalid_utf8 = true;
                decode_lossy_within(err.as_bytes(), max)
            }
        };
        *remaining_total -= text.len().saturating_sub(kept);
        omitted += (kept - used) as u64;
        Some(Excerpt {
            text,
            omitted_bytes: omitted,
        })
    }
}

/// `bytes` as UTF-8 with U+FFFD for what is not, in at most `max` bytes; and how many of
/// `bytes` that text stands for.
fn decode_lossy_within(bytes: &[u8], max: usize) -> (String, usize) {
    let mut text = String::with_capacity(bytes.len().min(max));
    let mut used = 0;
    for chunk in bytes.utf8_chunks() {
        let valid = cut_str(chunk.valid(), max - text.len());
        text.push_str(valid);
        used += valid.len();
        if valid.len() < chunk.valid().len() {
            break;
        }
        if !chunk.invalid().is_empty() {
            if text.len() + char::REPLACEMENT_CHARACTER.len_utf8() > max {
                break;
            }
            text.push(char::REPLACEMENT_CHARACTER);
            used += chunk.invalid().len();
        }
    }
    (text, used)
}

/// `excerpt` without whitespace at either end; `None` when nothing else is left.
fn trimmed(mut excerpt: Excerpt) -> Option<Excerpt> {
    let text = excerpt.text.trim();
    if text.is_empty() && !excerpt.is_cut() {
        return None;
    }
    if text.len() != excerpt.text.len() {
        excerpt.text = text.to_string();
    }
    Some(excerpt)
}

/// How many bytes at the end of `bytes` are an incomplete UTF-8 character.
fn split_char_len(bytes: &[u8]) -> usize {
    let tail = &bytes[bytes.len().saturating_sub(3)..];
    match std::str::from_utf8(tail) {
        Ok(_) => 0,
        Err(err) if err.error_len().is_none() => tail.len() - err.valid_up_to(),
        Err(_) => 0,
    }
}

/// Things about the text of the whole file that are reported once, as one warning each.
#[derive(Debug, Default)]
struct TextFlags {
    invalid_utf8: bool,
    unknown_entity: Option<String>,
    bare_ampersand: bool,
    cut: usize,
}

/// What turning collected bytes into [`Excerpt`]s needs.
struct TextLimits<'a> {
    cap: usize,
    remaining: &'a mut usize,
    flags: &'a mut TextFlags,
}

impl TextLimits<'_> {
    fn finish(&mut self, buf: TextBuf) -> Option<Excerpt> {
        buf.finish(self.cap, self.remaining, self.flags)
    }
}

/// Where [`Source::scan_text`] puts what it reads.
struct TextSink<'a> {
    target: Option<(&'a mut TextBuf, usize)>,
    remaining_total: &'a mut usize,
    flags: &'a mut TextFlags,
}

impl TextSink<'_> {
    fn push(&mut self, bytes: &[u8]) {
        if let Some((buf, cap)) = &mut self.target {
            buf.push(bytes, *cap, self.remaining_total);
        }
    }
}

/// One attempt being read.
#[derive(Debug)]
struct AttemptBuilder {
    outcome: TestOutcome,
    duration_secs: Option<f64>,
    timestamp: Option<String>,
    message: TextBuf,
    kind: Option<String>,
    details: TextBuf,
    system_out: TextBuf,
    system_err: TextBuf,
}

impl AttemptBuilder {
    fn new(outcome: TestOutcome) -> AttemptBuilder {
        AttemptBuilder {
            outcome,
            duration_secs: None,
            timestamp: None,
            message: TextBuf::default(),
            kind: None,
            details: TextBuf::default(),
            system_out: TextBuf::default(),
            system_err: TextBuf::default(),
        }
    }

    fn finish(self, texts: &mut TextLimits<'_>) -> Attempt {
        Attempt {
            outcome: self.outcome,
            duration_secs: self.duration_secs,
            timestamp: self.timestamp,
            message: texts.finish(self.message),
            kind: self.kind,
            // Bodies and stack traces sit between indented tags: their surrounding whitespace
            // is layout, not text.
            details: texts.finish(self.details).and_then(trimmed),
            system_out: texts.finish(self.system_out),
            system_err: texts.finish(self.system_err),
        }
    }
}

/// The `<testcase>` being read.
struct CaseBuilder {
    classname: Option<String>,
    name: String,
    file: Option<String>,
    line: Option<u32>,
    /// The attempt the `<testcase>` element itself records.
    main: AttemptBuilder,
    /// Its `rerun*` and `flaky*` children, in document order.
    reruns: Vec<AttemptBuilder>,
}

struct SuiteBuilder {
    /// This suite's own name (empty when unnamed).
    name: String,
    timestamp: Option<String>,
    hostname: Option<String>,
    duration_secs: Option<f64>,
    properties: Vec<Property>,
    system_out: TextBuf,
    system_err: TextBuf,
}

struct Parser<'l> {
    limits: &'l JunitLimits,
    stack: Vec<Frame>,
    suites: Vec<SuiteBuilder>,
    case: Option<CaseBuilder>,
    report: TestReport,
    /// (suite path, classname, name) → index in `report.cases`.
    index: HashMap<(String, Option<String>, String), usize>,
    attempts: usize,
    suites_seen: usize,
    remaining_text: usize,
    text_flags: TextFlags,
    warnings_left_out: usize,
}

impl<'l> Parser<'l> {
    fn new(limits: &'l JunitLimits) -> Parser<'l> {
        Parser {
            limits,
            stack: Vec::new(),
            suites: Vec::new(),
            case: None,
            report: TestReport {
                name: None,
                suites: Vec::new(),
                cases: Vec::new(),
                totals: Totals::default(),
                truncated: false,
                warnings: Vec::new(),
            },
            index: HashMap::new(),
            attempts: 0,
            suites_seen: 0,
            remaining_text: limits.max_total_text_bytes,
            text_flags: TextFlags::default(),
            warnings_left_out: 0,
        }
    }

    fn warn(&mut self, warning: String) {
        if self.report.warnings.len() < self.limits.max_warnings {
            self.report.warnings.push(warning);
        } else {
            self.warnings_left_out += 1;
        }
    }

    fn top(&self) -> Option<Kind> {
        self.stack.last().map(|frame| frame.kind)
    }

    /// The kind of the element below the top one.
    fn parent(&self) -> Option<Kind> {
        self.stack.len().checked_sub(2).map(|i| self.stack[i].kind)
    }

    /// Where text read now belongs.
    fn target(&self) -> Target {
        match (self.top(), self.parent()) {
            (Some(Kind::Outcome), _) => Target::CaseDetails,
            (Some(Kind::Rerun), _) | (Some(Kind::StackTrace), _) => Target::RerunDetails,
            (Some(Kind::SystemOut), Some(Kind::Testcase)) => Target::CaseOut,
            (Some(Kind::SystemErr), Some(Kind::Testcase)) => Target::CaseErr,
            (Some(Kind::SystemOut), Some(Kind::Rerun)) => Target::RerunOut,
            (Some(Kind::SystemErr), Some(Kind::Rerun)) => Target::RerunErr,
            (Some(Kind::SystemOut), Some(Kind::Testsuite)) => Target::SuiteOut,
            (Some(Kind::SystemErr), Some(Kind::Testsuite)) => Target::SuiteErr,
            _ => Target::Discard,
        }
    }

    /// The path of the open suites' names.
    fn suite_path(&self) -> String {
        let names: Vec<&str> = self
            .suites
            .iter()
            .map(|suite| suite.name.as_str())
            .filter(|name| !name.is_empty())
            .collect();
        names.join(SUITE_SEPARATOR)
    }

    /// Reads one attribute value, entities decoded; `None` when absent. Values are cut to
    /// `max` bytes (with a warning).
    fn attribute(
        &mut self,
        start: &BytesStart<'_>,
        key: &str,
        max: usize,
        at: Position,
    ) -> Option<String> {
        let mut value = None;
        for attr in start.attributes().with_checks(false) {
            let Ok(attr) = attr else {
                continue;
            };
            if attr.key.local_name().as_ref() != key {
                continue;
            }
            value = Some(
                match attr.normalized_value(quick_xml::XmlVersion::Implicit1_0) {
                    Ok(decoded) => decoded.into_owned(),
                    Err(_) => {
                        let raw = attr.value.into_owned();
                        self.warn(format!(
                            "{at}: attribute {key}=\"{}\" has an entity that is not XML's own; \
                             kept as written",
                            cut_str(&raw, MAX_NAME_IN_MESSAGES)
                        ));
                        raw
                    }
                },
            );
            break;
        }
        let mut value = value?;
        if value.len() > max {
            let kept = cut_str(&value, max).len();
            self.warn(format!(
                "{at}: attribute {key} is {} bytes long; the first {kept} are kept",
                value.len()
            ));
            value.truncate(kept);
        }
        Some(value)
    }

    fn duration(&mut self, start: &BytesStart<'_>, at: Position) -> Option<f64> {
        let written = self.attribute(start, "time", MAX_NAME_IN_MESSAGES, at)?;
        let secs = parse_seconds(&written);
        if secs.is_none() && !written.trim().is_empty() {
            self.warn(format!(
                "{at}: time=\"{written}\" is not a number of seconds"
            ));
        }
        secs
    }

    /// An element opens: where it is decides what it is.
    fn open(&mut self, start: &BytesStart<'_>, at: Position) -> Result<Flow, JunitError> {
        if self.stack.len() >= self.limits.max_depth {
            return Err(JunitError::TooDeep {
                at,
                max: self.limits.max_depth,
            });
        }
        // quick-xml keeps the name of every open element to check end tags: long names times
        // the depth would be unbounded memory.
        if start.name().as_ref().len() > MAX_ELEMENT_NAME_BYTES {
            return Err(JunitError::NameTooLong {
                at,
                max: MAX_ELEMENT_NAME_BYTES,
            });
        }
        let qname = start.name();
        let local = qname.local_name();
        let name = local.as_ref();
        let parent = self.top();
        let inside_other = self.stack.iter().any(|f| f.kind == Kind::Other);
        let in_case = self.case.is_some();
        let kind = match (parent, name) {
            _ if inside_other => Kind::Other,
            (None | Some(Kind::Testsuites), "testsuites") => Kind::Testsuites,
            (None, "testsuite") => Kind::Testsuite,
            (None, _) => {
                return Err(JunitError::NotJunit {
                    at,
                    element: cut_str(name, MAX_NAME_IN_MESSAGES).to_string(),
                });
            }
            (Some(Kind::Testsuites | Kind::Testsuite), "testsuite") => Kind::Testsuite,
            (Some(Kind::Testsuites | Kind::Testsuite), "testcase") => Kind::Testcase,
            (Some(Kind::Testsuite), "properties") => Kind::Properties,
            (Some(Kind::Testsuite), "system-out") => Kind::SystemOut,
            (Some(Kind::Testsuite), "system-err") => Kind::SystemErr,
            (Some(Kind::Testcase), "failure" | "error" | "skipped") => Kind::Outcome,
            (
                Some(Kind::Testcase),
                "rerunFailure" | "rerunError" | "flakyFailure" | "flakyError",
            ) => Kind::Rerun,
            (Some(Kind::Testcase | Kind::Rerun), "system-out") => Kind::SystemOut,
            (Some(Kind::Testcase | Kind::Rerun), "system-err") => Kind::SystemErr,
            (Some(Kind::Rerun), "stackTrace") => Kind::StackTrace,
            _ => Kind::Other,
        };
        if kind == Kind::Other && in_case && name == "testcase" {
            self.warn(format!(
                "{at}: a <testcase> inside a <testcase> is not read"
            ));
        }
        self.stack.push(Frame {
            kind,
            name: cut_str(name, MAX_NAME_IN_MESSAGES).to_string(),
            opened: at,
        });
        let attr_max = self.limits.max_attribute_bytes;
        match kind {
            Kind::Testsuites if parent.is_none() => {
                self.report.name = self.attribute(start, "name", attr_max, at);
            }
            Kind::Testsuite => {
                if self.suites_seen >= self.limits.max_suites {
                    self.stop_at_limit(at, "suites", self.limits.max_suites);
                    return Ok(Flow::LimitReached);
                }
                self.suites_seen += 1;
                let suite = SuiteBuilder {
                    name: self
                        .attribute(start, "name", attr_max, at)
                        .unwrap_or_default(),
                    timestamp: self.attribute(start, "timestamp", attr_max, at),
                    hostname: self.attribute(start, "hostname", attr_max, at),
                    duration_secs: self.duration(start, at),
                    properties: Vec::new(),
                    system_out: TextBuf::default(),
                    system_err: TextBuf::default(),
                };
                self.suites.push(suite);
            }
            Kind::Testcase => self.open_case(start, at),
            Kind::Outcome => self.open_outcome(start, name, at),
            Kind::Rerun => {
                let reruns = self.case.as_ref().map_or(0, |case| case.reruns.len());
                // The main attempt and these reruns are all attempts once the case closes.
                if self.attempts + reruns + 2 > self.limits.max_attempts {
                    self.stop_at_limit(at, "attempts", self.limits.max_attempts);
                    return Ok(Flow::LimitReached);
                }
                let outcome = if name.ends_with("Error") {
                    TestOutcome::Error
                } else {
                    TestOutcome::Failed
                };
                let mut attempt = AttemptBuilder::new(outcome);
                attempt.duration_secs = self.duration(start, at);
                attempt.timestamp = self.attribute(start, "timestamp", attr_max, at);
                attempt.kind = self
                    .attribute(start, "type", attr_max, at)
                    .filter(|kind| !kind.is_empty());
                if let Some(message) = self.attribute(start, "message", usize::MAX, at) {
                    attempt.message = self.text_of(&message);
                }
                attempt.details.present = true;
                if let Some(case) = &mut self.case {
                    case.reruns.push(attempt);
                }
            }
            Kind::StackTrace => {
                self.mark_present(|case| case.reruns.last_mut().map(|attempt| &mut attempt.details))
            }
            Kind::SystemOut | Kind::SystemErr => {
                let out = kind == Kind::SystemOut;
                match parent {
                    Some(Kind::Testsuite) => {
                        if let Some(suite) = self.suites.last_mut() {
                            let buf = if out {
                                &mut suite.system_out
                            } else {
                                &mut suite.system_err
                            };
                            buf.present = true;
                        }
                    }
                    Some(Kind::Rerun) => self.mark_present(|case| {
                        let attempt = case.reruns.last_mut()?;
                        Some(if out {
                            &mut attempt.system_out
                        } else {
                            &mut attempt.system_err
                        })
                    }),
                    _ => self.mark_present(|case| {
                        Some(if out {
                            &mut case.main.system_out
                        } else {
                            &mut case.main.system_err
                        })
                    }),
                }
            }
            Kind::Other if parent == Some(Kind::Properties) && name == "property" => {
                let name = self.attribute(start, "name", attr_max, at);
                let value = self.attribute(start, "value", attr_max, at);
                let max = self.limits.max_properties;
                if let (Some(suite), Some(name)) = (self.suites.last_mut(), name) {
                    if suite.properties.len() < max {
                        suite.properties.push(Property {
                            name,
                            value: value.unwrap_or_default(),
                        });
                    } else if suite.properties.len() == max {
                        // Marks that the warning was given, so it is given once per suite.
                        suite.properties.push(Property {
                            name: String::new(),
                            value: String::new(),
                        });
                        self.warn(format!(
                            "{at}: a suite has more than {max} properties; the rest are not kept"
                        ));
                    }
                }
            }
            Kind::Testsuites | Kind::Properties | Kind::Other => {}
        }
        Ok(Flow::Continue)
    }

    fn mark_present(&mut self, field: impl FnOnce(&mut CaseBuilder) -> Option<&mut TextBuf>) {
        if let Some(buf) = self.case.as_mut().and_then(field) {
            buf.present = true;
        }
    }

    /// An attribute's text as an excerpt, within the same limits as element text.
    fn text_of(&mut self, text: &str) -> TextBuf {
        if text.is_empty() {
            return TextBuf::default();
        }
        let mut buf = TextBuf::present();
        buf.push(
            text.as_bytes(),
            self.limits.max_text_bytes,
            &mut self.remaining_text,
        );
        buf
    }

    fn open_case(&mut self, start: &BytesStart<'_>, at: Position) {
        let attr_max = self.limits.max_attribute_bytes;
        let name = match self.attribute(start, "name", attr_max, at) {
            Some(name) => name,
            None => {
                self.warn(format!("{at}: a <testcase> has no name"));
                String::new()
            }
        };
        let classname = self.attribute(start, "classname", attr_max, at);
        let file = self.attribute(start, "file", attr_max, at);
        let line = self
            .attribute(start, "line", MAX_NAME_IN_MESSAGES, at)
            .and_then(|line| line.trim().parse().ok());
        let mut main = AttemptBuilder::new(TestOutcome::Passed);
        main.duration_secs = self.duration(start, at);
        main.timestamp = self.attribute(start, "timestamp", attr_max, at);
        // CTest writes `status="disabled"` or `"notrun"` with no child for tests that did not
        // run; Bazel writes `status="notrun"`.
        if let Some(status) = self.attribute(start, "status", MAX_NAME_IN_MESSAGES, at)
            && matches!(status.as_str(), "disabled" | "notrun" | "skipped")
        {
            main.outcome = TestOutcome::Skipped;
        }
        self.case = Some(CaseBuilder {
            classname,
            name,
            file,
            line,
            main,
            reruns: Vec::new(),
        });
    }

    /// `<failure>`, `<error>` or `<skipped>` of the case's own attempt. Several in one
    /// `<testcase>` (googletest writes one per failed assertion) are one attempt: the worst
    /// outcome, the first message and type, every body.
    fn open_outcome(&mut self, start: &BytesStart<'_>, name: &str, at: Position) {
        let outcome = match name {
            "failure" => TestOutcome::Failed,
            "error" => TestOutcome::Error,
            _ => TestOutcome::Skipped,
        };
        let attr_max = self.limits.max_attribute_bytes;
        let kind = self
            .attribute(start, "type", attr_max, at)
            .filter(|kind| !kind.is_empty());
        let message = self.attribute(start, "message", usize::MAX, at);
        let message = message.map(|message| self.text_of(&message));
        let Some(case) = &mut self.case else {
            return;
        };
        let main = &mut case.main;
        if severity(outcome) > severity(main.outcome) {
            main.outcome = outcome;
        }
        if main.kind.is_none() {
            main.kind = kind;
        }
        if !main.message.present
            && let Some(message) = message
        {
            main.message = message;
        }
        if main.details.present && !main.details.bytes.is_empty() {
            main.details
                .push(b"\n", self.limits.max_text_bytes, &mut self.remaining_text);
        }
        main.details.present = true;
    }

    /// The top element closes.
    fn close(&mut self, at: Position) -> Flow {
        let Some(frame) = self.stack.pop() else {
            return Flow::RootClosed;
        };
        let flow = match frame.kind {
            Kind::Testcase => self.close_case(at),
            Kind::Testsuite => {
                if let Some(suite) = self.suites.pop() {
                    let mut path = self.suite_path();
                    if !suite.name.is_empty() {
                        if !path.is_empty() {
                            path.push_str(SUITE_SEPARATOR);
                        }
                        path.push_str(&suite.name);
                    }
                    let mut texts = TextLimits {
                        cap: self.limits.max_text_bytes,
                        remaining: &mut self.remaining_text,
                        flags: &mut self.text_flags,
                    };
                    let system_out = texts.finish(suite.system_out);
                    let system_err = texts.finish(suite.system_err);
                    let mut properties = suite.properties;
                    properties.truncate(self.limits.max_properties);
                    let suite = TestSuite {
                        name: path,
                        timestamp: suite.timestamp,
                        hostname: suite.hostname,
                        duration_secs: suite.duration_secs,
                        properties,
                        system_out,
                        system_err,
                    };
                    self.report.suites.push(suite);
                }
                Flow::Continue
            }
            _ => Flow::Continue,
        };
        match flow {
            Flow::Continue if self.stack.is_empty() => Flow::RootClosed,
            flow => flow,
        }
    }

    fn close_case(&mut self, at: Position) -> Flow {
        let Some(case) = self.case.take() else {
            return Flow::Continue;
        };
        let mut texts = TextLimits {
            cap: self.limits.max_text_bytes,
            remaining: &mut self.remaining_text,
            flags: &mut self.text_flags,
        };
        let main_first = case.main.outcome.is_failure();
        let mut attempts = Vec::with_capacity(case.reruns.len() + 1);
        let main = case.main.finish(&mut texts);
        // A first failure is followed by its reruns (Surefire's and nextest's `rerun*`); flaky
        // failures come before the final pass (`flaky*`).
        if main_first {
            attempts.push(main);
            attempts.extend(case.reruns.into_iter().map(|a| a.finish(&mut texts)));
        } else {
            attempts.extend(case.reruns.into_iter().map(|a| a.finish(&mut texts)));
            attempts.push(main);
        }
        if self.attempts + attempts.len() > self.limits.max_attempts {
            self.stop_at_limit(at, "attempts", self.limits.max_attempts);
            return Flow::LimitReached;
        }
        let key = (self.suite_path(), case.classname, case.name);
        if let Some(&i) = self.index.get(&key) {
            self.attempts += attempts.len();
            self.report.cases[i].attempts.extend(attempts);
            return Flow::Continue;
        }
        if self.report.cases.len() >= self.limits.max_cases {
            self.stop_at_limit(at, "test cases", self.limits.max_cases);
            return Flow::LimitReached;
        }
        self.attempts += attempts.len();
        let (suite, classname, name) = key.clone();
        self.index.insert(key, self.report.cases.len());
        self.report.cases.push(TestCase {
            suite,
            classname,
            name,
            file: case.file,
            line: case.line,
            attempts,
        });
        Flow::Continue
    }

    fn stop_at_limit(&mut self, at: Position, what: &str, max: usize) {
        self.report.truncated = true;
        self.warn(format!(
            "{at}: more than {max} {what}; the rest of the file is not read"
        ));
    }

    /// The input ended: fine after the root element, an error inside it.
    fn finish_at_eof(mut self, at: Position) -> Result<TestReport, JunitError> {
        match self.stack.pop() {
            Some(frame) => Err(JunitError::UnexpectedEof {
                at,
                element: frame.name,
                opened: frame.opened,
            }),
            None => Err(JunitError::Empty),
        }
    }

    fn finish(mut self) -> TestReport {
        let flags = std::mem::take(&mut self.text_flags);
        if flags.cut > 0 {
            self.warn(format!(
                "{} texts were longer than the limit ({} bytes each, {} in all) and were cut",
                flags.cut, self.limits.max_text_bytes, self.limits.max_total_text_bytes
            ));
        }
        if flags.invalid_utf8 {
            self.warn("text that is not UTF-8 was replaced with U+FFFD".to_string());
        }
        if let Some(entity) = flags.unknown_entity {
            self.warn(format!(
                "entities that are not XML's own (the first: &{entity};) are kept as written"
            ));
        }
        if flags.bare_ampersand {
            self.warn("text has a bare & (not an entity); kept as written".to_string());
        }
        if self.warnings_left_out > 0 {
            let n = self.warnings_left_out;
            self.report
                .warnings
                .push(format!("{n} more warnings are not shown"));
        }
        self.report.totals = Totals::of(&self.report.cases);
        self.report
    }
}

/// Which outcome wins when one `<testcase>` has several outcome elements.
fn severity(outcome: TestOutcome) -> u8 {
    match outcome {
        TestOutcome::Passed => 0,
        TestOutcome::Skipped => 1,
        TestOutcome::Failed => 2,
        TestOutcome::Error => 3,
    }
}

/// Seconds as runners write them: `0.004`, `30`, Surefire's `1,234.567`. Negative, infinite
/// and NaN values are not durations.
fn parse_seconds(written: &str) -> Option<f64> {
    let cleaned: String = written.trim().chars().filter(|c| *c != ',').collect();
    let secs: f64 = cleaned.strip_suffix('s').unwrap_or(&cleaned).parse().ok()?;
    (secs.is_finite() && secs >= 0.0).then_some(secs)
}

/// The longest prefix of `text` of at most `max` bytes that ends on a character boundary.
fn cut_str(text: &str, max: usize) -> &str {
    if text.len() <= max {
        return text;
    }
    let mut end = max;
    while !text.is_char_boundary(end) {
        end -= 1;
    }
    &text[..end]
}

/// Size of the buffer between the input and the parser.
const CHUNK_BYTES: usize = 64 * 1024;

/// Longest entity reference decoded in text (`&#x10FFFF;` is 10 bytes).
const MAX_ENTITY_BYTES: usize = 12;

/// Why [`Source::scan_text`] stopped.
enum ScanStop {
    /// At a `<` that starts a tag, a processing instruction or a DOCTYPE: quick-xml's turn.
    Markup,
    Eof,
}

/// The input, buffered, with the line and column of every byte consumed. It is the
/// [`BufRead`] quick-xml reads markup from, and reads the text between tags itself.
struct Source<R> {
    inner: R,
    buf: Box<[u8]>,
    start: usize,
    end: usize,
    eof: bool,
    offset: u64,
    line: u64,
    /// Offset of the first byte of the current line.
    line_start: u64,
    /// Bytes quick-xml may still consume for the current markup; `None`: no limit.
    markup_budget: Option<usize>,
    /// quick-xml asked for more than the budget.
    over_limit: bool,
}

impl<R: BufRead> Source<R> {
    fn new(inner: R) -> Source<R> {
        Source {
            inner,
            buf: vec![0; CHUNK_BYTES].into_boxed_slice(),
            start: 0,
            end: 0,
            eof: false,
            offset: 0,
            line: 1,
            line_start: 0,
            markup_budget: None,
            over_limit: false,
        }
    }

    fn position(&self) -> Position {
        Position {
            line: self.line,
            column: self.offset - self.line_start + 1,
            offset: self.offset,
        }
    }

    fn limit_markup(&mut self, max: usize) {
        self.markup_budget = Some(max);
        self.over_limit = false;
    }

    fn unlimit_markup(&mut self) {
        self.markup_budget = None;
    }

    /// Reads until at least `n` bytes are buffered or the input ends, and returns what is
    /// buffered.
    fn peek(&mut self, n: usize) -> io::Result<&[u8]> {
        debug_assert!(n <= CHUNK_BYTES);
        if self.end - self.start < n && !self.eof {
            self.buf.copy_within(self.start..self.end, 0);
            self.end -= self.start;
            self.start = 0;
            while self.end < n && !self.eof {
                match self.inner.read(&mut self.buf[self.end..]) {
                    Ok(0) => self.eof = true,
                    Ok(read) => self.end += read,
                    Err(err) if err.kind() == io::ErrorKind::Interrupted => {}
                    Err(err) => return Err(err),
                }
            }
        }
        Ok(&self.buf[self.start..self.end])
    }

    fn consume_bytes(&mut self, n: usize) {
        let consumed = &self.buf[self.start..self.start + n];
        let newlines = memchr::memchr_iter(b'\n', consumed).count();
        if let Some(last) = memchr::memrchr(b'\n', consumed) {
            self.line += newlines as u64;
            self.line_start = self.offset + last as u64 + 1;
        }
        self.start += n;
        self.offset += n as u64;
    }

    /// Reads text, CDATA sections, entity references and comments up to the next other markup
    /// (or the end of the input), and hands the text to `sink`, which keeps what its limits
    /// allow. Memory stays at the buffer's size whatever the text's length.
    fn scan_text(&mut self, sink: &mut TextSink<'_>) -> Result<ScanStop, JunitError> {
        loop {
            let available = self.peek(1)?;
            if available.is_empty() {
                return Ok(ScanStop::Eof);
            }
            let Some(i) = memchr::memchr2(b'<', b'&', available) else {
                let n = available.len();
                sink.push(available);
                self.consume_bytes(n);
                continue;
            };
            sink.push(&available[..i]);
            let is_markup = available[i] == b'<';
            self.consume_bytes(i);
            if is_markup {
                let at = self.position();
                let head = self.peek(9)?;
                if head.starts_with(b"<!--") {
                    self.consume_bytes(4);
                    self.skip_until(b"-->", None)
                        .map_err(|err| err.at(at, "a comment"))?;
                } else if head.starts_with(b"<![CDATA[") {
                    self.consume_bytes(9);
                    self.skip_until(b"]]>", Some(sink))
                        .map_err(|err| err.at(at, "a CDATA section"))?;
                } else {
                    return Ok(ScanStop::Markup);
                }
            } else {
                self.entity(sink)?;
            }
        }
    }

    /// At a `&`: decodes XML's five entities and character references; keeps anything else
    /// as written (and notes it once).
    fn entity(&mut self, sink: &mut TextSink<'_>) -> io::Result<()> {
        let head = self.peek(MAX_ENTITY_BYTES)?;
        let Some(semi) = head[1..].iter().position(|b| *b == b';').map(|i| i + 1) else {
            sink.push(b"&");
            sink.flags.bare_ampersand = true;
            self.consume_bytes(1);
            return Ok(());
        };
        let name = &head[1..semi];
        let decoded = decode_entity(name);
        match decoded {
            Some(c) => {
                let mut utf8 = [0; 4];
                sink.push(c.encode_utf8(&mut utf8).as_bytes());
            }
            None if name.iter().all(|b| b.is_ascii_alphanumeric() || *b == b'_') => {
                if sink.flags.unknown_entity.is_none() {
                    sink.flags.unknown_entity = Some(String::from_utf8_lossy(name).into_owned());
                }
                let written = head[..=semi].to_vec();
                sink.push(&written);
            }
            None => {
                sink.push(b"&");
                sink.flags.bare_ampersand = true;
                self.consume_bytes(1);
                return Ok(());
            }
        }
        self.consume_bytes(semi + 1);
        Ok(())
    }

    /// Consumes up to and including `end`, handing what comes before it to `sink`.
    fn skip_until(
        &mut self,
        end: &[u8],
        mut sink: Option<&mut TextSink<'_>>,
    ) -> Result<(), Unclosed> {
        let finder = memchr::memmem::Finder::new(end);
        loop {
            let available = self.peek(end.len()).map_err(Unclosed::Io)?;
            if let Some(i) = finder.find(available) {
                if let Some(sink) = sink.as_mut() {
                    sink.push(&available[..i]);
                }
                self.consume_bytes(i + end.len());
                return Ok(());
            }
            if available.len() < end.len() {
                return Err(Unclosed::Eof);
            }
            // Keeps the last bytes, which may be the start of `end`.
            let n = available.len() - (end.len() - 1);
            if let Some(sink) = sink.as_mut() {
                sink.push(&available[..n]);
            }
            self.consume_bytes(n);
        }
    }

    /// After the root element: the position of anything but whitespace and comments.
    fn content_after_root(&mut self) -> io::Result<Option<Position>> {
        loop {
            let available = self.peek(4)?;
            if available.is_empty() {
                return Ok(None);
            }
            if let Some(i) = available.iter().position(|b| !b.is_ascii_whitespace()) {
                self.consume_bytes(i);
                let at = self.position();
                if self.peek(4)?.starts_with(b"<!--") {
                    self.consume_bytes(4);
                    if self.skip_until(b"-->", None).is_err() {
                        return Ok(Some(at));
                    }
                    continue;
                }
                return Ok(Some(at));
            }
            let n = available.len();
            self.consume_bytes(n);
        }
    }
}

/// A comment or CDATA section that did not end.
enum Unclosed {
    Io(io::Error),
    Eof,
}

impl Unclosed {
    fn at(self, at: Position, what: &'static str) -> JunitError {
        match self {
            Unclosed::Io(err) => JunitError::Io(err),
            Unclosed::Eof => JunitError::Unclosed { at, what },
        }
    }
}

/// `lt`, `#233`, `#x20AC` → the character; `None` for anything else. Character references to
/// what XML does not allow (NUL, surrogates) are U+FFFD.
fn decode_entity(name: &[u8]) -> Option<char> {
    match name {
        b"lt" => Some('<'),
        b"gt" => Some('>'),
        b"amp" => Some('&'),
        b"quot" => Some('"'),
        b"apos" => Some('\''),
        [b'#', b'x' | b'X', hex @ ..] => char_ref(hex, 16),
        [b'#', digits @ ..] => char_ref(digits, 10),
        _ => None,
    }
}

fn char_ref(digits: &[u8], radix: u32) -> Option<char> {
    if digits.is_empty() {
        return None;
    }
    let digits = std::str::from_utf8(digits).ok()?;
    let code = u32::from_str_radix(digits, radix).ok()?;
    Some(
        char::from_u32(code)
            .filter(|c| *c != '\0')
            .unwrap_or(char::REPLACEMENT_CHARACTER),
    )
}

impl<R: BufRead> Read for Source<R> {
    fn read(&mut self, out: &mut [u8]) -> io::Result<usize> {
        let available = self.fill_buf()?;
        let n = available.len().min(out.len());
        out[..n].copy_from_slice(&available[..n]);
        self.consume(n);
        Ok(n)
    }
}

impl<R: BufRead> BufRead for Source<R> {
    /// What quick-xml reads markup from; it stops with an error once the markup budget is
    /// spent, before quick-xml's buffer outgrows it.
    fn fill_buf(&mut self) -> io::Result<&[u8]> {
        if self.start == self.end {
            self.peek(1)?;
        }
        let available = self.end - self.start;
        let allowed = match self.markup_budget {
            Some(0) if available > 0 => {
                self.over_limit = true;
                return Err(io::Error::other("markup longer than the limit"));
            }
            Some(budget) => available.min(budget),
            None => available,
        };
        Ok(&self.buf[self.start..self.start + allowed])
    }

    fn consume(&mut self, n: usize) {
        if let Some(budget) = &mut self.markup_budget {
            *budget = budget.saturating_sub(n);
        }
        self.consume_bytes(n);
    }
}
