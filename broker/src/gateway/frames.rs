//! Raw MQTT 3.1.1 frames as the gateway sees them: split a byte stream into whole packets
//! without copying, read a PUBLISH's topic in place, and build the few packets the gateway
//! writes itself (the rewritten CONNECT, a refusing CONNACK). Pure functions over bytes.

use bytes::{Buf, BytesMut};
use rumqttc::mqttbytes::v4::{ConnAck, Connect, ConnectReturnCode, Packet};
use rumqttc::mqttbytes::{self, PacketType};

use crate::client::MAX_PACKET;

/// One whole packet at the front of a buffer.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Frame {
    pub kind: PacketType,
    /// Fixed header + variable header + payload.
    pub len: usize,
}

/// Why a client's bytes cannot be framed: the connection is closed.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum FrameError {
    #[error("malformed packet: {0}")]
    Malformed(String),
    #[error("packet of {0} bytes is over the {1} byte limit")]
    TooLarge(usize, usize),
    /// A CONNECT of another protocol than MQTT 3.1.1 (name `MQTT`, level 4): MQTT 3.1
    /// (`MQIsdp`, 3), MQTT 5 (level 5), or anything else. Answered with CONNACK 1.
    #[error("CONNECT of protocol {name:?} level {level}, not MQTT 3.1.1")]
    Protocol { name: String, level: u8 },
}

/// The packet at the front of `buf`: `Ok(None)` while it is incomplete.
pub fn next_frame(buf: &[u8]) -> Result<Option<Frame>, FrameError> {
    next_frame_within(buf, MAX_PACKET)
}

/// [`next_frame`] with a size limit.
fn next_frame_within(buf: &[u8], limit: usize) -> Result<Option<Frame>, FrameError> {
    match mqttbytes::check(buf.iter(), limit) {
        Ok(header) => {
            let kind = header
                .packet_type()
                .map_err(|e| FrameError::Malformed(e.to_string()))?;
            Ok(Some(Frame {
                kind,
                len: header.frame_length(),
            }))
        }
        Err(mqttbytes::Error::InsufficientBytes(_)) => Ok(None),
        Err(mqttbytes::Error::PayloadSizeLimitExceeded(n)) => Err(FrameError::TooLarge(n, limit)),
        Err(e) => Err(FrameError::Malformed(e.to_string())),
    }
}

/// Length of the fixed header of a whole frame: the type byte and 1 to 4 length bytes.
fn fixed_header_len(frame: &[u8]) -> usize {
    1 + frame[1..]
        .iter()
        .take(4)
        .position(|b| b & 0x80 == 0)
        .map_or(4, |i| i + 1)
}

/// Whether a whole frame of `kind` from a client is what MQTT 3.1.1 allows a client to send,
/// as far as its fixed header and packet id say: the fixed-header flags (§2.2.2: 0b0010 for
/// PUBREL, SUBSCRIBE and UNSUBSCRIBE, 0 for every other packet but PUBLISH), no body on
/// PINGREQ and DISCONNECT (§3.12, §3.14), a non-zero packet id on SUBSCRIBE and UNSUBSCRIBE
/// (§2.3.1), and only packets a client sends (CONNACK, SUBACK, UNSUBACK and PINGRESP go from
/// server to client). The server must close the connection on any of these (§4.8).
pub fn check_client_packet(kind: PacketType, frame: &[u8]) -> Result<(), FrameError> {
    let bad = |why: String| Err(FrameError::Malformed(why));
    let flags = frame.first().map_or(0, |b| b & 0x0f);
    let want = match kind {
        PacketType::Publish => return Ok(()),
        PacketType::ConnAck | PacketType::SubAck | PacketType::UnsubAck | PacketType::PingResp => {
            return bad(format!(
                "{kind:?} from a client (a server-to-client packet)"
            ))
        }
        PacketType::PubRel | PacketType::Subscribe | PacketType::Unsubscribe => 0b0010,
        _ => 0,
    };
    if flags != want {
        return bad(format!(
            "{kind:?} with fixed-header flags {flags:#06b} (must be {want:#06b})"
        ));
    }
    match kind {
        PacketType::PingReq | PacketType::Disconnect if frame.len() != 2 => {
            bad(format!("{kind:?} with a body"))
        }
        PacketType::Subscribe | PacketType::Unsubscribe if packet_id(frame) == Some(0) => {
            bad(format!("{kind:?} with packet id 0"))
        }
        _ => Ok(()),
    }
}

