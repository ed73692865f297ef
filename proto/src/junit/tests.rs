use std::io::{BufReader, Read};

use super::*;

const FIXTURES: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/../tests/fixtures/junit");

fn fixture(name: &str) -> Vec<u8> {
    std::fs::read(format!("{FIXTURES}/{name}")).unwrap()
}

fn parse(bytes: &[u8]) -> TestReport {
    parse_junit(bytes, &JunitLimits::default()).unwrap()
}

fn parse_with(bytes: &[u8], limits: &JunitLimits) -> TestReport {
    parse_junit(bytes, limits).unwrap()
}

fn error(bytes: &[u8]) -> String {
    parse_junit(bytes, &JunitLimits::default())
        .unwrap_err()
        .to_string()
}

fn case<'r>(report: &'r TestReport, name: &str) -> &'r TestCase {
    report
        .cases
        .iter()
        .find(|case| case.name == name)
        .unwrap_or_else(|| panic!("no case {name:?}"))
}

fn outcomes(case: &TestCase) -> Vec<TestOutcome> {
    case.attempts
        .iter()
        .map(|attempt| attempt.outcome)
        .collect()
}

fn text(excerpt: &Option<Excerpt>) -> &str {
    excerpt.as_ref().map_or("", |excerpt| excerpt.text.as_str())
}

use TestOutcome::{Error as E, Failed as F, Passed as P, Skipped as S};

/// Every fixture that reads, with its totals: cases, attempts, passed, failed, errors, skipped,
/// flaky; and how many warnings it gives.
const EXPECTED: &[(&str, [usize; 7], usize)] = &[
    ("pytest-rerunfailures.xml", [9, 10, 3, 3, 1, 2, 0], 0),
    ("ctest.xml", [6, 6, 2, 2, 0, 2, 0], 0),
    ("nextest-retries.xml", [3, 6, 2, 1, 0, 0, 1], 0),
    ("gotestsum.xml", [8, 8, 2, 5, 0, 1, 0], 0),
    ("gotestsum-rerun.xml", [7, 14, 3, 3, 0, 1, 1], 0),
    ("jest-junit.xml", [7, 8, 4, 2, 0, 1, 0], 0),
    ("surefire-reruns.xml", [5, 10, 2, 1, 1, 1, 1], 0),
    ("nested-suites.xml", [6, 6, 4, 0, 1, 1, 0], 0),
    ("entities-cdata-bom.xml", [1, 1, 0, 1, 0, 0, 0], 2),
    ("garbage-after-root.xml", [1, 1, 1, 0, 0, 0, 0], 1),
];

/// Fixtures that are refused, with the error.
const REFUSED: &[(&str, &str)] = &[(
    "latin1.xml",
    "1:1: the file is encoded as ISO-8859-1; only UTF-8 is read (ask the test runner for UTF-8)",
)];

#[test]
fn every_fixture_reads_with_the_expected_totals() {
    for (name, [cases, attempts, passed, failed, errors, skipped, flaky], warnings) in EXPECTED {
        let report = parse(&fixture(name));
        let want = Totals {
            cases: *cases,
            attempts: *attempts,
            passed: *passed,
            failed: *failed,
            errors: *errors,
            skipped: *skipped,
            flaky: *flaky,
        };
        assert_eq!(report.totals, want, "{name}");
        assert_eq!(report.totals, Totals::of(&report.cases), "{name}");
        assert!(!report.truncated, "{name}");
        assert_eq!(
            report.warnings.len(),
            *warnings,
            "{name}: {:?}",
            report.warnings
        );
    }
    for (name, message) in REFUSED {
        assert_eq!(error(&fixture(name)), *message, "{name}");
    }
    // A fixture added to the folder is added to the tables too.
    for entry in std::fs::read_dir(FIXTURES).unwrap() {
        let name = entry.unwrap().file_name().into_string().unwrap();
        if name.ends_with(".xml") {
            let listed = EXPECTED.iter().any(|(n, ..)| *n == name)
                || REFUSED.iter().any(|(n, _)| *n == name);
            assert!(listed, "{name} is in neither EXPECTED nor REFUSED");
        }
    }
}

