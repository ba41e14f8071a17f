//! `ReleaseNotice` bodies: parsed directly and through `sign` + `verify`, then checked the way
//! a machine checks a verified notice before acting on it.

use fleetcast_proto::auth::Purpose;
use fleetcast_proto::chunk::Layout;
use fleetcast_proto::release::{compare_versions, validate_version};
use fleetcast_proto::{ReleaseNotice, Route, Target, Topics};

use crate::family::signed;
use crate::samples::{group, json, machine, notices};
use crate::targets::release_policy::check_policy;
use crate::Verdict;

pub fn run(data: &[u8]) -> Verdict {
    signed(Purpose::Release, data, check)
}

pub fn check(n: &ReleaseNotice) {
    if validate_version(&n.version).is_ok() {
        let _ = compare_versions(&n.version, "2.4.1");
    }
    check_policy(&n.policy);
    if let Ok(layout) = Layout::new(n.artifact.size, n.artifact.chunk_size) {
        let last = layout.chunks - 1;
        assert!((1..=n.artifact.chunk_size as usize).contains(&layout.chunk_len(last)));
        assert_eq!(
            layout.offset(last) + layout.chunk_len(last) as u64,
            n.artifact.size
        );
        let _ = layout.manifest_parts();
    }
    let topics = Topics::default();
    let topic = topics.release(&n.target, &n.kind);
    let route = topics.parse(&topic);
    match (&n.target, route) {
        (Target::Machine(m), Some(Route::MachineRelease(rm, rk))) => {
            assert!(m == &rm && n.kind == rk)
        }
        (Target::Group(g), Some(Route::GroupRelease(rg, rk))) => assert!(g == &rg && n.kind == rk),
        (t, r) => panic!("notice for {t} is published on {topic}, which parses as {r:?}"),
    }
    let _ = n.addresses(&machine(), &[group()]);
}

pub fn seeds() -> Vec<Vec<u8>> {
    notices().iter().map(json).collect()
}
