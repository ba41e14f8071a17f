//! Handing each session's packets to rumqttd's router without ever blocking tokio's workers.
//!
//! rumqttd's channel to its router is bounded ([`ROUTER_QUEUE`] events) and `LinkTx::send`
//! blocks the calling thread while it is full. Called from sessions' tasks, it blocked tokio's
//! workers whenever the router fell behind (10,000 machines coming online), and with them
//! every other session: pings went unanswered, agents reconnected, the router fell further
//! behind. So a session sends inline only while the channel is less than half full and it has
//! nothing waiting at the feeder; otherwise its packets go to one feeder thread, which is the
//! only thread that may wait for the router. Sessions wait asynchronously for room in the
//! queue to it (backpressure to their sockets), and each session's packets keep their order.
//! (Always going through the thread cost a thread hop per packet batch: 1,000-machine
//! rollouts took 2-3 times as long.)

use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::Arc;

use rumqttd::local::LinkTx;
use rumqttd::protocol::Packet;
use tokio::sync::{mpsc, oneshot, Mutex};

use crate::embedded::{Links, ROUTER_QUEUE};

/// Queued hand-overs (each a batch of one session's packets) before sessions wait.
const QUEUE: usize = 8192;
/// Sessions send inline only below this many events in the router's channel: no burst of
/// inline sends from the runtime's few workers can fill the rest.
const INLINE_BELOW: usize = ROUTER_QUEUE / 2;

/// One session's sending half, shared by the session (inline) and the feeder.
struct Link {
    tx: Mutex<LinkTx>,
    /// Batches of this session queued at the feeder and not yet sent.
    pending: AtomicUsize,
}

enum Feed {
    Open(u64, Arc<Link>),
    Packets(u64, Vec<Packet>),
    /// The session's last packets are with the router: forget it, then say so.
    Close(u64, Option<oneshot::Sender<()>>),
}

/// The queue to the feeding thread; cheap to clone.
#[derive(Clone)]
pub(crate) struct Feeder {
    tx: mpsc::Sender<Feed>,
    next: Arc<AtomicU64>,
    links: Links,
}

impl Feeder {
    /// Starts the thread; it ends when every [`Feeder`] and [`ToRouter`] is gone.
    pub(crate) fn start(links: Links) -> std::io::Result<Self> {
        let (tx, mut rx) = mpsc::channel::<Feed>(QUEUE);
        let runtime = tokio::runtime::Builder::new_current_thread().build()?;
        std::thread::Builder::new()
            .name("gateway-feeder".into())
            .spawn(move || {
                let mut open: HashMap<u64, Arc<Link>> = HashMap::new();
                while let Some(feed) = rx.blocking_recv() {
                    match feed {
                        Feed::Open(id, link) => {
                            open.insert(id, link);
                        }
                        Feed::Packets(id, packets) => {
                            let Some(link) = open.get(&id) else {
                                continue;
                            };
                            let sent = runtime.block_on(send(&link.tx, packets));
                            link.pending.fetch_sub(1, Ordering::AcqRel);
                            if !sent {
                                open.remove(&id);
                            }
                        }
                        Feed::Close(id, done) => {
                            open.remove(&id);
                            if let Some(done) = done {
                                let _ = done.send(());
                            }
                        }
                    }
                }
            })?;
        Ok(Self {
            tx,
            next: Arc::new(AtomicU64::new(0)),
            links,
        })
    }

    /// Takes over a session's sending half.
    pub(crate) async fn attach(&self, tx: LinkTx) -> ToRouter {
        let id = self.next.fetch_add(1, Ordering::Relaxed);
        let link = Arc::new(Link {
            tx: Mutex::new(tx),
            pending: AtomicUsize::new(0),
        });
        let _ = self.tx.send(Feed::Open(id, link.clone())).await;
        ToRouter {
            id,
            link,
            feeder: self.clone(),
            closed: false,
        }
    }
}

/// Pushes `packets` into the session's buffer and wakes the router once (blocking while its
/// channel is full); false once the router is gone.
async fn send(tx: &Mutex<LinkTx>, mut packets: Vec<Packet>) -> bool {
    let Some(last) = packets.pop() else {
        return true;
    };
    let mut tx = tx.lock().await;
    tx.buffer().extend(packets);
    tx.send(last).await.is_ok()
}

/// One session's way to the router.
pub(crate) struct ToRouter {
    id: u64,
    link: Arc<Link>,
    feeder: Feeder,
    closed: bool,
}

impl ToRouter {
    /// Hands `packets` to the router, in order: inline while the router keeps up, else through
    /// the feeder. False once the router or the feeder is gone.
    pub(crate) async fn send(&mut self, packets: Vec<Packet>) -> bool {
        if packets.is_empty() {
            return true;
        }
        let inline = self.link.pending.load(Ordering::Acquire) == 0
            && self.feeder.links.router_queue() < INLINE_BELOW;
        if inline {
            return send(&self.link.tx, packets).await;
        }
        self.link.pending.fetch_add(1, Ordering::AcqRel);
        let queued = self.feeder.tx.send(Feed::Packets(self.id, packets)).await;
        if queued.is_err() {
            self.link.pending.fetch_sub(1, Ordering::AcqRel);
        }
        queued.is_ok()
    }

    /// Hands `packets` on and then ends this session's sending half. Returns once they are
    /// with the router, so whatever the caller does next (a new session with the same client
    /// id: `Registry::claim`) reaches the router after them. (Returning once they were only
    /// queued at the feeder let a take-over's CONNECT overtake the old session's DISCONNECT:
    /// rumqttd then dropped the old session itself, logging "Duplicate client_id".)
    pub(crate) async fn close_after(mut self, packets: Vec<Packet>) {
        self.send(packets).await;
        self.closed = true;
        let (done, sent) = oneshot::channel();
        if self
            .feeder
            .tx
            .send(Feed::Close(self.id, Some(done)))
            .await
            .is_ok()
        {
            let _ = sent.await;
        }
    }
}

impl Drop for ToRouter {
    fn drop(&mut self) {
        if !self.closed {
            // Best effort: a full queue leaves the link to the feeder until the router drops it.
            let _ = self.feeder.tx.try_send(Feed::Close(self.id, None));
        }
    }
}