#[test]
fn surefire_reruns_and_flakes_are_attempts_in_the_order_they_ran() {
    let report = parse(&fixture("surefire-reruns.xml"));
    assert_eq!(report.suites[0].name, "com.example.CalculatorTest");
    // Surefire writes thousands separators.
    assert_eq!(report.suites[0].duration_secs, Some(1234.567));
    assert_eq!(report.suites[0].properties.len(), 2);

    let flaky = case(&report, "flakyDivides");
    assert_eq!(outcomes(flaky), [F, E, P]);
    assert!(flaky.is_flaky());
    assert_eq!(flaky.final_outcome(), P);
    assert_eq!(
        text(&flaky.attempts[0].message),
        "expected: <2> but was: <3>"
    );
    assert_eq!(
        flaky.attempts[0].kind.as_deref(),
        Some("org.opentest4j.AssertionFailedError")
    );
    assert!(text(&flaky.attempts[0].details).starts_with("org.opentest4j.AssertionFailedError"));
    assert_eq!(text(&flaky.attempts[0].system_out), "attempt 1\n");
    assert_eq!(text(&flaky.attempts[2].system_out), "attempt 3\n");
    assert_eq!(flaky.attempts[2].duration_secs, Some(0.011));

    let fails = case(&report, "alwaysFails");
    assert_eq!(outcomes(fails), [F, F, F]);
    assert!(!fails.is_flaky());
    assert_eq!(text(&fails.attempts[2].message), "boom again");
    assert_eq!(text(&fails.attempts[2].system_err), "third attempt\n");
    assert_eq!(outcomes(case(&report, "alwaysErrors")), [E, E]);
    assert_eq!(outcomes(case(&report, "ignored")), [S]);
}

#[test]
fn nextest_retries_keep_each_attempts_output() {
    let report = parse(&fixture("nextest-retries.xml"));
    assert_eq!(report.name.as_deref(), Some("nextest-run"));
    let flaky = case(&report, "tests::flaky");
    assert_eq!(outcomes(flaky), [F, P]);
    assert!(flaky.is_flaky());
    assert_eq!(flaky.attempts[0].duration_secs, Some(0.085));
    assert!(text(&flaky.attempts[0].details).contains("first try fails"));
    assert!(text(&flaky.attempts[0].system_out).contains("test tests::flaky ... FAILED"));
    assert!(text(&flaky.attempts[1].system_out).contains("test tests::flaky ... ok"));
    assert_eq!(
        flaky.attempts[0].timestamp.as_deref(),
        Some("2026-12-01T16:08:21.503+00:00")
    );

    let fails = case(&report, "tests::fails");
    assert_eq!(outcomes(fails), [F, F, F]);
    // The first attempt is the `<failure>`, the later ones the `<rerunFailure>`s.
    assert!(text(&fails.attempts[0].message).contains("(23626)"));
    assert!(text(&fails.attempts[2].message).contains("(23635)"));
    assert!(text(&fails.attempts[1].system_err).contains("about to fail <&>"));
}

#[test]
fn repeated_testcase_elements_are_attempts_of_one_case() {
    let report = parse(&fixture("gotestsum-rerun.xml"));
    assert_eq!(outcomes(case(&report, "TestFails")), [F, F, F]);
    // gotestsum's reruns come later in the file, not next to the first run.
    let flaky = case(&report, "TestFlaky");
    assert_eq!(outcomes(flaky), [F, P]);
    assert!(flaky.is_flaky());
    assert_eq!(report.totals.flaky, 1);
    assert_eq!(
        report.suites[0].properties,
        [Property {
            name: "go.version".into(),
            value: "go1.19.8 linux/amd64".into()
        }]
    );

    // pytest-rerunfailures writes the rerun as a bare `<testcase>`: nothing says it failed.
    let report = parse(&fixture("pytest-rerunfailures.xml"));
    assert_eq!(outcomes(case(&report, "test_flaky")), [P, P]);
    assert_eq!(outcomes(case(&report, "test_setup_error")), [E]);
    assert_eq!(outcomes(case(&report, "test_xfail")), [S]);
    let fails = case(&report, "test_fails");
    assert_eq!(
        text(&fails.attempts[0].message),
        "AssertionError: math is broken\nassert (1 + 1) == 3"
    );
    assert!(text(&fails.attempts[0].details).contains("about to fail <&>"));
    assert_eq!(report.suites[0].name, "sample");
    assert_eq!(report.name.as_deref(), Some("pytest tests"));

    // Same name in another suite: another case.
    let xml = br#"<testsuites>
        <testsuite name="a"><testcase name="t"/></testsuite>
        <testsuite name="b"><testcase name="t"><failure/></testcase></testsuite>
        <testsuite name="a"><testcase name="t"><failure/></testcase></testsuite>
    </testsuites>"#;
    let report = parse(xml);
    assert_eq!(report.cases.len(), 2);
    assert_eq!(outcomes(&report.cases[0]), [P, F]);
    assert_eq!(outcomes(&report.cases[1]), [F]);
}

