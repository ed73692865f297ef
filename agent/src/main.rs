//! `testbot-agent`: runs an agent from a configuration file, and checks and explains site
//! policies.

use std::path::{Path, PathBuf};
use std::process::ExitCode;

use clap::{Parser, Subcommand};
use testbot_agent::policy::{self, SitePolicy};
use testbot_agent::{Agent, AgentConfig, Shutdown};

/// The testbot agent: polls the broker for jobs and runs them. It only dials out.
#[derive(Debug, Parser)]
#[command(version, about)]
struct Opts {
    #[command(subcommand)]
    command: Command,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Run the agent until SIGTERM (drain) or a second SIGTERM (cancel running jobs).
    Run {
        /// The agent's configuration file.
        #[arg(
            long,
            short,
            env = "TESTBOT_AGENT_CONFIG",
            default_value = "/etc/testbot/agent.toml"
        )]
        config: PathBuf,
    },
    /// Check a configuration file and exit: non-zero with `FILE:LINE:COL: message` if invalid.
    CheckConfig {
        /// The configuration file to check.
        file: PathBuf,
    },
    /// Check a site policy file, or explain its verdict on a job.
    Policy {
        #[command(subcommand)]
        command: PolicyCommand,
    },
}

#[derive(Debug, Subcommand)]
enum PolicyCommand {
    /// Check a site policy file: print a summary and exit 0, or print `FILE:LINE:COL: message`
    /// and exit 1.
    Check {
        /// The site policy file.
        file: PathBuf,
    },
    /// Say which rule allows or denies a job with the given token claims, and why. Exit status:
    /// 0 allowed, 1 denied, 2 bad input.
    Explain {
        /// The site policy file.
        file: PathBuf,
        /// The token's claims as JSON: the claims object, or `{"header": ..., "payload": {...}}`.
        #[arg(long)]
        claims: PathBuf,
        /// The job as JSON (a job spec: `executor`, `image`, `resources`, `env`, `timeout_secs`;
        /// `script` may be left out). Default: a job that asks for nothing.
        #[arg(long)]
        job: Option<PathBuf>,
        /// The agent's executor, for a job that names none. Default: the first executor the
        /// first rule allows.
        #[arg(long)]
        executor: Option<String>,
    },
}

/// `policy explain`: the job was denied.
const EXIT_DENIED: u8 = 1;
/// `policy explain`: the policy, claims or job could not be read.
const EXIT_BAD_INPUT: u8 = 2;

#[tokio::main]
async fn main() -> ExitCode {
    testbot_proto::init_tracing("info");
    match try_main(Opts::parse()).await {
        Ok(code) => code,
        Err(err) => {
            eprintln!("testbot-agent: error: {err:#}");
            ExitCode::FAILURE
        }
    }
}

async fn try_main(opts: Opts) -> anyhow::Result<ExitCode> {
    let Opts { command } = opts;
    match command {
        Command::Run { config } => {
            let config = AgentConfig::load(&config)?;
            let shutdown = Shutdown::from_signals()?;
            Agent::new(config)?.run(shutdown).await?;
            Ok(ExitCode::SUCCESS)
        }
        Command::CheckConfig { file } => {
            AgentConfig::load(&file)?;
            println!("{}: ok", file.display());
            Ok(ExitCode::SUCCESS)
        }
        Command::Policy {
            command: PolicyCommand::Check { file },
        } => Ok(policy_check(&file)),
        Command::Policy {
            command:
                PolicyCommand::Explain {
                    file,
                    claims,
                    job,
                    executor,
                },
        } => Ok(policy_explain(&file, &claims, job.as_deref(), executor)),
    }
}

/// Errors go to stderr as `FILE:LINE:COL: message`, so editors can jump to them.
fn policy_check(file: &Path) -> ExitCode {
    let policy = match SitePolicy::load(file) {
        Ok(policy) => policy,
        Err(err) => {
            eprintln!("{err:#}");
            return ExitCode::FAILURE;
        }
    };
    println!("{}: ok", file.display());
    for line in policy.describe().lines() {
        println!("  {line}");
    }
    for problem in policy.host_problems() {
        eprintln!("{}: warning: {problem}", file.display());
    }
    ExitCode::SUCCESS
}

fn policy_explain(
    file: &Path,
    claims: &Path,
    job: Option<&Path>,
    executor: Option<String>,
) -> ExitCode {
    let inputs = (|| -> anyhow::Result<_> {
        let policy = SitePolicy::load(file)?;
        let claims = read_json(claims, policy::claims_from_json)?;
        let spec = match job {
            Some(path) => read_json(path, policy::job_from_json)?,
            None => Default::default(),
        };
        Ok((policy, claims, spec))
    })();
    let (policy, claims, spec) = match inputs {
        Ok(inputs) => inputs,
        Err(err) => {
            eprintln!("{err:#}");
            return ExitCode::from(EXIT_BAD_INPUT);
        }
    };
    let oidc = policy.oidc();
    if claims.aud != oidc.audience || claims.iss != oidc.issuer {
        eprintln!(
            "warning: the token is for issuer {} and audience {}, but this site accepts issuer {} and audience {}: the agent would refuse the token before applying any rule",
            claims.iss, claims.aud, oidc.issuer, oidc.audience
        );
    }
    let executor = executor.unwrap_or_else(|| policy.first_allowed_executor().to_string());
    let explanation = policy.explain(&claims, &spec, &executor);
    println!("{explanation}");
    if explanation.decision.is_allowed() {
        ExitCode::SUCCESS
    } else {
        ExitCode::from(EXIT_DENIED)
    }
}

fn read_json<T>(path: &Path, parse: fn(&str) -> Result<T, String>) -> anyhow::Result<T> {
    let text = std::fs::read_to_string(path)
        .map_err(|e| anyhow::anyhow!("{}: cannot read it: {e}", path.display()))?;
    parse(&text).map_err(|e| anyhow::anyhow!("{}: {e}", path.display()))
}
