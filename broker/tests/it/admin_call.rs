//! `AdminClient::call` against a stand-in platform on a real rumqttd: the stand-in answers
//! every request with `done`, so a call expecting `done` gets its message and any other call
//! gets `AdminError::WrongReply` naming the operation and both replies.

use std::time::Duration;

use fleetcast_broker::admin::{AdminClient, AdminError};
use fleetcast_broker::client::MqttEvent;
use fleetcast_broker::embedded::start_on_free_port;
use fleetcast_proto::admin::{AdminReply, AdminRequest, AdminResponse, ResponseEnvelope};
use fleetcast_proto::auth::{Purpose, Secret};
use fleetcast_proto::calls;
use fleetcast_proto::Topics;
use rumqttc::QoS;
use tokio_util::sync::CancellationToken;

use super::{connected, next_connected, subscribe};

#[tokio::test]
async fn a_call_answered_with_another_reply_is_a_wrong_reply_error() {
    let broker = start_on_free_port(|s| s).unwrap();
    let url = broker.url();
    let topics = Topics::default();
    let secret = Secret::from_bytes([7; 32]);
    let shutdown = CancellationToken::new();

    // The stand-in platform: opens each request with the operator secret and answers `done`.
    let (platform, mut rx) = connected(&url, "fake-platform", None, &shutdown);
    next_connected(&mut rx).await.unwrap();
    subscribe(&platform, &mut rx, &topics.platform_admin_request_filter()).await;
    let answer_secret = secret.clone();
    let answer_topics = topics.clone();
    tokio::spawn(async move {
        while let Some(event) = rx.recv().await {
            let MqttEvent::Publish(p) = event else {
                continue;
            };
            let req: AdminRequest = answer_secret.open(Purpose::Admin, &p.payload).unwrap();
            let resp = AdminResponse::ok(
                req.id,
                req.ctr,
                AdminReply::Done {
                    message: format!("did {}", req.op.name()),
                },
            );
            let env = ResponseEnvelope {
                id: req.id,
                sealed: Some(answer_secret.seal_box(Purpose::AdminResponse, &req.client, &resp)),
                unverified_error: None,
            };
            platform
                .publish(
                    answer_topics.admin_response(&req.client),
                    QoS::AtLeastOnce,
                    false,
                    serde_json::to_vec(&env).unwrap(),
                )
                .await
                .unwrap();
        }
    });

    let admin = AdminClient::connect(&url, topics, secret, Duration::from_secs(5))
        .await
        .unwrap();
    let message = admin.call(calls::KeyRotate {}).await.unwrap();
    assert_eq!(message, "did key_rotate");
    let err = admin.call(calls::ReleaseList {}).await.unwrap_err();
    match &err {
        AdminError::WrongReply { op, expected, got } => {
            assert_eq!(
                (*op, *expected, got.as_str()),
                ("release_list", "releases", "done")
            );
        }
        other => panic!("expected WrongReply, got {other:?}"),
    }
    assert_eq!(
        err.to_string(),
        "the platform answered release_list with `done`, expected `releases`"
    );
    admin.close().await;
    shutdown.cancel();
}