#[test]
fn ctest_tests_that_did_not_run_are_skipped() {
    let report = parse(&fixture("ctest.xml"));
    // A bare `<testsuite>` root, with a timestamp without a zone.
    assert_eq!(report.name, None);
    assert_eq!(report.suites.len(), 1);
    assert_eq!(
        report.suites[0].timestamp.as_deref(),
        Some("2026-12-01T16:08:00")
    );
    assert_eq!(outcomes(case(&report, "disabled")), [S]);
    let skipped = case(&report, "skipped");
    assert_eq!(outcomes(skipped), [S]);
    assert_eq!(text(&skipped.attempts[0].message), "SKIP_RETURN_CODE=77");
    let fails = case(&report, "fails");
    assert_eq!(outcomes(fails), [F]);
    // `message=""` is no message.
    assert_eq!(fails.attempts[0].message, None);
    assert_eq!(
        text(&fails.attempts[0].system_out),
        "expected 3, got <2> & more\n"
    );
}

#[test]
fn jest_junit_files_and_suite_errors_are_read() {
    let report = parse(&fixture("jest-junit.xml"));
    let adds = case(&report, "math adds");
    assert_eq!(adds.file.as_deref(), Some("__tests__/sample.test.js"));
    assert_eq!(outcomes(case(&report, "math skipped")), [S]);
    // A suite that failed to load: an `<error>` and then a `<failure>` for the same name.
    assert_eq!(outcomes(case(&report, "__tests__/broken.test.js")), [E, F]);
    assert_eq!(case(&report, "__tests__/broken.test.js").final_outcome(), F);
}

#[test]
fn nested_suites_join_their_names() {
    let report = parse(&fixture("nested-suites.xml"));
    assert_eq!(report.name, None);
    let suites: Vec<&str> = report.suites.iter().map(|s| s.name.as_str()).collect();
    assert_eq!(
        suites,
        [
            "integration > db > postgres",
            "integration > db",
            "integration",
            ""
        ]
    );
    let connects = case(&report, "connects");
    assert_eq!(connects.suite, "integration > db > postgres");
    assert_eq!(connects.file.as_deref(), Some("tests/db.py"));
    assert_eq!(connects.line, Some(12));
    // No `time`: no duration.
    assert_eq!(connects.attempts[0].duration_secs, None);
    let migrates = case(&report, "migrates");
    assert_eq!(outcomes(migrates), [E]);
    assert_eq!(migrates.attempts[0].kind.as_deref(), Some("Timeout"));
    assert_eq!(case(&report, "pool").suite, "integration > db");
    assert_eq!(outcomes(case(&report, "disabled-one")), [S]);
    assert_eq!(case(&report, "in an unnamed suite").suite, "");
    assert_eq!(case(&report, "outside any suite").suite, "");
    let integration = &report.suites[2];
    assert_eq!(integration.properties[1].value, "postgres 17");
    assert_eq!(integration.hostname.as_deref(), Some("runner-1"));
    assert_eq!(text(&integration.system_out), "suite-level output");
}

#[test]
fn entities_cdata_comments_and_a_bom_are_read() {
    let report = parse(&fixture("entities-cdata-bom.xml"));
    assert_eq!(report.name.as_deref(), Some("entities & CDATA"));
    let case = &report.cases[0];
    assert_eq!(case.name, "quotes \"double\" 'single' é€");
    assert_eq!(case.classname.as_deref(), Some("a<b>"));
    let attempt = &case.attempts[0];
    assert_eq!(text(&attempt.message), "x < y");
    assert_eq!(text(&attempt.details), "line 1 & <raw> & ]] afterend");
    assert_eq!(text(&attempt.system_out), "firstsecond");
    assert_eq!(
        text(&attempt.system_err),
        "an unknown &nbsp; entity and a bare & ampersand"
    );
    assert_eq!(
        report.warnings,
        [
            "entities that are not XML's own (the first: &nbsp;) are kept as written",
            "text has a bare & (not an entity); kept as written",
        ]
    );
}

