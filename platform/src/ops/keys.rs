//! `key_rotate`, `mosquitto_config`: the platform key and the broker's credentials.

use fleetcast_proto::calls::{self, MosquittoFiles};

use crate::context::Ctx;
use crate::identities;
use crate::ops::OpError;
use crate::publish;

pub async fn rotate(ctx: &Ctx, _: calls::KeyRotate) -> Result<String, OpError> {
    let generation = publish::rotate_key(ctx).await?;
    Ok(format!(
        "platform key rotated to generation {generation}; machines follow the announced chain"
    ))
}

pub fn mosquitto_config(ctx: &Ctx, _: calls::MosquittoConfig) -> Result<MosquittoFiles, OpError> {
    let ids = identities::broker_identities(&*ctx.store, &ctx.keys())?;
    let files = fleetcast_broker::mosquitto::mosquitto_files(&ctx.topics, &ids)
        .map_err(|e| OpError::Refused(e.to_string()))?;
    Ok(MosquittoFiles {
        passwd: files.passwd,
        acl: files.acl,
    })
}
