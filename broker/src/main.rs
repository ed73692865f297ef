//! `testbot-broker`: runs the broker until SIGTERM or Ctrl-C.

use clap::Parser;
use testbot_broker::Broker;
use testbot_broker::cli::BrokerOpts;

/// The testbot broker: job queue, leases, logs and HTTP API.
#[derive(Debug, Parser)]
#[command(version, about)]
struct Opts {
    #[command(flatten)]
    broker: BrokerOpts,
}

#[tokio::main]
async fn main() -> std::process::ExitCode {
    testbot_proto::init_tracing("info");
    match try_main(Opts::parse()).await {
        Ok(()) => std::process::ExitCode::SUCCESS,
        Err(err) => {
            eprintln!("testbot-broker: error: {err:#}");
            std::process::ExitCode::FAILURE
        }
    }
}

async fn try_main(opts: Opts) -> anyhow::Result<()> {
    let Opts { broker } = opts;
    let broker = Broker::start(broker.into_config()?).await?;
    let shutdown = broker.shutdown_token();
    tokio::spawn(async move {
        wait_for_signal().await;
        tracing::info!("Shutting down.");
        shutdown.cancel();
    });
    broker.wait().await
}

async fn wait_for_signal() {
    use tokio::signal::unix::{SignalKind, signal};
    let mut term = signal(SignalKind::terminate()).expect("cannot install SIGTERM handler");
    tokio::select! {
        _ = term.recv() => {}
        _ = tokio::signal::ctrl_c() => {}
    }
}