#[test]
fn content_after_the_root_is_a_warning() {
    let report = parse(&fixture("garbage-after-root.xml"));
    assert_eq!(report.cases.len(), 1);
    assert_eq!(
        report.warnings,
        ["5:1: the file goes on after its root element; the rest is not read"]
    );
    // Whitespace and comments after the root are not content.
    let report = parse(b"<testsuite/>\n  <!-- done -->\n\n");
    assert!(report.warnings.is_empty(), "{:?}", report.warnings);
    let report = parse(b"<testsuite/>\n<!-- never closed");
    assert_eq!(report.warnings.len(), 1);
}

#[test]
fn encodings_other_than_utf8_are_refused() {
    let utf16 = "<testsuite/>"
        .encode_utf16()
        .flat_map(|unit| unit.to_le_bytes())
        .collect::<Vec<u8>>();
    let with_bom = [&[0xFF, 0xFE][..], &utf16].concat();
    assert_eq!(
        error(&with_bom),
        "1:1: the file is encoded as UTF-16; only UTF-8 is read (ask the test runner for UTF-8)"
    );
    assert!(error(&utf16).contains("UTF-16 (without a byte order mark)"));
    // ASCII is UTF-8; the label's case does not matter.
    let report = parse(b"<?xml version='1.0' encoding='us-ascii'?><testsuite/>");
    assert!(report.cases.is_empty());
    parse(b"<?xml version='1.0' encoding='UTF8'?><testsuite/>");
    // Bytes that are not UTF-8 in text become U+FFFD, with a warning.
    let report = parse(
        b"<testsuite><testcase name='a'><system-out>caf\xe9</system-out></testcase></testsuite>",
    );
    assert_eq!(text(&report.cases[0].attempts[0].system_out), "caf\u{FFFD}");
    assert_eq!(
        report.warnings,
        ["text that is not UTF-8 was replaced with U+FFFD"]
    );
}

#[test]
fn errors_name_the_problem_and_where() {
    let cases: &[(&[u8], &str)] = &[
        (
            b"<testsuite>\n  <testcase name=\"a\">\n    <system-out>partial",
            "3:24: unexpected end of file inside <system-out> (opened at 3:5)",
        ),
        (
            b"<testsuite>\n  <testcase name=\"a\">\n",
            "3:1: unexpected end of file inside <testcase> (opened at 2:3)",
        ),
        (b"", "the file has no XML element (it is empty, or not XML)"),
        (
            b"  \n<!-- nothing -->\n",
            "the file has no XML element (it is empty, or not XML)",
        ),
        (
            b"<html><body/></html>",
            "1:1: the root element is <html>; a JUnit file has <testsuites> or <testsuite>",
        ),
        (
            b"<testsuite>\n<testcase></testsuite>",
            "2:11: not well-formed XML: ill-formed document: expected `</testcase>`, but `</testsuite>` was found",
        ),
        (
            b"<testsuite><![CDATA[never closed",
            "1:12: unexpected end of file inside a CDATA section",
        ),
        (
            b"<testsuite><!-- never closed",
            "1:12: unexpected end of file inside a comment",
        ),
        (
            b"<testsuite>\n  <testcase name=\"open",
            "2:3: not well-formed XML: syntax error: attribute value not closed: `\"` not found before end of input",
        ),
        (
            b"not xml at all",
            "the file has no XML element (it is empty, or not XML)",
        ),
    ];
    for (input, want) in cases {
        assert_eq!(error(input), *want, "{:?}", String::from_utf8_lossy(input));
    }
}

#[test]
fn past_max_cases_the_report_is_truncated_not_failed() {
    let limits = JunitLimits {
        max_cases: 3,
        ..JunitLimits::default()
    };
    let mut xml = String::from("<testsuite>");
    for i in 0..10 {
        xml.push_str(&format!("<testcase name='t{i}'/>"));
    }
    // Never closed: the parser stops before it would notice.
    let report = parse_with(xml.as_bytes(), &limits);
    assert!(report.truncated);
    assert_eq!(report.cases.len(), 3);
    assert_eq!(
        report.warnings,
        ["1:75: more than 3 test cases; the rest of the file is not read"]
    );
}

#[test]
fn past_max_attempts_the_report_is_truncated() {
    let limits = JunitLimits {
        max_attempts: 4,
        ..JunitLimits::default()
    };
    let flaky = format!(
        "<testsuite><testcase name='a'>{}</testcase></testsuite>",
        "<flakyFailure/>".repeat(1000)
    );
    let report = parse_with(flaky.as_bytes(), &limits);
    assert!(report.truncated);
    assert!(report.cases.is_empty());

    let repeated = format!(
        "<testsuite>{}</testsuite>",
        "<testcase name='a'><failure/></testcase>".repeat(10)
    );
    let report = parse_with(repeated.as_bytes(), &limits);
    assert!(report.truncated);
    assert_eq!(report.cases[0].attempts.len(), 4);
}

