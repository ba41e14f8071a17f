//! `AdminRequest` bodies: parsed directly and through `seal` + `open`, then the checks the
//! platform applies to the fields it trusts.

use fleetcast_proto::admin::{AdminOp, AdminRequest};
use fleetcast_proto::auth::Purpose;
use fleetcast_proto::chunk::Layout;
use fleetcast_proto::release::validate_version;

use crate::family::sealed;
use crate::samples::{admin_requests, json};
use crate::targets::release_policy::check_policy;
use crate::Verdict;

pub fn run(data: &[u8]) -> Verdict {
    sealed(Purpose::Admin, data, |r: &AdminRequest| match &r.op {
        AdminOp::UploadBegin {
            version,
            size,
            chunk_size,
            ..
        } => {
            let _ = validate_version(version);
            if let Ok(layout) = Layout::new(*size, *chunk_size) {
                let _ = (layout.manifest_len(), layout.manifest_parts());
            }
        }
        AdminOp::ReleaseCreate {
            version, policy, ..
        } => {
            let _ = validate_version(version);
            check_policy(policy);
        }
        _ => {}
    })
}

pub fn seeds() -> Vec<Vec<u8>> {
    admin_requests().iter().map(json).collect()
}