/// The packet id that follows the fixed header (PUBACK, SUBSCRIBE, UNSUBSCRIBE, ...), if the
/// frame is long enough to hold one.
fn packet_id(frame: &[u8]) -> Option<u16> {
    let at = fixed_header_len(frame);
    match frame.get(at..at + 2) {
        Some([hi, lo]) => Some(u16::from_be_bytes([*hi, *lo])),
        _ => None,
    }
}

/// The topic of a whole PUBLISH frame, borrowed from it (no allocation on the hot path).
pub fn publish_topic(frame: &[u8]) -> Result<&str, FrameError> {
    let bad = |why: &str| FrameError::Malformed(format!("PUBLISH {why}"));
    let rest = frame
        .get(fixed_header_len(frame)..)
        .ok_or_else(|| bad("too short"))?;
    let [hi, lo, rest @ ..] = rest else {
        return Err(bad("without a topic"));
    };
    let len = usize::from(u16::from_be_bytes([*hi, *lo]));
    let topic = rest
        .get(..len)
        .ok_or_else(|| bad("topic runs past the packet"))?;
    std::str::from_utf8(topic).map_err(|_| bad("topic is not UTF-8"))
}

/// A whole PUBLISH frame's QoS (0, 1 or 2, from its fixed header) and, above 0, its packet id.
pub fn publish_qos_pkid(frame: &[u8]) -> Result<(u8, Option<u16>), FrameError> {
    let qos = frame.first().map(|b| (b >> 1) & 0b11).unwrap_or(0);
    if qos == 0 {
        return Ok((0, None));
    }
    let topic_len = publish_topic(frame)?.len();
    let at = fixed_header_len(frame) + 2 + topic_len;
    match frame.get(at..at + 2) {
        Some([hi, lo]) => Ok((qos, Some(u16::from_be_bytes([*hi, *lo])))),
        _ => Err(FrameError::Malformed(
            "PUBLISH without a packet id".to_owned(),
        )),
    }
}

/// The filters of a whole SUBSCRIBE frame (subscribes are rare: parsing allocates).
pub fn subscribe_filters(frame: &[u8]) -> Result<Vec<String>, FrameError> {
    match Packet::read(&mut BytesMut::from(frame), MAX_PACKET) {
        Ok(Packet::Subscribe(s)) => Ok(s.filters.into_iter().map(|f| f.path).collect()),
        Ok(other) => Err(FrameError::Malformed(format!(
            "expected SUBSCRIBE, parsed {other:?}"
        ))),
        Err(e) => Err(FrameError::Malformed(e.to_string())),
    }
}

/// The filters of a whole UNSUBSCRIBE frame.
pub fn unsubscribe_filters(frame: &[u8]) -> Result<Vec<String>, FrameError> {
    match Packet::read(&mut BytesMut::from(frame), MAX_PACKET) {
        Ok(Packet::Unsubscribe(u)) => Ok(u.topics),
        Ok(other) => Err(FrameError::Malformed(format!(
            "expected UNSUBSCRIBE, parsed {other:?}"
        ))),
        Err(e) => Err(FrameError::Malformed(e.to_string())),
    }
}

/// A whole QoS 0 PUBLISH packet, encoded once and written as is to every receiver.
pub fn qos0_publish(topic: &str, payload: &[u8]) -> Result<bytes::Bytes, FrameError> {
    publish_packet(topic, payload, false)
}

/// [`qos0_publish`] with the retain flag as given (set on a kept message handed to a new
/// subscriber).
pub fn publish_packet(
    topic: &str,
    payload: &[u8],
    retain: bool,
) -> Result<bytes::Bytes, FrameError> {
    let mut publish = rumqttc::mqttbytes::v4::Publish::new(
        topic,
        rumqttc::mqttbytes::QoS::AtMostOnce,
        payload.to_vec(),
    );
    publish.retain = retain;
    let mut out = BytesMut::with_capacity(topic.len() + payload.len() + 8);
    publish
        .write(&mut out)
        .map_err(|e| FrameError::Malformed(e.to_string()))?;
    Ok(out.freeze())
}

/// The largest CONNECT the gateway reads. A fleetcast CONNECT is a client id, a user name, a
/// 32-digit password and a will of a few bytes: well under 1 KiB. Why a bound of its own: a
/// CONNECT comes before any credential is checked, so up to [`MAX_PACKET`] (2 MiB) of it would
/// be held for anyone who opens a connection, for up to the connect timeout, one per socket.
pub const MAX_CONNECT: usize = 16 * 1024;

