//! Platform key rotation, and notices that do not verify: the machine follows the retained key
//! chain, judges every signed message by the key generation it names, and reports an
//! unverified notice without the release it claims, once, and at a bounded rate.

use fleetcast_device::store::Store;
use fleetcast_device::trust::TrustedKey;
use fleetcast_proto::auth::SignedEnvelope;
use fleetcast_proto::keychain::{KeyAnnouncement, KeyChain};
use fleetcast_proto::GroupId;

use super::*;

/// A platform key of `generation` from a random seed.
fn new_key(generation: u32) -> PlatformKey {
    PlatformKey::with_generation(rand::random(), generation)
}

/// The chain link announcing `next` under `signer`.
fn link(signer: &PlatformKey, next: &PlatformKey) -> SignedEnvelope {
    signer.sign_envelope(
        Purpose::KeyRotation,
        &KeyAnnouncement {
            generation: next.generation(),
            key: next.public(),
            issued_at_ms: 0,
        },
    )
}

fn trusted(key: &PlatformKey) -> Option<TrustedKey> {
    Some(TrustedKey {
        generation: key.generation(),
        key: key.public(),
    })
}

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
    /// From now on signs notices and commands with `key`, as the platform does after a
    /// rotation (status acks are MAC'd with the machine's secret: a rotation leaves them be).
    fn use_key(&mut self, key: &PlatformKey) {
        self.key = PlatformKey::with_generation(key.seed(), key.generation());
    }

    /// Publishes the retained key chain; no links clears it.
    async fn publish_chain(&self, links: Vec<SignedEnvelope>) {
        let payload = if links.is_empty() {
            Vec::new()
        } else {
            KeyChain { links }.to_bytes()
        };
        self.client
            .publish(self.topics.platform_keys(), QoS::AtLeastOnce, true, payload)
            .await
            .unwrap();
    }

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

    /// Waits for a state message from the machine for which `ok` holds.
    async fn wait_state(&self, what: &str, ok: impl Fn(&MachineState) -> bool) -> MachineState {
        eventually(
            Duration::from_secs(20),
            || self.state.lock().unwrap().as_ref().is_some_and(&ok),
            || format!("a state with {what}; last {:?}", self.state.lock().unwrap()),
        )
        .await;
        self.state.lock().unwrap().clone().expect("checked")
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

impl Machine {
    /// The platform key the agent persisted after following the chain.
    fn followed_key(&self) -> Option<TrustedKey> {
        Store::open(&self.config.data_dir)
            .unwrap()
            .platform_key()
            .map(|f| f.current)
    }
}

#[tokio::test]
async fn a_machine_follows_the_key_chain_and_still_trusts_the_newest_key_after_a_restart() {
    let mut s = setup().await;
    let k0 = PlatformKey::from_seed(s.platform.key.seed());
    let (k1, k2) = (new_key(1), new_key(2));
    // Pins key 0 (the platform's key until `use_key`).
    let cfg = s.config();
    let m = start(cfg.clone(), AgentOptions::default());
    s.platform
        .publish_chain(vec![link(&k0, &k1), link(&k1, &k2)])
        .await;
    s.platform
        .wait_state("key_gen 2", |st| st.key_gen == 2)
        .await;
    assert_eq!(m.followed_key(), trusted(&k2));
    s.platform.use_key(&k2);
    let art = s.platform.add(Artifact::new(40 * 1024, 20));
    s.platform
        .announce("r-1", "1.1.0", &art, InstallPolicy::Immediate)
        .await;
    s.platform.wait_for("r-1", Phase::Installed).await;
    m.stop().await;

    // With the chain gone, only what the agent persisted can tell it about key 2.
    s.platform.publish_chain(vec![]).await;
    let before = s.platform.state.lock().unwrap().as_ref().unwrap().ctr;
    let m = start(cfg, AgentOptions::default());
    let st = s
        .platform
        .wait_state("a counter above the last run's", |st| st.ctr > before)
        .await;
    assert_eq!(st.key_gen, 2);
    // A newer notice signed by the retired key 0 is refused, and names no release.
    let art2 = s.platform.add(Artifact::new(40 * 1024, 21));
    let old = s
        .platform
        .notice("r-old", "1.2.0", &art2, InstallPolicy::Immediate);
    s.platform.publish_signed(&old, &k0).await;
    let seen = s.platform.wait_unverified().await;
    assert!(seen.iter().all(|e| e.release.is_none()), "{seen:?}");
    let error = seen.last().unwrap().error.clone().unwrap_or_default();
    assert!(
        error.contains("older than the trusted generation 2"),
        "{error}"
    );
    // Key 2 still works.
    s.platform
        .announce("r-2", "1.3.0", &art2, InstallPolicy::Immediate)
        .await;
    s.platform.wait_for("r-2", Phase::Installed).await;
    assert_eq!(m.installed_version(), "1.3.0");
    m.stop().await;
}

#[tokio::test]
async fn a_notice_signed_by_a_newer_key_waits_for_the_chain_and_installs_when_sent_again() {
    let mut s = setup().await;
    let k0 = PlatformKey::from_seed(s.platform.key.seed());
    let k1 = new_key(1);
    let m = s.machine(AgentOptions::default());
    let art = s.platform.add(Artifact::new(40 * 1024, 22));
    let n = s
        .platform
        .notice("r-1", "1.1.0", &art, InstallPolicy::Immediate);
    s.platform.publish_signed(&n, &k1).await;
    // Neither rejected nor acted on.
    let seen = s.platform.probe(Target::Machine(machine()), &art).await;
    assert!(
        seen.iter()
            .all(|e| e.phase != Phase::Rejected && e.release != Some(n.release.clone())),
        "{seen:?}"
    );
    s.platform.publish_chain(vec![link(&k0, &k1)]).await;
    s.platform
        .wait_state("key_gen 1", |st| st.key_gen == 1)
        .await;
    s.platform.use_key(&k1);
    // What the platform does for a machine whose state is behind: send the notice again.
    s.platform.publish(&n).await;
    let seen = s.platform.wait_for("r-1", Phase::Installed).await;
    assert_eq!(phases(&seen)[0], Phase::Notified, "{seen:?}");
    assert_eq!(m.installed(), art.bytes);
    m.stop().await;
}

#[tokio::test]
async fn a_forged_chain_moves_nothing_and_the_forgers_notices_are_rejected_without_a_release() {
    let mut s = setup().await;
    let k0 = PlatformKey::from_seed(s.platform.key.seed());
    let k1 = new_key(1);
    let (evil0, evil1) = (new_key(0), new_key(1));
    let mut cfg = s.config();
    cfg.groups = vec![group()];
    let m = start(cfg, AgentOptions::default());
    let art = s.platform.add(Artifact::new(40 * 1024, 23));
    // The attacker announces its own generation-1 key under its own key...
    s.platform.publish_chain(vec![link(&evil0, &evil1)]).await;
    // ...and signs a notice with it claiming generation 0 and a real release.
    let n = s
        .platform
        .notice("r-1", "1.1.0", &art, InstallPolicy::Immediate);
    s.platform.publish_signed(&n, &evil0).await;
    let seen = s.platform.wait_unverified().await;
    assert!(seen.iter().all(|e| e.release.is_none()), "{seen:?}");
    let r = seen.last().unwrap();
    assert_eq!((r.kind.clone(), r.version.as_str()), (app(), ""), "{r:?}");
    assert!(
        r.error.as_deref().unwrap_or("").contains("bad signature"),
        "{r:?}"
    );
    assert!(
        r.detail
            .as_deref()
            .unwrap_or("")
            .contains("r-1 (unverified)"),
        "{r:?}"
    );
    // The platform's chain on the same topic, after the attacker's: the machine reaches the
    // platform's generation 1, not the attacker's.
    s.platform.publish_chain(vec![link(&k0, &k1)]).await;
    s.platform
        .wait_state("key_gen 1", |st| st.key_gen == 1)
        .await;
    assert_eq!(m.followed_key(), trusted(&k1));
    s.platform.use_key(&k1);
    // The attacker's generation-1 key signs nothing the machine accepts (on the group topic:
    // another report on the machine topic within the minute would be rate-limited).
    let evil = ReleaseNotice {
        target: Target::Group(group()),
        ..s.platform
            .notice("r-2", "1.2.0", &art, InstallPolicy::Immediate)
    };
    s.platform.publish_signed(&evil, &evil1).await;
    let seen = s.platform.wait_unverified().await;
    assert!(seen.iter().all(|e| e.release.is_none()), "{seen:?}");
    // The genuine notice with the seq and release the first forgery claimed installs.
    s.platform.publish(&n).await;
    s.platform.wait_for("r-1", Phase::Installed).await;
    assert_eq!(m.installed(), art.bytes);
    m.stop().await;
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

#[tokio::test]
async fn a_signed_notice_copied_onto_another_release_topic_is_refused_and_shadows_nothing() {
    let mut s = setup().await;
    let mut cfg = s.config();
    cfg.groups = vec![group()];
    let m = start(cfg, AgentOptions::default());
    let art = s.platform.add(Artifact::new(40 * 1024, 25));
    let art2 = s.platform.add(Artifact::new(40 * 1024, 26));
    let for_group = ReleaseNotice {
        target: Target::Group(group()),
        ..s.platform
            .notice("r-1", "1.1.0", &art, InstallPolicy::Immediate)
    };
    let for_machine = s
        .platform
        .notice("r-2", "1.2.0", &art2, InstallPolicy::Immediate);
    // Genuine, signed notices, each copied as it is onto a release topic of this machine that
    // is not its own: the group's onto the machine's app topic (another target), the machine's
    // onto its firmware topic (another kind).
    let firmware = Kind::new("firmware").unwrap();
    let copies = [
        (
            &for_group,
            s.platform.topics.machine_release(&machine(), &app()),
        ),
        (
            &for_machine,
            s.platform.topics.machine_release(&machine(), &firmware),
        ),
    ];
    for (notice, topic) in copies {
        s.platform
            .client
            .publish(
                topic.clone(),
                QoS::AtLeastOnce,
                true,
                s.platform.key.sign(Purpose::Release, notice),
            )
            .await
            .unwrap();
        let seen = s.platform.wait_unverified().await;
        assert!(seen.iter().all(|e| e.release.is_none()), "{seen:?}");
        let r = seen.last().unwrap();
        let home = s.platform.topics.release(&notice.target, &notice.kind);
        assert!(
            r.error
                .as_deref()
                .unwrap_or("")
                .contains(&format!("belongs on {home}, not on this topic")),
            "{r:?}"
        );
        let topic_kind = topic.rsplit('/').next().unwrap();
        assert_eq!(r.kind.as_str(), topic_kind, "{r:?}");
    }
    assert_eq!(
        s.platform.control.requested.lock().unwrap().len(),
        0,
        "a copy on the wrong topic was acted on"
    );
    // Neither copy used up its notice's seq: both genuine notices, on their own topics, apply.
    s.platform.publish(&for_group).await;
    s.platform.wait_for("r-1", Phase::Installed).await;
    s.platform.publish(&for_machine).await;
    s.platform.wait_for("r-2", Phase::Installed).await;
    assert_eq!(m.installed_version(), "1.2.0");
    assert_eq!(m.installed(), art2.bytes);
    m.stop().await;
}