#[test]
fn past_max_suites_the_report_is_truncated() {
    let limits = JunitLimits {
        max_suites: 2,
        ..JunitLimits::default()
    };
    let xml = format!("<testsuites>{}</testsuites>", "<testsuite/>".repeat(5));
    let report = parse_with(xml.as_bytes(), &limits);
    assert!(report.truncated);
    assert_eq!(report.suites.len(), 2);
}

#[test]
fn texts_keep_a_prefix_and_count_the_rest() {
    let limits = JunitLimits {
        max_text_bytes: 8,
        max_attribute_bytes: 4,
        ..JunitLimits::default()
    };
    // "é" is two bytes: the cut at 8 would split the second one.
    let xml = "<testsuite><testcase name='abcdefgh' classname='ééé'>\
        <failure message='0123456789'>abcdefgh</failure>\
        <system-out>aaaaaaaé€</system-out>\
        <system-err><![CDATA[0123]]>&amp;&lt;<![CDATA[456789]]></system-err>\
        </testcase></testsuite>";
    let report = parse_with(xml.as_bytes(), &limits);
    let case = &report.cases[0];
    assert_eq!(case.name, "abcd");
    assert_eq!(case.classname.as_deref(), Some("éé"));
    let attempt = &case.attempts[0];
    let excerpt = |e: &Option<Excerpt>| {
        let e = e.as_ref().unwrap();
        (e.text.clone(), e.omitted_bytes)
    };
    assert_eq!(excerpt(&attempt.message), ("01234567".into(), 2));
    assert_eq!(excerpt(&attempt.details), ("abcdefgh".into(), 0));
    assert_eq!(excerpt(&attempt.system_out), ("aaaaaaa".into(), 5));
    assert_eq!(excerpt(&attempt.system_err), ("0123&<45".into(), 4));
    assert!(attempt.system_err.as_ref().unwrap().is_cut());
    assert!(!report.truncated);
    assert!(
        report
            .warnings
            .iter()
            .any(|w| w.starts_with("3 texts were longer than the limit")),
        "{:?}",
        report.warnings
    );
}

#[test]
fn the_total_text_budget_is_shared_by_all_cases() {
    let limits = JunitLimits {
        max_text_bytes: 100,
        max_total_text_bytes: 25,
        ..JunitLimits::default()
    };
    let xml = format!(
        "<testsuite>{}</testsuite>",
        "<testcase name='a'><system-out>0123456789</system-out></testcase>".repeat(4)
    );
    let report = parse_with(xml.as_bytes(), &limits);
    let kept: Vec<(usize, u64)> = report.cases[0]
        .attempts
        .iter()
        .map(|a| {
            let out = a.system_out.as_ref().unwrap();
            (out.text.len(), out.omitted_bytes)
        })
        .collect();
    assert_eq!(kept, [(10, 0), (10, 0), (5, 5), (0, 10)]);
}

#[test]
fn nesting_deeper_than_max_depth_is_an_error() {
    let limits = JunitLimits {
        max_depth: 5,
        ..JunitLimits::default()
    };
    let long_name = format!("<testsuite><{}>", "x".repeat(2000));
    let err = parse_junit(long_name.as_bytes(), &limits).unwrap_err();
    assert_eq!(
        err.to_string(),
        "1:12: an element name longer than 1024 bytes"
    );
    let xml = format!("<testsuite>{}", "<x>".repeat(10));
    let err = parse_junit(xml.as_bytes(), &limits).unwrap_err();
    assert_eq!(err.to_string(), "1:24: elements nest deeper than 5 levels");
    let xml = format!(
        "<testsuite>{}{}</testsuite>",
        "<x>".repeat(4),
        "</x>".repeat(4)
    );
    parse_with(xml.as_bytes(), &limits);
}

#[test]
fn warnings_and_properties_are_capped() {
    let limits = JunitLimits {
        max_warnings: 2,
        max_properties: 3,
        ..JunitLimits::default()
    };
    let xml = format!(
        "<testsuite><properties>{}</properties>{}</testsuite>",
        "<property name='k' value='v'/>".repeat(10),
        "<testcase/>".repeat(5)
    );
    let report = parse_with(xml.as_bytes(), &limits);
    assert_eq!(report.suites[0].properties.len(), 3);
    assert_eq!(report.warnings.len(), 3);
    assert_eq!(report.warnings[2], "4 more warnings are not shown");
}

