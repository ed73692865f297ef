//! JUnit XML result files: a job uploads them, the broker reads them.
#![no_main]

use libfuzzer_sys::fuzz_target;
use testbot_proto::junit::{JunitLimits, Totals, parse_junit};

fuzz_target!(|bytes: &[u8]| {
    // Small limits, so inputs of a few KiB reach every one of them.
    let limits = JunitLimits {
        max_cases: 8,
        max_attempts: 12,
        max_suites: 4,
        max_text_bytes: 64,
        max_total_text_bytes: 256,
        max_attribute_bytes: 16,
        max_markup_bytes: 1024,
        max_depth: 8,
        max_properties: 2,
        max_warnings: 4,
    };
    let report = match parse_junit(bytes, &limits) {
        Ok(report) => report,
        Err(err) => {
            assert!(!err.to_string().is_empty());
            return;
        }
    };
    assert!(report.cases.len() <= limits.max_cases);
    assert!(report.suites.len() <= limits.max_suites);
    assert!(report.warnings.len() <= limits.max_warnings + 1);
    assert_eq!(report.totals, Totals::of(&report.cases));
    let attempts: usize = report.cases.iter().map(|c| c.attempts.len()).sum();
    assert!(attempts <= limits.max_attempts);
    let mut kept = 0;
    for suite in &report.suites {
        assert!(suite.properties.len() <= limits.max_properties);
        for excerpt in [&suite.system_out, &suite.system_err].into_iter().flatten() {
            assert!(excerpt.text.len() <= limits.max_text_bytes);
            kept += excerpt.text.len();
        }
    }
    for case in &report.cases {
        assert!(!case.attempts.is_empty(), "a case without attempts");
        for field in [Some(&case.name), case.classname.as_ref(), case.file.as_ref()] {
            assert!(field.is_none_or(|f| f.len() <= limits.max_attribute_bytes));
        }
        for attempt in &case.attempts {
            assert!(attempt.duration_secs.is_none_or(|d| d.is_finite() && d >= 0.0));
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
                kept += excerpt.text.len();
            }
        }
    }
    assert!(kept <= limits.max_total_text_bytes, "{kept} bytes of text kept");
    // What the broker stores, it can read back.
    let json = serde_json::to_string(&report).unwrap();
    let back: testbot_proto::junit::TestReport = serde_json::from_str(&json).unwrap();
    assert_eq!(back.cases.len(), report.cases.len());
});
