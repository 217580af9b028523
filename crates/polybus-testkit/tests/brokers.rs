//! The broker fixtures start, restart and stop real brokers.

use polybus_testkit::brokers::{BrokerProcess, TansuStorage};

async fn check_restart(mut broker: BrokerProcess) -> anyhow::Result<()> {
    let port = broker.port();
    let first = broker.pid().expect("running");
    broker.restart().await?;
    let second = broker.pid().expect("running again");
    assert_ne!(first, second, "a new process");
    assert_eq!(broker.port(), port, "same port");
    assert!(std::net::TcpStream::connect(("127.0.0.1", port)).is_ok());
    broker.kill().await;
    assert!(broker.pid().is_none());
    // Nothing answers any more.
    assert!(std::net::TcpStream::connect(("127.0.0.1", port)).is_err());
    Ok(())
}

#[tokio::test]
#[ignore = "needs brokers: cargo xtask test"]
async fn nats_starts_restarts_and_stops() -> anyhow::Result<()> {
    check_restart(BrokerProcess::nats("").await?).await
}

#[tokio::test]
#[ignore = "needs brokers: cargo xtask test"]
async fn mosquitto_starts_restarts_and_stops() -> anyhow::Result<()> {
    check_restart(BrokerProcess::mosquitto("").await?).await
}

#[tokio::test]
#[ignore = "needs brokers: cargo xtask test"]
async fn tansu_starts_restarts_and_stops() -> anyhow::Result<()> {
    check_restart(BrokerProcess::tansu(TansuStorage::Sqlite).await?).await
}

#[tokio::test]
#[ignore = "needs brokers: cargo xtask test"]
async fn tls_only_mosquitto_is_ready_by_tcp_accept_and_restarts() -> anyhow::Result<()> {
    use polybus_testkit::brokers::Readiness;
    let pki = polybus_testkit::tls::TestPki::generate()?;
    let conf = format!(
        "cafile {}\ncertfile {}\nkeyfile {}\n",
        pki.ca().display(),
        pki.server_cert().display(),
        pki.server_key().display()
    );
    check_restart(BrokerProcess::mosquitto_with(&conf, Readiness::TcpAccept).await?).await
}

#[tokio::test]
#[ignore = "needs brokers: cargo xtask test"]
async fn tansu_with_takes_extra_flags() -> anyhow::Result<()> {
    use polybus_testkit::brokers::Readiness;
    let broker =
        BrokerProcess::tansu_with(TansuStorage::Memory, &["--silent"], Readiness::Protocol).await?;
    assert!(
        broker.pid().is_some(),
        "started with the extra flag, answering ApiVersions"
    );
    check_restart(broker).await
}
