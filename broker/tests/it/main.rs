//! Broker integration tests: a real rumqttd on a free loopback port, real rumqttc clients.

use std::time::Duration;

use fleetcast_broker::client::{self, MqttEvent};
use fleetcast_broker::embedded::start_on_free_port;
use rumqttc::QoS;
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;

async fn connected(
    url: &fleetcast_broker::BrokerUrl,
    id: &str,
    password: Option<&str>,
    shutdown: &CancellationToken,
) -> (rumqttc::AsyncClient, mpsc::Receiver<MqttEvent>) {
    let (c, el) = client::connect(client::options(url, id, password), 64);
    let (tx, rx) = mpsc::channel(64);
    tokio::spawn(client::drive(el, tx, shutdown.clone()));
    (c, rx)
}

async fn next_connected(rx: &mut mpsc::Receiver<MqttEvent>) -> Result<(), String> {
    let deadline = tokio::time::Instant::now() + Duration::from_secs(5);
    loop {
        match tokio::time::timeout_at(deadline, rx.recv()).await {
            Err(_) => return Err("timed out".into()),
            Ok(None) => return Err("closed".into()),
            Ok(Some(MqttEvent::Connected { .. })) => return Ok(()),
            Ok(Some(MqttEvent::Disconnected(e))) => return Err(e),
            Ok(Some(_)) => {}
        }
    }
}

#[tokio::test]
async fn a_large_payload_passes_through_the_embedded_broker() {
    let broker = start_on_free_port(|s| s).unwrap();
    let url = broker.url();
    let shutdown = CancellationToken::new();
    let (sub, mut sub_rx) = connected(&url, "sub", None, &shutdown).await;
    next_connected(&mut sub_rx).await.unwrap();
    sub.subscribe("t/big", QoS::AtLeastOnce).await.unwrap();
    tokio::time::sleep(Duration::from_millis(200)).await;
    let (publ, mut pub_rx) = connected(&url, "pub", None, &shutdown).await;
    next_connected(&mut pub_rx).await.unwrap();
    let payload = vec![7u8; 1024 * 1024 + 100];
    publ.publish("t/big", QoS::AtLeastOnce, false, payload.clone())
        .await
        .unwrap();
    let got = tokio::time::timeout(Duration::from_secs(10), async {
        loop {
            if let Some(MqttEvent::Publish(p)) = sub_rx.recv().await {
                return p;
            }
        }
    })
    .await
    .expect("the 1 MiB publish arrived");
    assert_eq!(got.payload.len(), payload.len());
    shutdown.cancel();
}

#[tokio::test]
async fn auth_requires_client_id_equal_to_username_and_a_good_password() {
    let broker = start_on_free_port(|s| {
        s.with_auth(|client, pass| client.starts_with("ok") && pass == "secret")
    })
    .unwrap();
    let url = broker.url();
    let shutdown = CancellationToken::new();
    let (_c, mut rx) = connected(&url, "ok-1", Some("secret"), &shutdown).await;
    next_connected(&mut rx)
        .await
        .expect("good credentials connect");
    let (_c, mut rx) = connected(&url, "ok-2", Some("wrong"), &shutdown).await;
    assert!(
        next_connected(&mut rx).await.is_err(),
        "a bad password is refused"
    );
    let (_c, mut rx) = connected(&url, "ok-3", None, &shutdown).await;
    assert!(
        next_connected(&mut rx).await.is_err(),
        "no credentials are refused"
    );
    // username differs from client id
    let mut o = client::options(&url, "ok-4", None);
    o.set_credentials("ok-5", "secret");
    let (_c, el) = client::connect(o, 8);
    let (tx, mut rx) = mpsc::channel(8);
    tokio::spawn(client::drive(el, tx, shutdown.clone()));
    assert!(
        next_connected(&mut rx).await.is_err(),
        "username must equal client id"
    );
    shutdown.cancel();
}

#[tokio::test]
async fn the_client_plumbing_works_against_mosquitto() {
    let mosq = fleetcast_broker::testing::Mosquitto::start("")
        .expect("mosquitto starts (is it installed?)");
    let shutdown = CancellationToken::new();
    let (sub, mut sub_rx) = connected(&mosq.url, "sub", None, &shutdown).await;
    next_connected(&mut sub_rx).await.unwrap();
    sub.subscribe("t/x", QoS::AtLeastOnce).await.unwrap();
    tokio::time::sleep(Duration::from_millis(100)).await;
    sub.publish("t/x", QoS::AtLeastOnce, false, vec![1u8; 300_000])
        .await
        .unwrap();
    let got = tokio::time::timeout(Duration::from_secs(5), async {
        loop {
            if let Some(MqttEvent::Publish(p)) = sub_rx.recv().await {
                return p;
            }
        }
    })
    .await
    .expect("own publish echoed back by mosquitto");
    assert_eq!(got.payload.len(), 300_000);
    shutdown.cancel();
}
