//! `artifact_list` (uploads are in [`crate::uploads`], whose staging state the admin task owns).

use fleetcast_proto::admin::ArtifactInfo;
use fleetcast_proto::calls;
use fleetcast_proto::release::compare_versions;

use crate::context::Ctx;
use crate::ops::OpError;

/// Every stored artifact, by kind, then version.
pub fn list(ctx: &Ctx, _: calls::ArtifactList) -> Result<Vec<ArtifactInfo>, OpError> {
    let mut artifacts = ctx.store.artifacts()?;
    artifacts.sort_by(|a, b| {
        a.kind
            .cmp(&b.kind)
            .then(compare_versions(&a.version, &b.version))
    });
    Ok(artifacts)
}
