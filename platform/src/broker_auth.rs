//! Who the embedded broker lets in, and as what: the platform's answer to "which principal holds
//! these credentials?", from its own store. Machines and operators authenticate with passwords
//! derived from their secrets, compared in constant time; a revoked identity has no secret, so
//! it is refused.

use std::sync::{Arc, RwLock};

use fleetcast_proto::acl::{Claim, Principal};
use fleetcast_proto::auth::constant_time_eq;
use fleetcast_proto::ArtifactId;

use crate::store::Store;

/// The store as the broker sees it; emptied when `serve` returns, because the broker thread
/// outlives it.
pub type AuthStore = Arc<RwLock<Option<Arc<dyn Store>>>>;

/// Checks broker credentials against the platform's identities.
pub struct StoreAuth {
    pub store: AuthStore,
    /// The password of the platform's own clients (`fleetcast-platform`).
    pub platform_password: String,
}

impl StoreAuth {
    /// The principal holding these credentials, or None.
    pub fn principal(&self, username: &str, password: &str) -> Option<Principal> {
        let claim = Claim::parse(username)?;
        if let Claim::Platform = claim {
            return constant_time_eq(password.as_bytes(), self.platform_password.as_bytes())
                .then_some(Principal::Platform);
        }
        let guard = self.store.read().unwrap_or_else(|p| p.into_inner());
        let store = guard.as_ref()?;
        match claim {
            Claim::Platform => None,
            Claim::Operator(name) => {
                let op = store.operator(&name).ok().flatten()?;
                op.secret
                    .accepts_mqtt_password(password)
                    .then(|| Principal::Operator {
                        name,
                        role: op.role(),
                    })
            }
            Claim::Integrator(name) => {
                let int = store.integrator(&name).ok().flatten()?;
                int.secret
                    .accepts_mqtt_password(password)
                    .then_some(Principal::Integrator { name })
            }
            Claim::Machine(id) => {
                let secret = store.secret(&id).ok().flatten()?;
                if !secret.accepts_mqtt_password(password) {
                    return None;
                }
                let groups = store
                    .machine(&id)
                    .ok()
                    .flatten()
                    .map(|m| m.groups)
                    .unwrap_or_default();
                Some(Principal::Machine { id, groups })
            }
        }
    }

    /// A client may connect when its credentials name a principal that accepts its client id.
    pub fn check(&self, client_id: &str, username: &str, password: &str) -> bool {
        self.principal(username, password)
            .is_some_and(|p| p.accepts_client_id(client_id))
    }
}

impl StoreAuth {
    /// An operator or integrator may follow the progress of a release that exists (or of all,
    /// with `+`). Each concrete progress filter is a filter of its own on rumqttd, kept until it
    /// restarts: ids that name no release would let one credential grow the broker without
    /// bound.
    fn may_follow(&self, filter: &str) -> bool {
        let Some(release) = filter
            .strip_suffix("/progress")
            .and_then(|f| f.rsplit_once("/rollouts/"))
            .map(|(_, r)| r)
        else {
            return true;
        };
        if release == "+" {
            return true;
        }
        let Ok(id) = fleetcast_proto::ReleaseId::new(release) else {
            return false;
        };
        let guard = self.store.read().unwrap_or_else(|p| p.into_inner());
        guard
            .as_ref()
            .and_then(|s| s.release(&id).ok())
            .is_some_and(|r| r.is_some())
    }
}

impl fleetcast_broker::Authenticator for StoreAuth {
    fn authenticate(&self, username: &str, password: &[u8]) -> Option<Principal> {
        self.principal(username, std::str::from_utf8(password).ok()?)
    }

    /// A machine may read an artifact's broadcast only while a release of it is assigned to
    /// the machine or desired for it or its groups (`publish::fetchable_artifacts`; the static
    /// policy already allows only concrete artifact ids).
    fn may_subscribe(&self, principal: &Principal, filter: &str) -> bool {
        self.may_subscribe_each(principal, &[filter.to_owned()])[0]
    }

    /// The artifacts a machine may fetch are read once per SUBSCRIBE, however many chunk
    /// filters it names (read per filter, 5,000 filters a packet cost `serve` half a core).
    fn may_subscribe_each(&self, principal: &Principal, filters: &[String]) -> Vec<bool> {
        let Principal::Machine { id, groups } = principal else {
            return filters.iter().map(|f| self.may_follow(f)).collect();
        };
        let mut fetchable: Option<Vec<ArtifactId>> = None;
        filters
            .iter()
            .map(|filter| {
                let Some(artifact) = filter
                    .rsplit('/')
                    .nth(1)
                    .filter(|_| filter.ends_with("/chunks") && filter.contains("/artifacts/"))
                    .and_then(|a| a.parse::<ArtifactId>().ok())
                else {
                    return true;
                };
                fetchable
                    .get_or_insert_with(|| {
                        let guard = self.store.read().unwrap_or_else(|p| p.into_inner());
                        guard
                            .as_ref()
                            .and_then(|s| {
                                crate::publish::fetchable_artifacts(&**s, id, groups).ok()
                            })
                            .unwrap_or_default()
                    })
                    .contains(&artifact)
            })
            .collect()
    }
}