#[test]
fn odd_but_readable_values_are_warnings() {
    let xml = b"<testsuite time='soon'><testcase name='a' time='-1' line='x'/>\
        <testcase name='b' message='&nbsp;'><failure message='&nbsp;'/></testcase>\
        <testcase name='c' time='0.5s'/></testsuite>";
    let report = parse(xml);
    assert_eq!(case(&report, "a").attempts[0].duration_secs, None);
    assert_eq!(case(&report, "a").line, None);
    assert_eq!(case(&report, "c").attempts[0].duration_secs, Some(0.5));
    assert_eq!(text(&case(&report, "b").attempts[0].message), "&nbsp;");
    assert_eq!(
        report.warnings,
        [
            "1:1: time=\"soon\" is not a number of seconds",
            "1:24: time=\"-1\" is not a number of seconds",
            "1:99: attribute message=\"&nbsp;\" has an entity that is not XML's own; kept as written",
        ]
    );
}

#[test]
fn several_outcome_elements_in_one_testcase_are_one_attempt() {
    // googletest writes a `<failure>` per failed assertion.
    let xml = b"<testsuite><testcase name='a'>\
        <failure message='first' type='A'>one</failure>\
        <failure message='second' type='B'>two</failure>\
        <error message='third'>three</error>\
        </testcase></testsuite>";
    let report = parse(xml);
    let attempt = &report.cases[0].attempts[0];
    assert_eq!(report.cases[0].attempts.len(), 1);
    assert_eq!(attempt.outcome, E);
    assert_eq!(text(&attempt.message), "first");
    assert_eq!(attempt.kind.as_deref(), Some("A"));
    assert_eq!(text(&attempt.details), "one\ntwo\nthree");
}

#[test]
fn reading_in_one_byte_pieces_gives_the_same_report() {
    for (name, ..) in EXPECTED {
        let bytes = fixture(name);
        let whole = parse(&bytes);
        let pieces = parse_junit(
            BufReader::with_capacity(1, &bytes[..]),
            &JunitLimits::default(),
        )
        .unwrap();
        assert_eq!(pieces, whole, "{name}");
    }
}

#[test]
fn a_report_round_trips_through_json() {
    for (name, ..) in EXPECTED {
        let report = parse(&fixture(name));
        let json = serde_json::to_string(&report).unwrap();
        let back: TestReport = serde_json::from_str(&json).unwrap();
        assert_eq!(back, report, "{name}");
    }
    let report = parse(&fixture("nextest-retries.xml"));
    let json = serde_json::to_value(&report.cases[0].attempts[1]).unwrap();
    assert_eq!(json["outcome"], "passed");
    assert_eq!(json["duration_secs"], 0.005);
}

/// Every prefix of every fixture (a file cut short while it was written, or uploaded in part)
/// reads or fails cleanly, within the limits.
#[test]
fn no_prefix_of_any_fixture_panics() {
    let limits = JunitLimits {
        max_cases: 4,
        max_attempts: 6,
        max_text_bytes: 32,
        max_attribute_bytes: 16,
        ..JunitLimits::default()
    };
    let names = EXPECTED
        .iter()
        .map(|(name, ..)| *name)
        .chain(REFUSED.iter().map(|(name, _)| *name));
    for name in names {
        let bytes = fixture(name);
        for len in 0..=bytes.len() {
            if let Ok(report) = parse_junit(&bytes[..len], &limits) {
                check_invariants(&report, &limits);
            }
        }
    }
}

/// What every report promises, whatever its input.
fn check_invariants(report: &TestReport, limits: &JunitLimits) {
    assert!(report.cases.len() <= limits.max_cases);
    assert!(report.suites.len() <= limits.max_suites);
    assert!(report.warnings.len() <= limits.max_warnings + 1);
    assert_eq!(report.totals, Totals::of(&report.cases));
    let attempts: usize = report.cases.iter().map(|c| c.attempts.len()).sum();
    assert!(attempts <= limits.max_attempts);
    for case in &report.cases {
        assert!(!case.attempts.is_empty());
        assert!(case.name.len() <= limits.max_attribute_bytes);
        for attempt in &case.attempts {
            for excerpt in [
                &attempt.message,
                &attempt.details,
                &attempt.system_out,
                &attempt.system_err,
            ]
            .into_iter()
            .flatten()
            {
                assert!(excerpt.text.len() <= limits.max_text_bytes);
            }
        }
    }
}

