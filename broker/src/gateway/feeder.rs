//! One thread that hands every session's packets to rumqttd's router.
//!
//! Why a thread: rumqttd's channel to its router is bounded (1,000 wake-ups) and
//! `LinkTx::send` blocks the calling thread while it is full. Called from a session's task it
//! blocked tokio's workers whenever the router fell behind (10,000 machines coming online), and
//! with them every other session: pings went unanswered, agents reconnected, the router fell
//! further behind. Here only this thread waits; sessions wait asynchronously for room in the
//! queue to it (backpressure to their sockets), and each session's packets keep their order.

use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;

use rumqttd::local::LinkTx;
use rumqttd::protocol::Packet;
use tokio::sync::mpsc;

/// Queued hand-overs (each a batch of one session's packets) before sessions wait.
const QUEUE: usize = 8192;

enum Feed {
    Open(u64, LinkTx),
    Packets(u64, Vec<Packet>),
    Close(u64),
}

/// The queue to the feeding thread; cheap to clone.
#[derive(Clone)]
pub(crate) struct Feeder {
    tx: mpsc::Sender<Feed>,
    next: Arc<AtomicU64>,
}

impl Feeder {
    /// Starts the thread; it ends when every [`Feeder`] and [`ToRouter`] is gone.
    pub(crate) fn start() -> std::io::Result<Self> {
        let (tx, mut rx) = mpsc::channel::<Feed>(QUEUE);
        let runtime = tokio::runtime::Builder::new_current_thread().build()?;
        std::thread::Builder::new()
            .name("gateway-feeder".into())
            .spawn(move || {
                let mut links: HashMap<u64, LinkTx> = HashMap::new();
                while let Some(feed) = rx.blocking_recv() {
                    match feed {
                        Feed::Open(id, link) => {
                            links.insert(id, link);
                        }
                        Feed::Packets(id, mut packets) => {
                            let (Some(link), Some(last)) = (links.get_mut(&id), packets.pop())
                            else {
                                continue;
                            };
                            link.buffer().extend(packets);
                            // Never awaits: it pushes and signals (blocking while full).
                            if runtime.block_on(link.send(last)).is_err() {
                                links.remove(&id);
                            }
                        }
                        Feed::Close(id) => {
                            links.remove(&id);
                        }
                    }
                }
            })?;
        Ok(Self {
            tx,
            next: Arc::new(AtomicU64::new(0)),
        })
    }

    /// Takes over a session's sending half.
    pub(crate) async fn attach(&self, link: LinkTx) -> ToRouter {
        let id = self.next.fetch_add(1, Ordering::Relaxed);
        let _ = self.tx.send(Feed::Open(id, link)).await;
        ToRouter {
            id,
            tx: self.tx.clone(),
            closed: false,
        }
    }
}

/// One session's way to the router.
pub(crate) struct ToRouter {
    id: u64,
    tx: mpsc::Sender<Feed>,
    closed: bool,
}

impl ToRouter {
    /// Queues `packets` for the router, in order; false once the feeder is gone.
    pub(crate) async fn send(&mut self, packets: Vec<Packet>) -> bool {
        if packets.is_empty() {
            return true;
        }
        self.tx.send(Feed::Packets(self.id, packets)).await.is_ok()
    }

    /// Queues `packets` and then the end of this session's sending half.
    pub(crate) async fn close_after(mut self, packets: Vec<Packet>) {
        self.send(packets).await;
        self.closed = true;
        let _ = self.tx.send(Feed::Close(self.id)).await;
    }
}

impl Drop for ToRouter {
    fn drop(&mut self) {
        if !self.closed {
            // Best effort: a full queue leaves the link to the feeder until the router drops it.
            let _ = self.tx.try_send(Feed::Close(self.id));
        }
    }
}
