//! The chunk server: answers MAC'd chunk requests from `machines/{m}/chunks/get` with chunk and
//! manifest frames on `machines/{m}/chunks`. While two or more machines fetch the same artifact
//! (requests within [`BROADCAST_WINDOW`]), chunks go once to `artifacts/{a}/chunks` instead,
//! and a chunk broadcast less than [`REBROADCAST_AFTER`] ago is not sent again.
//!
//! Runs on its own task fed by the serve connection, so it never waits on ingest flushes.
//! Reads use positioned reads on cached open files; an artifact is never loaded whole.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::{Duration, Instant};

use fleetcast_proto::auth::Purpose;
use fleetcast_proto::chunk::{encode_frame, ChunkRequest, FrameHeader, FrameType, Layout};
use fleetcast_proto::{ArtifactId, MachineId};
use rumqttc::QoS;
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;

use crate::error::PlatformError;
use crate::publish::Ctx;

pub const BROADCAST_WINDOW: Duration = Duration::from_secs(10);
pub const REBROADCAST_AFTER: Duration = Duration::from_millis(500);

struct ChunkServer {
    ctx: Arc<Ctx>,
    ctrs: HashMap<MachineId, u64>,
    requesters: HashMap<ArtifactId, HashMap<MachineId, Instant>>,
    broadcast_at: HashMap<(ArtifactId, u32), Instant>,
    buf: Vec<u8>,
}

pub async fn run(
    ctx: Arc<Ctx>,
    mut requests: mpsc::Receiver<(MachineId, bytes::Bytes)>,
    shutdown: CancellationToken,
) -> Result<(), PlatformError> {
    let mut server = ChunkServer {
        ctx,
        ctrs: HashMap::new(),
        requesters: HashMap::new(),
        broadcast_at: HashMap::new(),
        buf: Vec::new(),
    };
    loop {
        let (machine, payload) = tokio::select! {
            _ = shutdown.cancelled() => return Ok(()),
            r = requests.recv() => match r { Some(r) => r, None => return Ok(()) },
        };
        if let Err(reason) = server.handle(&machine, &payload).await {
            tracing::warn!(machine = %machine, reason = %reason, "chunk request refused");
        }
    }
}

impl ChunkServer {
    async fn handle(&mut self, m: &MachineId, payload: &[u8]) -> Result<(), String> {
        let store = &self.ctx.store;
        let secret = store
            .secret(m)
            .map_err(|e| e.to_string())?
            .ok_or("unknown machine (not provisioned)")?;
        let req: ChunkRequest = secret
            .open(Purpose::ChunkRequest, payload)
            .map_err(|e| e.to_string())?;
        if &req.machine != m {
            return Err(format!(
                "body names machine {}, topic names {m}",
                req.machine
            ));
        }
        let last = match self.ctrs.get(m) {
            Some(c) => *c,
            None => store.counter(m, "chunks").map_err(|e| e.to_string())?,
        };
        if req.ctr <= last {
            return Err(format!(
                "replayed chunk request counter {} (last {last})",
                req.ctr
            ));
        }
        self.ctrs.insert(m.clone(), req.ctr);
        // Not flushed: a replayed chunk request after a crash only costs bandwidth.
        store
            .set_counter(m, "chunks", req.ctr)
            .map_err(|e| e.to_string())?;
        let own_topic = self.ctx.topics.machine_chunks(m);
        let info = match store.artifact(&req.artifact).map_err(|e| e.to_string())? {
            Some(i) if self.ctx.files.exists(&req.artifact) => i,
            _ => {
                self.error_frame(&own_topic, req.artifact, "unknown artifact")
                    .await;
                return Err(format!("unknown artifact {}", req.artifact.short()));
            }
        };
        let layout = Layout::new(info.size, info.chunk_size).map_err(|e| e.to_string())?;
        if let Err(e) = req.validate(layout.chunks) {
            self.error_frame(&own_topic, req.artifact, &format!("bad chunk request: {e}"))
                .await;
            return Err(e);
        }
        if req.manifest {
            let manifest = match self.ctx.files.read_manifest(&req.artifact) {
                Ok(m) => m,
                Err(e) => {
                    self.error_frame(&own_topic, req.artifact, "manifest unreadable")
                        .await;
                    return Err(e.to_string());
                }
            };
            let parts = layout.manifest_parts();
            for part in 0..parts {
                let range = layout.manifest_part_range(part);
                let Some(bytes) = manifest.get(range) else {
                    return Err("manifest file is shorter than its layout".into());
                };
                let header = FrameHeader {
                    frame_type: FrameType::Manifest,
                    artifact: req.artifact,
                    index: part,
                    total: parts,
                };
                self.send(&own_topic, encode_frame(&header, bytes)).await?;
            }
        }
        let now = Instant::now();
        let machines = self.requesters.entry(req.artifact).or_default();
        machines.insert(m.clone(), now);
        machines.retain(|_, t| now.duration_since(*t) < BROADCAST_WINDOW);
        let broadcast = machines.len() >= 2;
        self.requesters.retain(|_, ms| !ms.is_empty());
        if self.broadcast_at.len() > 100_000 {
            self.broadcast_at
                .retain(|_, t| now.duration_since(*t) < REBROADCAST_AFTER);
        }
        let broadcast_topic = self.ctx.topics.artifact_chunks(&req.artifact);
        for index in req.indices() {
            let topic = if broadcast {
                let key = (req.artifact, index);
                if self
                    .broadcast_at
                    .get(&key)
                    .is_some_and(|t| now.duration_since(*t) < REBROADCAST_AFTER)
                {
                    continue;
                }
                self.broadcast_at.insert(key, now);
                &broadcast_topic
            } else {
                &own_topic
            };
            let mut buf = std::mem::take(&mut self.buf);
            if let Err(e) = self
                .ctx
                .files
                .read_chunk(&req.artifact, &layout, index, &mut buf)
            {
                self.buf = buf;
                self.error_frame(&own_topic, req.artifact, "artifact unreadable")
                    .await;
                return Err(e.to_string());
            }
            let header = FrameHeader {
                frame_type: FrameType::Chunk,
                artifact: req.artifact,
                index,
                total: layout.chunks,
            };
            let frame = encode_frame(&header, &buf);
            self.buf = buf;
            let topic = topic.clone();
            self.send(&topic, frame).await?;
        }
        Ok(())
    }

    async fn send(&self, topic: &str, frame: Vec<u8>) -> Result<(), String> {
        self.ctx
            .mqtt
            .publish(topic, QoS::AtMostOnce, false, frame)
            .await
            .map_err(|e| format!("cannot publish chunk frame: {e}"))
    }

    async fn error_frame(&self, topic: &str, artifact: ArtifactId, reason: &str) {
        let header = FrameHeader {
            frame_type: FrameType::Error,
            artifact,
            index: 0,
            total: 0,
        };
        let _ = self
            .send(topic, encode_frame(&header, reason.as_bytes()))
            .await;
    }
}
