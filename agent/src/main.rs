//! `testbot-agent`: runs an agent from a configuration file.

use std::path::PathBuf;

use clap::{Parser, Subcommand};
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
}

#[tokio::main]
async fn main() -> std::process::ExitCode {
    testbot_proto::init_tracing("info");
    match try_main(Opts::parse()).await {
        Ok(()) => std::process::ExitCode::SUCCESS,
        Err(err) => {
            eprintln!("testbot-agent: error: {err:#}");
            std::process::ExitCode::FAILURE
        }
    }
}

async fn try_main(opts: Opts) -> anyhow::Result<()> {
    let Opts { command } = opts;
    match command {
        Command::Run { config } => {
            let config = AgentConfig::load(&config)?;
            let shutdown = Shutdown::from_signals()?;
            Agent::new(config)?.run(shutdown).await
        }
        Command::CheckConfig { file } => {
            AgentConfig::load(&file)?;
            println!("{}: ok", file.display());
            Ok(())
        }
    }
}