/// quick-xml on its own returns a text node as one event, in one buffer: the reason
/// [`Source::scan_text`] reads text instead.
#[test]
fn quick_xml_alone_holds_a_whole_text_node_in_its_buffer() {
    let text_len = 8 * 1024 * 1024;
    let input = generated("<system-out>", b"output\n", text_len, "</system-out>");
    let (longest, peak) = alloc_count::peak_during(|| {
        let mut reader = quick_xml::Reader::from_reader(BufReader::new(input));
        let mut buf = Vec::new();
        let mut longest = 0;
        loop {
            match reader.read_event_into(&mut buf).unwrap() {
                Event::Eof => break,
                Event::Text(text) => longest = longest.max(text.len()),
                _ => {}
            }
            buf.clear();
        }
        longest
    });
    assert_eq!(longest, text_len as usize);
    // Also shows that the counting allocator sees the buffer.
    assert!(peak >= text_len as usize, "peak {peak} bytes");
}

/// A 200 MB `<system-out>`, made as it is read (never in memory as a whole), is read with a
/// few hundred KiB of memory: the allocator of this test binary counts what each thread has
/// allocated, and the parse's peak is measured on its own thread.
#[test]
fn a_200_mb_system_out_is_read_in_bounded_memory() {
    let copies: u64 = 4_800_000;
    let text_len = 44 * copies;
    let input = generated(
        "<testsuite><testcase name='chatty'><system-out>",
        b"line of output &amp; more <![CDATA[<raw>]]>\n",
        text_len,
        "</system-out></testcase><testcase name='after'/></testsuite>",
    );
    let limits = JunitLimits::default();
    let (report, peak) =
        alloc_count::peak_during(|| parse_junit(BufReader::new(input), &limits).unwrap());
    assert_eq!(report.cases.len(), 2);
    let out = report.cases[0].attempts[0].system_out.as_ref().unwrap();
    assert_eq!(out.text.len(), limits.max_text_bytes);
    assert!(out.text.starts_with("line of output & more <raw>\n"));
    // `&amp;` is one byte of text, CDATA's markup none: 44 bytes written, 28 of text.
    let decoded = copies * 28;
    assert_eq!(out.text.len() as u64 + out.omitted_bytes, decoded);
    assert!(peak < 1024 * 1024, "peak {peak} bytes");
}

/// An attribute without end is refused once it passes the markup limit, before quick-xml's
/// buffer grows past it.
#[test]
fn an_endless_attribute_is_an_error_not_an_allocation() {
    let input = generated("<testsuite name='", b"x", 100 * 1024 * 1024, "'/>");
    let limits = JunitLimits {
        max_markup_bytes: 1024 * 1024,
        ..JunitLimits::default()
    };
    let (result, peak) = alloc_count::peak_during(|| parse_junit(BufReader::new(input), &limits));
    assert_eq!(
        result.unwrap_err().to_string(),
        "1:1: a tag longer than 1048576 bytes"
    );
    assert!(peak < 4 * 1024 * 1024, "peak {peak} bytes");
}

/// `head`, then `pattern` repeated to `body_len` bytes (the last copy cut), then `tail`: bytes
/// made as they are read.
fn generated(head: &str, pattern: &[u8], body_len: u64, tail: &str) -> impl Read {
    // Copies of the pattern in one block, so each read copies few slices.
    let block = pattern.repeat((4096 / pattern.len()).max(1));
    let mut position = 0u64;
    let head = head.as_bytes().to_vec();
    let tail = tail.as_bytes().to_vec();
    let body_end = head.len() as u64 + body_len;
    let total = body_end + tail.len() as u64;
    std::iter::from_fn(move || {
        if position >= total {
            return None;
        }
        let chunk: Vec<u8> = if position < head.len() as u64 {
            head[position as usize..].to_vec()
        } else if position < body_end {
            let in_body = position - head.len() as u64;
            let pattern_offset = (in_body % pattern.len() as u64) as usize;
            let rest = (body_end - position) as usize;
            let end = block.len().min(pattern_offset + rest);
            block[pattern_offset..end].to_vec()
        } else {
            tail[(position - body_end) as usize..].to_vec()
        };
        position += chunk.len() as u64;
        Some(chunk)
    })
    .map(io::Cursor::new)
    .fold_reader()
}

