//! Statistical bisection, simulated: how many rounds (the wall time, when a round's runs go in
//! parallel) and runs it takes to find the commit where a flaky test started failing, and how
//! often it names the right one, for a fleet of 1, 2, 4 and 8 free agents.
//!
//! Each trial draws the culprit among `--commits` commits and runs [`plan`] to its end against
//! a test that fails with probability `--rate` from the culprit on (and never before), as the
//! broker's bisector would with real runs. Pure computation: no broker, no agents.

use clap::Parser;
use testbot_proto::bisect::{Bisection, BisectionState, NewBisection, RunOutcome, plan};
use testbot_proto::jobs::JobId;

#[derive(Parser)]
#[command(about = "Statistical bisection, simulated: rounds, runs and accuracy by fleet width")]
struct Args {
    /// Commits from the good one to the bad one.
    #[arg(long, default_value_t = 100)]
    commits: usize,
    /// The test's failure rate from the culprit on.
    #[arg(long, default_value_t = 0.2)]
    rate: f64,
    /// The confidence asked for.
    #[arg(long, default_value_t = 0.95)]
    confidence: f64,
    /// Bisections per fleet width.
    #[arg(long, default_value_t = 1000)]
    trials: usize,
}

/// SplitMix64: a few lines of a well-known generator, enough for a simulation.
struct Random(u64);

impl Random {
    fn next(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^ (z >> 31)
    }

    fn unit(&mut self) -> f64 {
        (self.next() >> 11) as f64 / (1u64 << 53) as f64
    }
}

fn bisection(args: &Args) -> Bisection {
    Bisection::start(
        NewBisection {
            repository: "o/r".into(),
            repository_id: 1,
            installation_id: 1,
            public: true,
            branch: "main".into(),
            job: "unit".into(),
            suite: "pkg".into(),
            classname: None,
            name: "wobbly".into(),
            select: None,
            confidence: args.confidence,
            rate: Some(args.rate),
            started_by: "bench".into(),
        },
        (0..args.commits).map(|i| format!("{i:040}")).collect(),
        0,
    )
}

/// One bisection to its end: (rounds, runs, named the culprit).
fn trial(args: &Args, free: usize, random: &mut Random) -> (u32, usize, bool) {
    let culprit = 1 + (random.next() as usize) % (args.commits - 1);
    let mut b = bisection(args);
    let mut next = 0;
    while b.state == BisectionState::Running {
        let step = plan(&mut b, free);
        for job in &step.cancel {
            b.set_outcome(*job, RunOutcome::NoResult);
        }
        // A commit's runs go one after another; once one fails, the bisector cancels the
        // rest (they never run).
        for (position, count) in step.submit {
            let mut failed = false;
            for _ in 0..count {
                next += 1;
                b.add_runs(position, [JobId(next)]);
                let outcome = if failed {
                    RunOutcome::NoResult
                } else if position >= culprit && random.unit() < args.rate {
                    failed = true;
                    RunOutcome::Failed
                } else {
                    RunOutcome::Passed
                };
                b.set_outcome(JobId(next), outcome);
            }
        }
    }
    let named = b.culprit.as_deref() == Some(b.commits[culprit].as_str());
    (b.rounds, b.runs_spent(), named)
}

fn median(values: &mut [f64]) -> f64 {
    values.sort_by(f64::total_cmp);
    values[values.len() / 2]
}

fn main() {
    let args = Args::parse();
    println!(
        "# testbot-bench-bisect: {} commits, failure rate {} from the culprit on, confidence {}, {} trials each\n",
        args.commits, args.rate, args.confidence, args.trials
    );
    println!(
        "| free agents | rounds (median) | runs (median) | culprit named | rounds vs 1 agent |"
    );
    println!("|--:|--:|--:|--:|--:|");
    let mut base = None;
    for free in [1, 2, 4, 8] {
        let mut random = Random(42);
        let (mut rounds, mut runs, mut right) = (Vec::new(), Vec::new(), 0);
        for _ in 0..args.trials {
            let (r, n, ok) = trial(&args, free, &mut random);
            rounds.push(f64::from(r));
            runs.push(n as f64);
            right += usize::from(ok);
        }
        let rounds = median(&mut rounds);
        let base = *base.get_or_insert(rounds);
        println!(
            "| {free} | {rounds:.0} | {:.0} | {:.1} % | {:.2} |",
            median(&mut runs),
            100.0 * right as f64 / args.trials as f64,
            rounds / base
        );
    }
}
