//! The operator token lives in `admin.token`: replacing or deleting that file and restarting
//! the broker rotates it, and the old token stops working.

use testbot_broker::{Broker, BrokerConfig};
use testbot_e2e::refusal;
use testbot_proto::client::BrokerClient;

async fn start(data_dir: &std::path::Path) -> Broker {
    Broker::start(BrokerConfig::new(
        "127.0.0.1:0".parse().unwrap(),
        data_dir.to_path_buf(),
    ))
    .await
    .expect("broker starts")
}

#[tokio::test(flavor = "multi_thread")]
async fn replacing_admin_token_retires_the_old_one() {
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("broker");
    let broker = start(&data).await;
    let leaked = broker.admin_token.clone();
    BrokerClient::new(&broker.url(), leaked.clone())
        .unwrap()
        .sites()
        .await
        .expect("the first token works");
    broker.shutdown().await.unwrap();

    // The operator rotates the token: a new one in the file, then a restart.
    let replacement = "tbo_0123456789abcdef0123456789abcdef0123456789abcdef0123456789abcdef";
    std::fs::write(data.join("admin.token"), format!("{replacement}\n")).unwrap();
    let broker = start(&data).await;
    let (status, message) = refusal(
        BrokerClient::new(&broker.url(), leaked.clone())
            .unwrap()
            .sites()
            .await,
    );
    assert_eq!(
        (status, message.as_str()),
        (401, "the bearer token is not valid")
    );
    BrokerClient::new(&broker.url(), replacement.to_string().into())
        .unwrap()
        .sites()
        .await
        .expect("the new token works");
    broker.shutdown().await.unwrap();

    // Deleting the file makes the broker write a new token; the replaced one is retired too.
    std::fs::remove_file(data.join("admin.token")).unwrap();
    let broker = start(&data).await;
    let (status, _) = refusal(
        BrokerClient::new(&broker.url(), replacement.to_string().into())
            .unwrap()
            .sites()
            .await,
    );
    assert_eq!(status, 401);
    BrokerClient::new(&broker.url(), broker.admin_token.clone())
        .unwrap()
        .sites()
        .await
        .expect("the newly written token works");
    broker.shutdown().await.unwrap();
}