/// Chains readers made one after another.
trait FoldReader: Iterator<Item = io::Cursor<Vec<u8>>> + Sized {
    fn fold_reader(self) -> Chained<Self> {
        Chained {
            parts: self,
            current: None,
        }
    }
}

impl<I: Iterator<Item = io::Cursor<Vec<u8>>>> FoldReader for I {}

struct Chained<I> {
    parts: I,
    current: Option<io::Cursor<Vec<u8>>>,
}

impl<I: Iterator<Item = io::Cursor<Vec<u8>>>> Read for Chained<I> {
    fn read(&mut self, out: &mut [u8]) -> io::Result<usize> {
        loop {
            if let Some(current) = &mut self.current {
                let n = current.read(out)?;
                if n > 0 || out.is_empty() {
                    return Ok(n);
                }
            }
            match self.parts.next() {
                Some(next) => self.current = Some(next),
                None => return Ok(0),
            }
        }
    }
}

/// Counts the bytes each thread has allocated, to measure a parse's peak memory. The test
/// binary's allocator is the system's, wrapped; counting is per thread so tests running
/// alongside do not disturb it.
#[allow(unsafe_code)] // `GlobalAlloc` is an unsafe trait; every allocation is still `System`'s.
mod alloc_count {
    use std::alloc::{GlobalAlloc, Layout, System};
    use std::cell::Cell;

    thread_local! {
        static LIVE: Cell<isize> = const { Cell::new(0) };
        static PEAK: Cell<isize> = const { Cell::new(0) };
    }

    fn add(delta: isize) {
        let _ = LIVE.try_with(|live| {
            let now = live.get() + delta;
            live.set(now);
            let _ = PEAK.try_with(|peak| peak.set(peak.get().max(now)));
        });
    }

    struct Counting;

    unsafe impl GlobalAlloc for Counting {
        unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
            let ptr = unsafe { System.alloc(layout) };
            if !ptr.is_null() {
                add(layout.size() as isize);
            }
            ptr
        }

        unsafe fn alloc_zeroed(&self, layout: Layout) -> *mut u8 {
            let ptr = unsafe { System.alloc_zeroed(layout) };
            if !ptr.is_null() {
                add(layout.size() as isize);
            }
            ptr
        }

        unsafe fn dealloc(&self, ptr: *mut u8, layout: Layout) {
            unsafe { System.dealloc(ptr, layout) };
            add(-(layout.size() as isize));
        }

        unsafe fn realloc(&self, ptr: *mut u8, layout: Layout, new_size: usize) -> *mut u8 {
            let new = unsafe { System.realloc(ptr, layout, new_size) };
            if !new.is_null() {
                add(new_size as isize - layout.size() as isize);
            }
            new
        }
    }

    #[global_allocator]
    static COUNTING: Counting = Counting;

    /// Runs `f`, and returns what it returned and the most bytes it had allocated on this
    /// thread at any time (beyond what was allocated before it started).
    pub fn peak_during<T>(f: impl FnOnce() -> T) -> (T, usize) {
        let base = LIVE.with(Cell::get);
        PEAK.with(|peak| peak.set(base));
        let result = f();
        let peak = PEAK.with(Cell::get) - base;
        (result, peak.max(0) as usize)
    }
}

/// Found by the `junit` fuzz target: U+FFFD is three bytes, so a text of invalid bytes grew to
/// three times its limit when it was decoded.
#[test]
fn invalid_utf8_keeps_within_the_text_limits() {
    let input = fixture_regression();
    let limits = JunitLimits {
        max_text_bytes: 8,
        max_total_text_bytes: 14,
        ..JunitLimits::default()
    };
    let report = parse_with(&input, &limits);
    let outputs: Vec<(&str, u64)> = report.cases[0]
        .attempts
        .iter()
        .map(|a| {
            let out = a.system_out.as_ref().unwrap();
            (out.text.as_str(), out.omitted_bytes)
        })
        .collect();
    // The first keeps two replacements in its 8 bytes; the second gets the 6 bytes left of
    // the report's budget, room for one.
    assert_eq!(outputs, [("ab\u{FFFD}\u{FFFD}", 4), ("ab\u{FFFD}", 5)]);
    check_invariants(&report, &limits);
}

fn fixture_regression() -> Vec<u8> {
    std::fs::read(concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/../fuzz/corpus/junit/regression-invalid-utf8-growth"
    ))
    .unwrap()
}
