//! One client connection through the gateway: CONNECT checked and rewritten, then two pumps in
//! one task: client -> broker framed and checked packet by packet, broker -> client a plain copy.

use std::net::SocketAddr;
use std::sync::Arc;

use bytes::{Buf, BytesMut};
use fleetcast_proto::acl::Principal;
use rumqttc::mqttbytes::v4::{Connect, ConnectReturnCode};
use rumqttc::mqttbytes::PacketType;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio::sync::mpsc;
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;

use super::buffer::ReadBuf;
use super::fanout;
use super::frames::{self, FrameError};
use super::limit::Limiter;
use super::Shared;
use crate::client::MAX_PACKET;

/// Room made for each read from a client; a bigger packet grows the buffer as it arrives.
const CLIENT_READ: usize = 4 * 1024;
/// A client buffer above this is given back once everything in it was forwarded.
const CLIENT_KEEP: usize = 64 * 1024;

/// How a session ended (for the log).
#[derive(Debug, thiserror::Error)]
enum End {
    /// Either side closed, or the gateway shut down / kicked the session.
    #[error("closed: {0}")]
    Closed(&'static str),
    #[error("i/o: {0}")]
    Io(#[from] std::io::Error),
    #[error("{0}")]
    Frame(FrameError),
    /// The principal published or subscribed where it may not.
    #[error("{what} on {topic:?} not allowed")]
    Violation { what: &'static str, topic: String },
}

/// Serves one accepted client stream (TLS already done) until either side closes, a rule is
/// broken, the session is kicked, or `shutdown`. `deadline` bounds the wait for CONNECT.
pub(super) async fn serve<S>(
    shared: Arc<Shared>,
    client: S,
    peer: SocketAddr,
    deadline: Instant,
    shutdown: CancellationToken,
) where
    S: AsyncRead + AsyncWrite + Unpin + Send,
{
    let (mut client_rd, mut client_wr) = tokio::io::split(client);
    let mut buf = BytesMut::with_capacity(8 * 1024);
    let connect = tokio::select! {
        _ = shutdown.cancelled() => return,
        c = tokio::time::timeout_at(deadline, read_connect(&mut client_rd, &mut buf)) => c,
    };
    let connect = match connect {
        Err(_) => {
            tracing::debug!(%peer, "no CONNECT in time: closed");
            return;
        }
        Ok(Err(e)) => {
            tracing::debug!(%peer, error = %e, "bad first packet: closed");
            return;
        }
        Ok(Ok(c)) => c,
    };
    let client_id = connect.client_id.clone();
    let principal = match admit(&shared, &connect, peer).await {
        Ok(p) => p,
        Err(code) => {
            shared.registry.refused();
            return refuse(&mut client_wr, code).await;
        }
    };
    let upstream = tokio::time::timeout(shared.connect_timeout, connect_upstream(&shared, connect));
    let upstream = match upstream.await.unwrap_or_else(|_| {
        Err(std::io::Error::new(
            std::io::ErrorKind::TimedOut,
            "internal broker did not accept",
        ))
    }) {
        Ok(s) => s,
        Err(e) => {
            tracing::warn!(client = %client_id, error = %e, "gateway cannot reach the internal broker");
            return refuse(&mut client_wr, ConnectReturnCode::ServiceUnavailable).await;
        }
    };
    let (up_rd, up_wr) = upstream.into_split();
    let username = principal.username();
    let stop = shutdown.child_token();
    let registered = shared.registry.register(&username, stop.clone());
    tracing::debug!(%peer, client = %client_id, "gateway session open");
    let (inject, injected) = mpsc::channel(fanout::SESSION_QUEUE);
    let session = Session {
        shared: &shared,
        principal: &principal,
        client_id: &client_id,
        id: registered.id(),
        inject,
    };
    let end = tokio::select! {
        _ = stop.cancelled() => End::Closed("kicked or shut down"),
        e = session.client_to_broker(&mut client_rd, up_wr, buf) => e,
        e = broker_to_client(up_rd, &mut client_wr, injected) => e,
    };
    match end {
        End::Violation { what, topic } => {
            shared.registry.violation();
            tracing::warn!(%peer, client = %client_id, user = %username, what, topic = %topic,
                "gateway closed a session: not allowed for this principal");
        }
        other => tracing::debug!(%peer, client = %client_id, end = %other, "gateway session ended"),
    }
    // Dropping both halves closes the client socket; the upstream socket closes with its halves.
}

/// Reads until the first whole packet, which must be a CONNECT.
async fn read_connect<R: AsyncRead + Unpin>(
    rd: &mut R,
    buf: &mut BytesMut,
) -> Result<Connect, End> {
    loop {
        if let Some(c) = frames::take_connect(buf).map_err(End::Frame)? {
            return Ok(c);
        }
        buf.reserve(8 * 1024);
        if rd.read_buf(buf).await? == 0 {
            return Err(End::Closed("before CONNECT"));
        }
    }
}

/// Decides on a CONNECT: the principal, or the CONNACK code that refuses it.
async fn admit(
    shared: &Shared,
    connect: &Connect,
    peer: SocketAddr,
) -> Result<Principal, ConnectReturnCode> {
    let client_id = &connect.client_id;
    if connect.protocol != rumqttc::mqttbytes::Protocol::V4 {
        return Err(ConnectReturnCode::RefusedProtocolVersion);
    }
    let Some(login) = connect.login.clone() else {
        tracing::info!(%peer, client = %client_id, "gateway refused a CONNECT without credentials");
        return Err(ConnectReturnCode::NotAuthorized);
    };
    let auth = shared.auth.clone();
    let username = login.username.clone();
    // The platform's authenticator reads its store: keep it off the async workers.
    let principal = tokio::task::spawn_blocking(move || {
        auth.authenticate(&login.username, login.password.as_bytes())
    })
    .await
    .ok()
    .flatten();
    let Some(principal) = principal else {
        tracing::info!(%peer, client = %client_id, user = %username, "gateway refused bad credentials");
        return Err(ConnectReturnCode::BadUserNamePassword);
    };
    if !principal.accepts_client_id(client_id) {
        tracing::warn!(%peer, client = %client_id, user = %username,
            "gateway refused a client id this principal may not use");
        return Err(ConnectReturnCode::NotAuthorized);
    }
    if let Some(will) = &connect.last_will {
        if !principal.may_publish(&shared.topics, client_id, &will.topic) {
            shared.registry.violation();
            tracing::warn!(%peer, client = %client_id, user = %username, topic = %will.topic,
                "gateway refused a will on a topic this principal may not publish");
            return Err(ConnectReturnCode::NotAuthorized);
        }
    }
    Ok(principal)
}

/// Answers with a refusing CONNACK and closes.
async fn refuse<W: AsyncWrite + Unpin>(client: &mut W, code: ConnectReturnCode) {
    let _ = client.write_all(&frames::refusal(code)).await;
    let _ = client.flush().await;
    let _ = client.shutdown().await;
}

/// Dials the internal broker and sends the CONNECT with the internal credentials.
async fn connect_upstream(shared: &Shared, connect: Connect) -> std::io::Result<TcpStream> {
    let password = shared.internal.token(&connect.client_id);
    let wire = frames::upstream_connect(connect, &password)
        .map_err(|e| std::io::Error::new(std::io::ErrorKind::InvalidData, e))?;
    let mut upstream = TcpStream::connect(shared.upstream).await?;
    upstream.set_nodelay(true)?;
    upstream.write_all(&wire).await?;
    Ok(upstream)
}

struct Session<'a> {
    shared: &'a Shared,
    principal: &'a Principal,
    client_id: &'a str,
    /// The registry's id of this session (fan-out subscriptions are keyed by it).
    id: u64,
    /// Where fanned-out chunk frames for this session are queued.
    inject: mpsc::Sender<bytes::Bytes>,
}

impl Session<'_> {
    /// Client -> broker: frames the stream, checks each packet, forwards the raw bytes of every
    /// allowed one (several per write when they arrive together), stops at the first violation.
    /// A rate limit delays forwarding, and so reading.
    async fn client_to_broker<R, W>(&self, rd: &mut R, mut wr: W, mut buf: BytesMut) -> End
    where
        R: AsyncRead + Unpin,
        W: AsyncWrite + Unpin,
    {
        let mut limiter = self
            .shared
            .limits
            .for_principal(self.principal)
            .map(|l| Limiter::new(l, Instant::now()));
        loop {
            // `checked` bytes at the front of `buf` are whole, allowed packets.
            let mut checked = 0;
            loop {
                let frame = match frames::next_frame(&buf[checked..]) {
                    Ok(Some(f)) => f,
                    Ok(None) => break,
                    Err(e) => return End::Frame(e),
                };
                let bytes = &buf[checked..checked + frame.len];
                if let Err(violation) = self.check(frame.kind, bytes).await {
                    // Forward what was allowed before it, then close.
                    let _ = wr.write_all(&buf[..checked]).await;
                    return violation;
                }
                if let Some(limiter) = limiter.as_mut() {
                    let counted = matches!(
                        frame.kind,
                        PacketType::Publish | PacketType::Subscribe | PacketType::Unsubscribe
                    );
                    let wait = limiter.take(frame.len, counted, Instant::now());
                    if !wait.is_zero() {
                        if let Err(e) = wr.write_all(&buf[..checked]).await {
                            return e.into();
                        }
                        buf.advance(checked);
                        checked = 0;
                        tokio::time::sleep(wait).await;
                    }
                }
                checked += frame.len;
            }
            if checked > 0 {
                if let Err(e) = wr.write_all(&buf[..checked]).await {
                    return e.into();
                }
                buf.advance(checked);
            }
            // Reuses the allocation once the forwarded bytes are gone; a large packet (an
            // upload part) grows it, and it is given back once that packet has gone through.
            if buf.is_empty() && buf.capacity() > CLIENT_KEEP {
                buf = BytesMut::with_capacity(CLIENT_READ);
            }
            buf.reserve(CLIENT_READ);
            match rd.read_buf(&mut buf).await {
                Ok(0) => return End::Closed("client closed"),
                Ok(_) => {}
                Err(e) => return e.into(),
            }
        }
    }

    /// Whether the gateway delivers what is published on `filter` itself (an artifact's chunk
    /// topic, named exactly, and the integrators' live event topic).
    fn is_fanned_out(&self, filter: &str) -> bool {
        matches!(
            self.shared.topics.parse(filter),
            Some(fleetcast_proto::Route::ArtifactChunks(_) | fleetcast_proto::Route::Events)
        )
    }

    /// Whether one whole packet may pass.
    async fn check(&self, kind: PacketType, frame: &[u8]) -> Result<(), End> {
        let (shared, principal, client_id) = (self.shared, self.principal, self.client_id);
        match kind {
            PacketType::Publish => {
                let topic = frames::publish_topic(frame).map_err(End::Frame)?;
                if !principal.may_publish(&shared.topics, client_id, topic) {
                    return Err(End::Violation {
                        what: "publish",
                        topic: topic.to_owned(),
                    });
                }
            }
            PacketType::Subscribe => {
                let filters = frames::subscribe_filters(frame).map_err(End::Frame)?;
                if let Some(f) = filters
                    .iter()
                    .find(|f| !principal.may_subscribe(&shared.topics, client_id, f))
                {
                    return Err(End::Violation {
                        what: "subscribe",
                        topic: f.clone(),
                    });
                }
                let auth = shared.auth.clone();
                let who = principal.clone();
                // The dynamic check may read the platform's store, like `authenticate`.
                let refused = tokio::task::spawn_blocking(move || {
                    filters.into_iter().find(|f| !auth.may_subscribe(&who, f))
                })
                .await
                .unwrap_or_else(|_| Some("(authenticator panicked)".to_owned()));
                if let Some(f) = refused {
                    return Err(End::Violation {
                        what: "subscribe (dynamic check)",
                        topic: f,
                    });
                }
                for f in frames::subscribe_filters(frame).map_err(End::Frame)? {
                    if self.is_fanned_out(&f) {
                        let username = self.principal.username();
                        shared
                            .registry
                            .fanout
                            .subscribe(&f, self.id, &username, &self.inject);
                    }
                }
            }
            PacketType::Unsubscribe => {
                for f in frames::unsubscribe_filters(frame).map_err(End::Frame)? {
                    if self.is_fanned_out(&f) {
                        shared.registry.fanout.unsubscribe(&f, self.id);
                    }
                }
            }
            PacketType::Connect => {
                return Err(End::Frame(FrameError::Malformed(
                    "a second CONNECT".to_owned(),
                )))
            }
            _ => {}
        }
        Ok(())
    }
}

/// Broker -> client: the broker's bytes as they come, cut only at packet boundaries so that
/// chunk frames the gateway delivers itself ([`fanout`]) can go in between. The broker only
/// delivers what the checked subscriptions match, so nothing here is checked.
async fn broker_to_client<R, W>(
    mut rd: R,
    wr: &mut W,
    mut injected: mpsc::Receiver<bytes::Bytes>,
) -> End
where
    R: AsyncRead + Unpin,
    W: AsyncWrite + Unpin,
{
    let mut buf = ReadBuf::default();
    // The start of a packet the broker has not finished sending.
    let mut partial = BytesMut::new();
    loop {
        let written = tokio::select! {
            read = buf.read_from(&mut rd) => {
                let bytes = match read {
                    Ok([]) => return End::Closed("broker closed"),
                    Ok(bytes) => bytes,
                    Err(e) => return e.into(),
                };
                if partial.is_empty() {
                    // Usual case: write the whole packets straight from the read buffer.
                    let whole = match whole_packets(bytes) {
                        Ok(n) => n,
                        Err(e) => return End::Frame(e),
                    };
                    partial.extend_from_slice(&bytes[whole..]);
                    wr.write_all(&bytes[..whole]).await
                } else {
                    partial.extend_from_slice(bytes);
                    let whole = match whole_packets(&partial) {
                        Ok(n) => n,
                        Err(e) => return End::Frame(e),
                    };
                    let packets = partial.split_to(whole);
                    if partial.is_empty() && partial.capacity() > 64 * 1024 {
                        partial = BytesMut::new();
                    }
                    wr.write_all(&packets).await
                }
            }
            Some(frame) = injected.recv() => {
                // Between whole packets: the partial one waits in `partial`.
                let mut r = wr.write_all(&frame).await;
                while r.is_ok() {
                    match injected.try_recv() {
                        Ok(frame) => r = wr.write_all(&frame).await,
                        Err(_) => break,
                    }
                }
                r
            }
        };
        // flush: TLS keeps records in its buffer until flushed; plain TCP ignores it.
        if let Err(e) = async {
            written?;
            wr.flush().await
        }
        .await
        {
            return e.into();
        }
    }
}

/// How many bytes at the front of `bytes` are whole MQTT packets.
fn whole_packets(bytes: &[u8]) -> Result<usize, FrameError> {
    let mut at = 0;
    // The broker already enforced its limits: only protect against nonsense lengths.
    while let Some(frame) = frames::next_frame_within(&bytes[at..], 4 * MAX_PACKET)? {
        // `next_frame` answers only for a packet wholly in the slice.
        at += frame.len;
    }
    Ok(at)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    fn packets(mut bytes: &[u8]) -> Vec<Vec<u8>> {
        let mut out = Vec::new();
        while let Some(f) = frames::next_frame(bytes).unwrap() {
            out.push(bytes[..f.len].to_vec());
            bytes = &bytes[f.len..];
        }
        assert!(bytes.is_empty(), "a torn packet at the end");
        out
    }

    #[tokio::test]
    async fn a_delivered_frame_goes_between_whole_packets_of_the_broker_stream() {
        let (mut broker, broker_side) = tokio::io::duplex(1 << 20);
        let (mut client_side, mut client) = tokio::io::duplex(1 << 20);
        let (inject, injected) = mpsc::channel(4);
        let pump =
            tokio::spawn(
                async move { broker_to_client(broker_side, &mut client_side, injected).await },
            );
        let first = frames::qos0_publish("fleet/machines/m/release/app", &[1; 100]).unwrap();
        let big = frames::qos0_publish("fleet/machines/m/status/ack", &[2; 70_000]).unwrap();
        let delivered = frames::qos0_publish("fleet/artifacts/a/chunks", &[3; 5000]).unwrap();
        // The broker sends one whole packet and half of the next; a frame is delivered while
        // the second half is still on its way.
        let half = big.len() / 2;
        broker.write_all(&first).await.unwrap();
        broker.write_all(&big[..half]).await.unwrap();
        tokio::time::sleep(Duration::from_millis(50)).await;
        inject.send(delivered.clone()).await.unwrap();
        tokio::time::sleep(Duration::from_millis(50)).await;
        broker.write_all(&big[half..]).await.unwrap();
        drop(broker);
        let end = pump.await.unwrap();
        assert!(matches!(end, End::Closed(_)), "{end}");
        let mut got = Vec::new();
        client.read_to_end(&mut got).await.unwrap();
        assert_eq!(
            packets(&got),
            vec![first.to_vec(), delivered.to_vec(), big.to_vec()]
        );
    }
}
