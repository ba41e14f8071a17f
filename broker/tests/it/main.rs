//! Broker integration tests: a real rumqttd on a free loopback port, real rumqttc clients.

mod admin_call;
mod gateway;

use std::time::Duration;

use fleetcast_broker::client::{self, MqttEvent};
use fleetcast_broker::embedded::start_on_free_port;
use rumqttc::{AsyncClient, MqttOptions, Publish, QoS};
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;

mod mosquitto_acl;

/// A client driven until `shutdown`; its events on the receiver.
fn connected_with(
    options: MqttOptions,
    shutdown: &CancellationToken,
) -> (AsyncClient, mpsc::Receiver<MqttEvent>) {
    let (c, el) = client::connect(options, 64);
    let (tx, rx) = mpsc::channel(64);
    tokio::spawn(client::drive(el, tx, shutdown.clone()));
    (c, rx)
}

fn connected(
    url: &fleetcast_broker::BrokerUrl,
    id: &str,
    password: Option<&str>,
    shutdown: &CancellationToken,
) -> (AsyncClient, mpsc::Receiver<MqttEvent>) {
    connected_with(client::options(url, id, password), shutdown)
}

/// Ok once connected; the broker's refusal (or a timeout) otherwise.
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

/// Subscribes with QoS 1 and waits until the broker confirmed it.
async fn subscribe(c: &AsyncClient, rx: &mut mpsc::Receiver<MqttEvent>, filter: &str) {
    c.subscribe(filter, QoS::AtLeastOnce).await.unwrap();
    tokio::time::timeout(Duration::from_secs(5), async {
        while !matches!(rx.recv().await, Some(MqttEvent::SubAck(_))) {}
    })
    .await
    .expect("SUBACK");
}

/// The next publish received within `within`.
async fn next_publish(rx: &mut mpsc::Receiver<MqttEvent>, within: Duration, what: &str) -> Publish {
    tokio::time::timeout(within, async {
        loop {
            if let Some(MqttEvent::Publish(p)) = rx.recv().await {
                return p;
            }
        }
    })
    .await
    .expect(what)
}

#[tokio::test]
async fn a_large_payload_passes_through_the_embedded_broker() {
    let broker = start_on_free_port(|s| s).unwrap();
    let url = broker.url();
    let shutdown = CancellationToken::new();
    let (sub, mut sub_rx) = connected(&url, "sub", None, &shutdown);
    next_connected(&mut sub_rx).await.unwrap();
    subscribe(&sub, &mut sub_rx, "t/big").await;
    let (publ, mut pub_rx) = connected(&url, "pub", None, &shutdown);
    next_connected(&mut pub_rx).await.unwrap();
    let payload = vec![7u8; 1024 * 1024 + 100];
    publ.publish("t/big", QoS::AtLeastOnce, false, payload.clone())
        .await
        .unwrap();
    let got = next_publish(
        &mut sub_rx,
        Duration::from_secs(10),
        "the 1 MiB publish arrived",
    )
    .await;
    assert_eq!(got.payload.len(), payload.len());
    shutdown.cancel();
}

/// The broker refuses the connection (an answer, not a timeout).
async fn assert_refused(rx: &mut mpsc::Receiver<MqttEvent>, why: &str) {
    let r = next_connected(rx).await;
    assert!(matches!(&r, Err(e) if e != "timed out"), "{why}: {r:?}");
}

#[tokio::test]
async fn auth_requires_client_id_equal_to_username_and_a_good_password() {
    let broker = start_on_free_port(|s| {
        s.with_auth(|client, pass| client.starts_with("ok") && pass == "secret")
    })
    .unwrap();
    let url = broker.url();
    let shutdown = CancellationToken::new();
    let (_c, mut rx) = connected(&url, "ok-1", Some("secret"), &shutdown);
    next_connected(&mut rx)
        .await
        .expect("good credentials connect");
    let (_c, mut rx) = connected(&url, "ok-2", Some("wrong"), &shutdown);
    assert_refused(&mut rx, "a bad password is refused").await;
    let (_c, mut rx) = connected(&url, "ok-3", None, &shutdown);
    assert_refused(&mut rx, "no credentials are refused").await;
    // username differs from client id
    let mut o = client::options(&url, "ok-4", None);
    o.set_credentials("ok-5", "secret");
    let (_c, mut rx) = connected_with(o, &shutdown);
    assert_refused(&mut rx, "username must equal client id").await;
    shutdown.cancel();
}

#[tokio::test]
async fn the_client_plumbing_works_against_mosquitto() {
    let mosq = fleetcast_broker::testing::Mosquitto::start("")
        .expect("mosquitto starts (is it installed?)");
    let shutdown = CancellationToken::new();
    let (sub, mut sub_rx) = connected(&mosq.url, "sub", None, &shutdown);
    next_connected(&mut sub_rx).await.unwrap();
    subscribe(&sub, &mut sub_rx, "t/x").await;
    sub.publish("t/x", QoS::AtLeastOnce, false, vec![1u8; 300_000])
        .await
        .unwrap();
    let got = next_publish(
        &mut sub_rx,
        Duration::from_secs(5),
        "own publish echoed back by mosquitto",
    )
    .await;
    assert_eq!(got.payload.len(), 300_000);
    shutdown.cancel();
}
