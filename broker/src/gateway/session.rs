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
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;

use super::frames::{self, FrameError};
use super::limit::Limiter;
use super::Shared;

/// Read size on both pumps. Chunk frames are 64 KiB: one read carries several.
const READ_SIZE: usize = 256 * 1024;

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
    let _registered = shared.registry.register(&username, stop.clone());
    tracing::debug!(%peer, client = %client_id, "gateway session open");
    let session = Session {
        shared: &shared,
        principal: &principal,
        client_id: &client_id,
    };
    let end = tokio::select! {
        _ = stop.cancelled() => End::Closed("kicked or shut down"),
        e = session.client_to_broker(&mut client_rd, up_wr, buf) => e,
        e = broker_to_client(up_rd, &mut client_wr) => e,
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
            // Reuses the allocation once the forwarded bytes are gone; a large packet grows it.
            buf.reserve(READ_SIZE);
            match rd.read_buf(&mut buf).await {
                Ok(0) => return End::Closed("client closed"),
                Ok(_) => {}
                Err(e) => return e.into(),
            }
        }
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

/// Broker -> client: a plain copy. The broker only delivers what the checked subscriptions
/// match, so nothing here needs parsing.
async fn broker_to_client<R, W>(mut rd: R, wr: &mut W) -> End
where
    R: AsyncRead + Unpin,
    W: AsyncWrite + Unpin,
{
    let mut buf = vec![0u8; READ_SIZE];
    loop {
        let n = match rd.read(&mut buf).await {
            Ok(0) => return End::Closed("broker closed"),
            Ok(n) => n,
            Err(e) => return e.into(),
        };
        // flush: TLS keeps records in its buffer until flushed; plain TCP ignores it.
        if let Err(e) = async {
            wr.write_all(&buf[..n]).await?;
            wr.flush().await
        }
        .await
        {
            return e.into();
        }
    }
}