#[cfg(test)]
mod tests {
    use fleetcast_broker::Authenticator;
    use fleetcast_proto::acl::Principal;

    use super::*;
    use crate::store::MemStore;

    #[test]
    fn progress_is_followed_only_for_releases_that_exist() {
        let store: Arc<dyn Store> = Arc::new(MemStore::new());
        let release = crate::fixtures::release("r-000001", "1.0");
        store.transaction(|tx| tx.put_release(&release)).unwrap();
        let auth = StoreAuth {
            store: Arc::new(RwLock::new(Some(store))),
            platform_password: "p".into(),
        };
        let erp = Principal::Integrator { name: "erp".into() };
        for (filter, ok) in [
            ("fleet/rollouts/r-000001/progress", true),
            ("fleet/rollouts/+/progress", true),
            ("fleet/rollouts/r-000002/progress", false),
            ("fleet/rollouts/no-such-id-0001/progress", false),
            ("fleet/events", true),
        ] {
            assert_eq!(auth.may_subscribe(&erp, filter), ok, "{filter}");
        }
    }

    /// One SUBSCRIBE, many filters: the machine's own artifact's chunk topic (named twice), an
    /// artifact not assigned to it, and its other topics. Each gets its own answer, the same
    /// as asked one at a time.
    #[test]
    fn a_machine_reads_the_chunks_of_its_own_artifacts_only_however_many_it_names() {
        use crate::fixtures::m;
        let store: Arc<dyn Store> = Arc::new(MemStore::new());
        let mine = crate::fixtures::release("r-000001", "1.0");
        let other = crate::fixtures::release("r-000002", "2.0");
        store
            .transaction(|tx| {
                tx.put_machine(&fleetcast_proto::admin::MachineInfo::new(m("vm-1"), 0))?;
                tx.put_release(&mine)?;
                tx.put_release(&other)?;
                crate::publish::assign_target(tx, &mine, &m("vm-1"), None, 0)
            })
            .unwrap();
        let auth = StoreAuth {
            store: Arc::new(RwLock::new(Some(store))),
            platform_password: "p".into(),
        };
        let vm1 = Principal::Machine {
            id: m("vm-1"),
            groups: vec![],
        };
        let topics = fleetcast_proto::Topics::default();
        let filters = [
            topics.artifact_chunks(&mine.artifact.id),
            topics.artifact_chunks(&other.artifact.id),
            topics.machine_chunks(&m("vm-1")),
            topics.artifact_chunks(&mine.artifact.id),
        ];
        let one_by_one: Vec<bool> = filters
            .iter()
            .map(|f| auth.may_subscribe(&vm1, f))
            .collect();
        assert_eq!(one_by_one, [true, false, true, true]);
        assert_eq!(auth.may_subscribe_each(&vm1, &filters), one_by_one);
    }

    #[test]
    fn only_the_exact_password_lets_a_machine_or_the_platform_in() {
        use crate::fixtures::m;
        use fleetcast_proto::auth::Secret;
        let store: Arc<dyn Store> = Arc::new(MemStore::new());
        let secret = Secret::from_bytes([9; 32]);
        store
            .transaction(|tx| tx.put_secret(&m("vm-1"), &secret))
            .unwrap();
        let auth = StoreAuth {
            store: Arc::new(RwLock::new(Some(store))),
            platform_password: "platform-pw".into(),
        };
        let password = secret.mqtt_password();
        assert!(matches!(
            auth.principal("vm-1", &password),
            Some(Principal::Machine { .. })
        ));
        let mut last_wrong = password.clone().into_bytes();
        last_wrong[31] = if last_wrong[31] == b'0' { b'1' } else { b'0' };
        let last_wrong = String::from_utf8(last_wrong).unwrap();
        for wrong in [&password[..31], &format!("{password}0"), &last_wrong, ""] {
            assert!(auth.principal("vm-1", wrong).is_none(), "{wrong:?}");
        }
        assert!(
            auth.principal("vm-2", &password).is_none(),
            "another machine"
        );
        assert!(matches!(
            auth.principal("fleetcast-platform", "platform-pw"),
            Some(Principal::Platform)
        ));
        for wrong in ["platform-p", "platform-pw ", "platform-px", ""] {
            assert!(
                auth.principal("fleetcast-platform", wrong).is_none(),
                "{wrong:?}"
            );
        }
    }
}