/// The CONNECT at the front of `buf`, removed from it; `Ok(None)` while it is incomplete.
/// Any other first packet, or a CONNECT over [`MAX_CONNECT`] (as soon as its length is read),
/// is an error; a CONNECT of another protocol version is [`FrameError::Protocol`], read from
/// its protocol name and level before anything else in it (an MQTT 5 CONNECT, with its
/// properties, does not parse as MQTT 3.1.1).
pub fn take_connect(buf: &mut BytesMut) -> Result<Option<Connect>, FrameError> {
    let Some(frame) = next_frame_within(buf, MAX_CONNECT)? else {
        return Ok(None);
    };
    if frame.kind != PacketType::Connect {
        return Err(FrameError::Malformed(format!(
            "first packet is {:?}, not CONNECT",
            frame.kind
        )));
    }
    let (name, level, connect_flags) = connect_protocol(&buf[..frame.len])?;
    if name != b"MQTT" || level != 4 {
        let name = String::from_utf8_lossy(name).into_owned();
        buf.advance(frame.len);
        return Err(FrameError::Protocol { name, level });
    }
    // MQTT 3.1.1 §2.2.2 and §3.1.2.3: the fixed header's flags and the reserved connect flag
    // are 0, or the server closes the connection.
    if buf[0] & 0x0f != 0 || connect_flags & 1 != 0 {
        return Err(FrameError::Malformed(
            "CONNECT with reserved flags set".to_owned(),
        ));
    }
    // Parsed from a copy: the CONNECT's will is kept for the whole session, and a slice of
    // `buf` would keep the session's first read buffer alive beside the one that replaces it
    // (8 KiB more per connected machine, taken the first time its reads outgrew the buffer:
    // `serve` grew 8.5 MB over the first rollouts to 1,000 machines; jemalloc heap profile,
    // 2026-11-28).
    let mut one = BytesMut::from(&buf[..frame.len]);
    buf.advance(frame.len);
    match Packet::read(&mut one, MAX_CONNECT) {
        Ok(Packet::Connect(c)) => Ok(Some(c)),
        Ok(other) => Err(FrameError::Malformed(format!(
            "expected CONNECT, parsed {other:?}"
        ))),
        Err(e) => Err(FrameError::Malformed(e.to_string())),
    }
}

/// A whole CONNECT frame's protocol name, protocol level and connect flags (MQTT 3.1.1 §3.1.2:
/// the first fields of its variable header, in every version of MQTT).
fn connect_protocol(frame: &[u8]) -> Result<(&[u8], u8, u8), FrameError> {
    let bad = || FrameError::Malformed("CONNECT without a protocol name and level".to_owned());
    let rest = frame.get(fixed_header_len(frame)..).ok_or_else(bad)?;
    let [hi, lo, rest @ ..] = rest else {
        return Err(bad());
    };
    let len = usize::from(u16::from_be_bytes([*hi, *lo]));
    let name = rest.get(..len).ok_or_else(bad)?;
    match rest.get(len..) {
        Some([level, flags, ..]) => Ok((name, *level, *flags)),
        // The level, then no flags: refused by its level if that is not 4.
        Some([level]) if *level != 4 => Ok((name, *level, 0)),
        _ => Err(bad()),
    }
}

/// The CONNACK accepting a clean session.
pub fn accepted() -> BytesMut {
    let mut out = BytesMut::with_capacity(4);
    ConnAck::new(ConnectReturnCode::Success, false)
        .write(&mut out)
        .expect("a CONNACK always encodes");
    out
}

/// The PUBACK of the QoS 1 publish `pkid`.
pub fn puback(pkid: u16) -> bytes::Bytes {
    let mut out = BytesMut::with_capacity(4);
    rumqttc::mqttbytes::v4::PubAck::new(pkid)
        .write(&mut out)
        .expect("a PUBACK always encodes");
    out.freeze()
}

