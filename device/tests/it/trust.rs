//! Notices that do not verify: the machine reports one without the release it claims, once,
//! and at a bounded rate.

use fleetcast_proto::auth::SignedEnvelope;
use fleetcast_proto::GroupId;

use super::*;

fn group() -> GroupId {
    GroupId::new("g1").unwrap()
}

fn rejected(events: &[StatusEvent]) -> Vec<&StatusEvent> {
    events
        .iter()
        .filter(|e| e.phase == Phase::Rejected)
        .collect()
}

impl Platform {
    /// Publishes `payload` as it is on the app release topic of `target`.
    async fn publish_raw(&self, target: &Target, payload: Vec<u8>, retain: bool) {
        self.client
            .publish(
                self.topics.release(target, &app()),
                QoS::AtLeastOnce,
                retain,
                payload,
            )
            .await
            .unwrap();
    }

    /// Status events up to and including a `rejected` that names no release.
    async fn wait_unverified(&mut self) -> Vec<StatusEvent> {
        self.events_until("rejected without a release", |e| {
            e.phase == Phase::Rejected && e.release.is_none()
        })
        .await
    }

    /// Publishes a `download_only` notice of kind `probe` to `target` and returns the status
    /// events up to its `deferred`. The release topics of one target share one subscription,
    /// so by then the machine has handled what was published on them before.
    async fn probe(&mut self, target: Target, art: &Artifact) -> Vec<StatusEvent> {
        let n = ReleaseNotice {
            target,
            kind: Kind::new("probe").unwrap(),
            ..self.notice("r-probe", "1.0.0", art, InstallPolicy::DownloadOnly)
        };
        self.publish(&n).await;
        self.wait_for("r-probe", Phase::Deferred).await
    }
}

#[tokio::test]
async fn a_forged_retained_notice_is_reported_once_without_its_release_and_blocks_nothing() {
    let mut s = setup().await;
    let mut cfg = s.config();
    cfg.groups = vec![group()];
    let m = start(cfg.clone(), AgentOptions::default());
    let art = s.platform.add(Artifact::new(40 * 1024, 24));
    let target = Target::Group(group());
    let genuine = ReleaseNotice {
        target: target.clone(),
        ..s.platform
            .notice("r-1", "1.1.0", &art, InstallPolicy::Immediate)
    };
    // The genuine notice's body, unsigned, retained on the group topic before the platform
    // publishes it.
    let forged = SignedEnvelope {
        body: serde_json::to_string(&genuine).unwrap(),
        sig: String::new(),
        gen: 0,
    };
    s.platform
        .publish_raw(&target, serde_json::to_vec(&forged).unwrap(), true)
        .await;
    let seen = s.platform.wait_unverified().await;
    assert!(seen.iter().all(|e| e.release.is_none()), "{seen:?}");
    let r = seen.last().unwrap();
    assert_eq!((r.kind.clone(), r.version.as_str()), (app(), ""), "{r:?}");
    assert!(
        r.error.as_deref().unwrap_or("").contains("signature"),
        "{r:?}"
    );
    assert!(
        r.detail
            .as_deref()
            .unwrap_or("")
            .contains("claims release r-1 (unverified)"),
        "{r:?}"
    );
    // Junk flooding the same topic within the minute is not reported.
    for i in 0..20 {
        s.platform
            .publish_raw(&target, format!("junk {i}").into_bytes(), false)
            .await;
    }
    let seen = s.platform.probe(target.clone(), &art).await;
    assert_eq!(rejected(&seen), Vec::<&StatusEvent>::new());
    // After a restart the retained forgery comes back and is not reported again (the probe
    // shows the machine subscribed, so it was delivered before the genuine notice)...
    m.stop().await;
    let m = start(cfg, AgentOptions::default());
    let mut seen = s.platform.probe(target.clone(), &art).await;
    // ...and the genuine notice with the seq and release the forgery claimed installs.
    s.platform.publish(&genuine).await;
    seen.extend(s.platform.wait_for("r-1", Phase::Installed).await);
    assert_eq!(rejected(&seen), Vec::<&StatusEvent>::new());
    assert_eq!(m.installed(), art.bytes);
    m.stop().await;
}
