//! The chunk server: answers MAC'd chunk requests from `machines/{m}/chunks/get` with chunk and
//! manifest frames on `machines/{m}/chunks`. While two or more machines fetch the same artifact
//! (requests within [`BROADCAST_WINDOW`]), chunks go once to `artifacts/{a}/chunks` instead,
//! and a chunk broadcast less than [`REBROADCAST_AFTER`] ago is not sent again.
//!
//! Runs on its own task fed by the serve connection, so it never waits on ingest flushes.
//! Reads use positioned reads on cached open files, on tokio's blocking threads (a slow disk
//! must not stall the runtime); an artifact is never loaded whole.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::Duration;

use tokio::time::Instant;

use fleetcast_proto::auth::Purpose;
use fleetcast_proto::chunk::{encode_frame, ChunkRequest, FrameHeader, FrameType, Layout};
use fleetcast_proto::{ArtifactId, MachineId};
use rumqttc::QoS;
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;

use crate::artifacts::{ArtifactError, ArtifactStore};
use crate::error::PlatformError;
use crate::limits::{ChunkBudget, BUDGET_SWEEP};
use crate::publish::Ctx;

pub const BROADCAST_WINDOW: Duration = Duration::from_secs(10);
pub const REBROADCAST_AFTER: Duration = Duration::from_millis(500);

struct ChunkServer {
    ctx: Arc<Ctx>,
    ctrs: HashMap<MachineId, u64>,
    /// Per-machine request and byte budgets (machines that authenticated only).
    budgets: HashMap<MachineId, ChunkBudget>,
    budgets_swept_at: Instant,
    requesters: HashMap<ArtifactId, HashMap<MachineId, Instant>>,
    broadcast_at: HashMap<(ArtifactId, u32), Instant>,
    /// When `requesters` was last swept of machines that stopped fetching.
    swept_at: Instant,
}