/// A CONNACK refusing the connection with `code`.
pub fn refusal(code: ConnectReturnCode) -> BytesMut {
    let mut out = BytesMut::with_capacity(4);
    ConnAck::new(code, false)
        .write(&mut out)
        .expect("a CONNACK always encodes");
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use rumqttc::mqttbytes::v4::{LastWill, Publish, Subscribe};
    use rumqttc::mqttbytes::QoS;

    fn encode(p: Packet) -> BytesMut {
        let mut out = BytesMut::new();
        p.write(&mut out, MAX_PACKET).unwrap();
        out
    }

    #[test]
    fn frames_are_found_whole_and_incomplete_ones_wait_for_more_bytes() {
        let mut bytes = encode(Packet::Publish(Publish::new(
            "a/b",
            QoS::AtMostOnce,
            vec![0u8; 300],
        )));
        bytes.extend_from_slice(&encode(Packet::PingReq));
        let first = next_frame(&bytes).unwrap().unwrap();
        assert_eq!(first.kind, PacketType::Publish);
        assert_eq!(first.len, bytes.len() - 2);
        let second = next_frame(&bytes[first.len..]).unwrap().unwrap();
        assert_eq!((second.kind, second.len), (PacketType::PingReq, 2));
        assert_eq!(next_frame(&bytes[..first.len - 1]).unwrap(), None);
        assert_eq!(next_frame(&bytes[..1]).unwrap(), None);
    }

    #[test]
    fn an_oversized_or_unknown_packet_is_an_error() {
        // PUBLISH announcing 268 MB.
        assert!(matches!(
            next_frame(&[0x30, 0xff, 0xff, 0xff, 0x7f]),
            Err(FrameError::TooLarge(..))
        ));
        assert!(matches!(
            next_frame(&[0x00, 0x00]),
            Err(FrameError::Malformed(_))
        ));
    }

    #[test]
    fn the_publish_topic_is_read_for_every_length_encoding() {
        // 1, 2 and 3 byte remaining lengths.
        for payload in [0, 200, 70_000] {
            for qos in [QoS::AtMostOnce, QoS::AtLeastOnce] {
                let mut p = Publish::new("fleet/machines/vm-1/status", qos, vec![1u8; payload]);
                p.pkid = u16::from(qos != QoS::AtMostOnce);
                let frame = encode(Packet::Publish(p));
                assert_eq!(
                    publish_topic(&frame).unwrap(),
                    "fleet/machines/vm-1/status",
                    "{payload} {qos:?}"
                );
            }
        }
    }

    #[test]
    fn a_publish_whose_topic_runs_past_the_frame_is_malformed() {
        // Remaining length 4: topic length 16 but only 2 bytes follow.
        assert!(publish_topic(&[0x30, 0x04, 0x00, 0x10, b'a', b'b']).is_err());
        assert!(publish_topic(&[0x30, 0x01, 0x00]).is_err());
        assert!(publish_topic(&[0x30, 0x04, 0x00, 0x02, 0xff, 0xfe]).is_err());
    }

    #[test]
    fn subscribe_filters_are_all_listed() {
        let mut s = Subscribe::new("fleet/machines/vm-1/command", QoS::AtLeastOnce);
        s.add("#".to_owned(), QoS::AtMostOnce);
        s.pkid = 7;
        let frame = encode(Packet::Subscribe(s));
        assert_eq!(
            subscribe_filters(&frame).unwrap(),
            vec!["fleet/machines/vm-1/command".to_owned(), "#".to_owned()]
        );
    }

    #[test]
    fn a_connect_is_taken_whole_with_its_will_and_the_next_packet_stays() {
        let mut c = Connect::new("vm-1");
        c.keep_alive = 33;
        c.clean_session = false;
        c.last_will = Some(LastWill::new(
            "fleet/machines/vm-1/online",
            "false",
            QoS::AtLeastOnce,
            true,
        ));
        c.set_login("vm-1", "machine-secret");
        let mut wire = encode(Packet::Connect(c.clone()));
        wire.extend_from_slice(&encode(Packet::PingReq));
        let room = wire.capacity();
        let parsed = take_connect(&mut wire).unwrap().unwrap();
        assert_eq!(parsed, c);
        assert_eq!(
            &wire[..],
            &[0xc0, 0x00],
            "the next packet stays in the buffer"
        );
        // The will, kept for the session, holds no part of the read buffer: its whole room
        // can be used again without a new allocation.
        assert!(wire.try_reclaim(room - wire.len()));
        drop(parsed);
    }

    #[test]
    fn a_first_packet_other_than_connect_is_refused() {
        let mut wire = encode(Packet::PingReq);
        assert!(take_connect(&mut wire).is_err());
        let mut partial = encode(Packet::Connect(Connect::new("vm-1")));
        partial.truncate(5);
        assert_eq!(take_connect(&mut partial).unwrap(), None);
    }

    #[test]
    fn a_refusal_is_a_connack_with_the_code() {
        let mut wire = refusal(ConnectReturnCode::NotAuthorized);
        let Ok(Packet::ConnAck(ack)) = Packet::read(&mut wire, MAX_PACKET) else {
            panic!("not a CONNACK");
        };
        assert_eq!(ack.code, ConnectReturnCode::NotAuthorized);
    }
}
