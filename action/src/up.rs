//! `testbot up`: a broker on SQLite and one local shell agent in one process.

use std::net::SocketAddr;
use std::path::PathBuf;

use anyhow::Context as _;
use testbot_agent::{Agent, AgentConfig, Shutdown};
use testbot_broker::{Broker, BrokerConfig};

#[derive(Debug, clap::Args)]
pub struct UpOpts {
    /// Where the broker keeps its database and token files, and the agent its job directories.
    #[arg(long, env = "TESTBOT_DATA_DIR", default_value = ".testbot")]
    data_dir: PathBuf,
    /// Address for the broker's API.
    #[arg(long, env = "TESTBOT_LISTEN", default_value = "127.0.0.1:8471")]
    listen: SocketAddr,
    /// How many jobs the local agent runs at once.
    #[arg(long, default_value_t = 2)]
    concurrency: usize,
    /// Labels the local agent offers (repeatable).
    #[arg(long = "label")]
    labels: Vec<String>,
}

pub async fn run(opts: UpOpts) -> anyhow::Result<()> {
    let UpOpts {
        data_dir,
        listen,
        concurrency,
        labels,
    } = opts;
    std::fs::create_dir_all(&data_dir)
        .with_context(|| format!("Cannot create {}", data_dir.display()))?;
    let data_dir = data_dir.canonicalize()?;
    let broker = Broker::start(BrokerConfig::new(listen, data_dir.clone())).await?;
    let url = broker.url();
    // The local agent enrolls at the first start and keeps its identity in DATA_DIR/agent.
    let enrollment = broker
        .enrollment_token("local", 1, std::time::Duration::from_secs(3600))
        .await?;
    let mut agent_config = AgentConfig::new(url.clone(), enrollment, data_dir.join("agent"));
    agent_config.concurrency = concurrency;
    agent_config.labels = labels;
    let agent = Agent::new(agent_config)?;
    let token_file = data_dir.join("admin.token");
    println!(
        "testbot is up: broker at {url} (data in {}), agent {:?} running up to {concurrency} jobs.",
        data_dir.display(),
        agent.name()
    );
    println!("Submit a job from another terminal:");
    println!(
        "  export TESTBOT_URL={url} TESTBOT_TOKEN=$(cat {})",
        token_file.display()
    );
    println!("  testbot run -- 'echo hello; exit 3'");
    println!("Ctrl-C drains (running jobs finish); a second Ctrl-C cancels them.");
    let shutdown = Shutdown::from_signals()?;
    let broker_stop = broker.shutdown_token();
    let agent_result = agent.run(shutdown).await;
    broker_stop.cancel();
    broker.wait().await?;
    agent_result
}