pub async fn run(
    ctx: Arc<Ctx>,
    mut requests: mpsc::Receiver<(MachineId, bytes::Bytes)>,
    shutdown: CancellationToken,
) -> Result<(), PlatformError> {
    let mut server = ChunkServer {
        ctx,
        ctrs: HashMap::new(),
        budgets: HashMap::new(),
        budgets_swept_at: Instant::now(),
        requesters: HashMap::new(),
        broadcast_at: HashMap::new(),
        swept_at: Instant::now(),
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

/// Runs a blocking file read on tokio's blocking threads; the error as text.
async fn blocking<T: Send + 'static>(
    read: impl FnOnce() -> Result<T, ArtifactError> + Send + 'static,
) -> Result<T, String> {
    match tokio::task::spawn_blocking(read).await {
        Ok(r) => r.map_err(|e| e.to_string()),
        Err(e) => Err(e.to_string()),
    }
}

/// Reads chunk `index` and encodes its frame. Blocking.
fn chunk_frame(
    files: &ArtifactStore,
    artifact: ArtifactId,
    layout: &Layout,
    index: u32,
) -> Result<Vec<u8>, ArtifactError> {
    let mut buf = Vec::new();
    files.read_chunk(&artifact, layout, index, &mut buf)?;
    let header = FrameHeader {
        frame_type: FrameType::Chunk,
        artifact,
        index,
        total: layout.chunks,
    };
    Ok(encode_frame(&header, &buf))
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
        self.ctx.stats.chunk_request();
        // Not flushed: a replayed chunk request after a crash only costs bandwidth.
        store
            .set_counter(m, "chunks", req.ctr)
            .map_err(|e| e.to_string())?;
        let now_std = std::time::Instant::now();
        if now_std.duration_since(self.budgets_swept_at.into_std()) >= BUDGET_SWEEP {
            self.budgets.retain(|_, b| !b.is_idle(now_std));
            self.budgets_swept_at = Instant::now();
        }
        let limits = self.ctx.limits;
        let budget = self
            .budgets
            .entry(m.clone())
            .or_insert_with(|| ChunkBudget::new(&limits, now_std));
        if !budget.admit_request(now_std) {
            // Dropped, not answered: an honest machine re-requests after its timeout.
            return Err("over its chunk request rate; request dropped".into());
        }
        let own_topic = self.ctx.topics.machine_chunks(m);
        // Only artifacts of releases assigned to this machine; anything else looks unknown,
        // so the answer tells nothing about which artifacts exist.
        let allowed = store
            .machine_artifacts(m)
            .map_err(|e| e.to_string())?
            .contains(&req.artifact);
        let info = match store.artifact(&req.artifact).map_err(|e| e.to_string())? {
            Some(i) if allowed && self.ctx.files.exists(&req.artifact) => i,
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
            let files = self.ctx.files.clone();
            let artifact = req.artifact;
            let manifest = match blocking(move || files.read_manifest(&artifact)).await {
                Ok(m) => m,
                Err(e) => {
                    self.error_frame(&own_topic, req.artifact, "manifest unreadable")
                        .await;
                    return Err(e);
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
        if now.duration_since(self.swept_at) >= BROADCAST_WINDOW {
            // Forget machines (and artifacts) nobody fetched lately, not only for this artifact.
            self.requesters.retain(|_, ms| {
                ms.retain(|_, t| now.duration_since(*t) < BROADCAST_WINDOW);
                !ms.is_empty()
            });
            self.swept_at = now;
        }
        let machines = self.requesters.entry(req.artifact).or_default();
        machines.insert(m.clone(), now);
        machines.retain(|_, t| now.duration_since(*t) < BROADCAST_WINDOW);
        let broadcast = machines.len() >= 2;
        if self.broadcast_at.len() > 100_000 {
            self.broadcast_at
                .retain(|_, t| now.duration_since(*t) < REBROADCAST_AFTER);
        }
        let broadcast_topic = self.ctx.topics.artifact_chunks(&req.artifact);
        let wanted = req.indices().count() as u32;
        let budget = self.budgets.get_mut(m).expect("inserted above");
        let admitted = budget.admit_chunks(wanted, layout.chunk_size, now_std);
        if admitted < wanted {
            tracing::debug!(machine = %m, wanted, admitted, "chunk byte budget: serving part of a request");
        }
        for index in req.indices().take(admitted as usize) {
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
            let files = self.ctx.files.clone();
            let artifact = req.artifact;
            let frame = match blocking(move || chunk_frame(&files, artifact, &layout, index)).await
            {
                Ok(frame) => frame,
                Err(e) => {
                    self.error_frame(&own_topic, req.artifact, "artifact unreadable")
                        .await;
                    return Err(e);
                }
            };
            let topic = topic.clone();
            self.send(&topic, frame).await?;
        }
        Ok(())
    }

    async fn send(&self, topic: &str, frame: Vec<u8>) -> Result<(), String> {
        let broadcast = topic.ends_with("/chunks") && !topic.contains("/machines/");
        self.ctx.stats.frame_sent(frame.len(), broadcast);
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

#[cfg(test)]
mod tests {
    use super::*;
    use fleetcast_proto::admin::ArtifactInfo;
    use fleetcast_proto::auth::Secret;
    use fleetcast_proto::Kind;

    struct Fixture {
        _dir: tempfile::TempDir,
        /// Kept so the client's request queue stays open; never polled.
        _eventloop: rumqttc::EventLoop,
        ctx: Arc<Ctx>,
        secret: Secret,
    }

    fn fixture() -> Fixture {
        let dir = tempfile::tempdir().unwrap();
        let (mqtt, eventloop) =
            rumqttc::AsyncClient::new(rumqttc::MqttOptions::new("t", "127.0.0.1", 1), 4096);
        let ctx = Arc::new(Ctx::for_tests(dir.path(), mqtt));
        let secret = Secret::from_bytes([7; 32]);
        for m in ["vm-1", "vm-2"] {
            ctx.store
                .put_secret(&MachineId::new(m).unwrap(), &secret)
                .unwrap();
        }
        Fixture {
            _dir: dir,
            _eventloop: eventloop,
            ctx,
            secret,
        }
    }

    fn add_artifact(ctx: &Ctx, seed: u8) -> ArtifactId {
        let bytes: Vec<u8> = (0..3000u32).map(|i| (i as u8) ^ seed).collect();
        let id = ArtifactId::of(&bytes);
        let mut up = ctx
            .files
            .begin_upload(id, bytes.len() as u64, 1024)
            .unwrap();
        for i in 0..up.layout.chunks {
            let (s, l) = (up.layout.offset(i) as usize, up.layout.chunk_len(i));
            up.write_part(i, &bytes[s..s + l]).unwrap();
        }
        ctx.files.commit(up).unwrap();
        ctx.store
            .put_artifact(&ArtifactInfo {
                id,
                kind: Kind::new("app").unwrap(),
                version: format!("1.{seed}"),
                name: "a".into(),
                size: bytes.len() as u64,
                chunk_size: 1024,
                notes: None,
                uploaded_at_ms: 0,
            })
            .unwrap();
        // Released to vm-1 and vm-2 (one kind per artifact, so both can be current).
        let mut release = crate::fixtures::release(&format!("r-{seed}"), &format!("1.{seed}"));
        release.kind = Kind::new(format!("app{seed}")).unwrap();
        release.artifact.id = id;
        ctx.store.put_release(&release).unwrap();
        for m in ["vm-1", "vm-2"] {
            let m = MachineId::new(m).unwrap();
            ctx.store
                .set_current(&m, &release.kind, &release.id)
                .unwrap();
        }
        id
    }

    fn server(ctx: &Arc<Ctx>) -> ChunkServer {
        ChunkServer {
            ctx: ctx.clone(),
            ctrs: HashMap::new(),
            budgets: HashMap::new(),
            budgets_swept_at: Instant::now(),
            requesters: HashMap::new(),
            broadcast_at: HashMap::new(),
            swept_at: Instant::now(),
        }
    }

    fn request(f: &Fixture, m: &str, ctr: u64, artifact: ArtifactId) -> Vec<u8> {
        let req = ChunkRequest {
            machine: MachineId::new(m).unwrap(),
            ctr,
            artifact,
            // Chunks only: the chunk read is the first thing that touches the disk.
            manifest: false,
            chunks: vec![(0, 3)],
        };
        f.secret.seal(Purpose::ChunkRequest, &req)
    }

    #[test]
    fn a_slow_chunk_read_does_not_stall_the_runtime() {
        let f = fixture();
        let artifact = add_artifact(&f.ctx, 1);
        let payload = request(&f, "vm-1", 1, artifact);
        // A disk that does not answer: the open-file cache is held until the runtime's other
        // task says so. A read done inline would stop that task from ever running.
        let (held_tx, held_rx) = std::sync::mpsc::channel();
        let (release_tx, release_rx) = std::sync::mpsc::channel::<()>();
        let files = f.ctx.files.clone();
        let holder = std::thread::spawn(move || {
            let _cache = files.hold_open_files();
            held_tx.send(()).unwrap();
            let _ = release_rx.recv();
        });
        held_rx.recv().unwrap();
        let (done_tx, done_rx) = std::sync::mpsc::channel();
        let ctx = f.ctx.clone();
        let release = release_tx.clone();
        let runtime = std::thread::spawn(move || {
            let rt = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
                .unwrap();
            let result = rt.block_on(async move {
                let mut server = server(&ctx);
                let m = MachineId::new("vm-1").unwrap();
                let serving = tokio::spawn(async move { server.handle(&m, &payload).await });
                tokio::task::yield_now().await;
                let _ = release.send(());
                serving.await.unwrap()
            });
            let _ = done_tx.send(result);
        });
        match done_rx.recv_timeout(Duration::from_secs(20)) {
            Ok(result) => result.unwrap(),
            Err(_) => {
                let _ = release_tx.send(());
                panic!("the chunk server blocked the runtime while reading");
            }
        }
        runtime.join().unwrap();
        holder.join().unwrap();
    }

    #[tokio::test]
    async fn machines_that_stopped_fetching_are_forgotten_for_every_artifact() {
        let f = fixture();
        let (a, b) = (add_artifact(&f.ctx, 1), add_artifact(&f.ctx, 2));
        let mut server = server(&f.ctx);
        let (vm1, vm2) = (
            MachineId::new("vm-1").unwrap(),
            MachineId::new("vm-2").unwrap(),
        );
        server
            .handle(&vm1, &request(&f, "vm-1", 1, a))
            .await
            .unwrap();
        server
            .handle(&vm2, &request(&f, "vm-2", 1, a))
            .await
            .unwrap();
        assert_eq!(server.requesters[&a].len(), 2);
        // The window passes (moved back rather than waited for).
        let past = Instant::now()
            .checked_sub(BROADCAST_WINDOW + Duration::from_secs(1))
            .unwrap();
        server.swept_at = past;
        for t in server.requesters.get_mut(&a).unwrap().values_mut() {
            *t = past;
        }
        server
            .handle(&vm1, &request(&f, "vm-1", 2, b))
            .await
            .unwrap();
        assert!(
            !server.requesters.contains_key(&a),
            "{:?}",
            server.requesters.keys()
        );
        assert_eq!(server.requesters[&b].len(), 1);
    }

    #[tokio::test]
    async fn unknown_artifacts_bad_ranges_and_replays_are_refused() {
        let f = fixture();
        let a = add_artifact(&f.ctx, 1);
        let mut server = server(&f.ctx);
        let vm1 = MachineId::new("vm-1").unwrap();
        let err = server
            .handle(&vm1, &request(&f, "vm-1", 1, ArtifactId::of(b"nope")))
            .await
            .unwrap_err();
        assert!(err.contains("unknown artifact"), "{err}");
        let bad = ChunkRequest {
            machine: vm1.clone(),
            ctr: 2,
            artifact: a,
            manifest: false,
            chunks: vec![(2, 4)],
        };
        let err = server
            .handle(&vm1, &f.secret.seal(Purpose::ChunkRequest, &bad))
            .await
            .unwrap_err();
        assert!(err.contains("beyond 3 chunks"), "{err}");
        let err = server
            .handle(&vm1, &request(&f, "vm-1", 2, a))
            .await
            .unwrap_err();
        assert!(err.contains("replayed"), "{err}");
        let err = server
            .handle(&vm1, &request(&f, "vm-2", 3, a))
            .await
            .unwrap_err();
        assert!(err.contains("body names machine vm-2"), "{err}");
        server
            .handle(&vm1, &request(&f, "vm-1", 3, a))
            .await
            .unwrap();
    }
}
