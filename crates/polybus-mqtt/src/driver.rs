//! One face over rumqttc's MQTT 5 and MQTT 3.1.1 clients.
//!
//! The connection task ([`crate::conn`]) works with protocol-neutral requests and events; this
//! module turns them into rumqttc calls and back. It also holds the few repairs the task needs
//! on rumqttc's event loop state after a disconnect (see [`Driver::after_error`]).

use std::time::Duration;

use bytes::Bytes;
use polybus_core::{Error, Result};
use rumqttc::Outgoing;
use rumqttc::v5 as r5;
use rumqttc::v5::mqttbytes::v5 as p5;

use crate::config::{MqttConfig, Protocol, QoS};
use crate::error::{self, qos_to_v4, qos_to_v5};

/// A PUBLISH to send.
#[derive(Debug, Clone)]
pub(crate) struct OutMsg {
    pub(crate) topic: String,
    pub(crate) qos: QoS,
    pub(crate) retain: bool,
    pub(crate) payload: Bytes,
    pub(crate) user_properties: Vec<(String, String)>,
    pub(crate) content_type: Option<String>,
}

/// A PUBLISH received.
#[derive(Debug)]
pub(crate) struct InMsg {
    pub(crate) topic: Bytes,
    pub(crate) pkid: u16,
    pub(crate) qos: QoS,
    pub(crate) dup: bool,
    pub(crate) payload: Bytes,
    pub(crate) user_properties: Vec<(String, String)>,
    pub(crate) content_type: Option<String>,
    pub(crate) sub_ids: Vec<usize>,
}

/// What the event loop reports, for both protocol versions.
#[derive(Debug)]
pub(crate) enum Ev {
    ConnAck {
        session_present: bool,
        max_packet_size: Option<u32>,
        sub_ids_available: bool,
    },
    Publish(InMsg),
    PubAck {
        pkid: u16,
        error: Option<Error>,
    },
    PubRec {
        pkid: u16,
        error: Option<Error>,
    },
    PubComp {
        pkid: u16,
        /// MQTT 5 reason "Packet Identifier not found": the broker no longer knows the
        /// message (its PUBCOMP was lost, or the broker lost its state in a crash).
        unknown: bool,
    },
    SubAck {
        pkid: u16,
        results: Vec<Result<QoS>>,
    },
    OutPublish(u16),
    OutAwaitAck(u16),
    OutSubscribe(u16),
    OutUnsubscribe,
    OutPubAck(u16),
    OutPubRec(u16),
    OutPubComp(u16),
    OutDisconnect,
    Other,
}

/// A request could not be handed to the event loop because rumqttc's request channel is
/// full; the task tries again after the loop made progress. (rumqttc reports a closed channel
/// the same way, but the channel only closes when the task, which tracks that itself, ends.)
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct Full;

/// The sending half: hands requests to rumqttc's request channel.
#[derive(Debug, Clone)]
pub(crate) enum Client {
    V5(r5::AsyncClient),
    V4(rumqttc::AsyncClient),
}

fn sent<E>(r: std::result::Result<(), E>) -> std::result::Result<(), Full> {
    r.map_err(|_| Full)
}

impl Client {
    pub(crate) fn try_publish(&self, m: &OutMsg) -> std::result::Result<(), Full> {
        match self {
            Client::V5(c) => {
                let props = p5::PublishProperties {
                    user_properties: m.user_properties.clone(),
                    content_type: m.content_type.clone(),
                    ..Default::default()
                };
                let r = if props.user_properties.is_empty() && props.content_type.is_none() {
                    c.try_publish(
                        m.topic.clone(),
                        qos_to_v5(m.qos),
                        m.retain,
                        m.payload.clone(),
                    )
                } else {
                    c.try_publish_with_properties(
                        m.topic.clone(),
                        qos_to_v5(m.qos),
                        m.retain,
                        m.payload.clone(),
                        props,
                    )
                };
                sent(r)
            }
            Client::V4(c) => {
                let r = c.try_publish(
                    m.topic.clone(),
                    qos_to_v4(m.qos),
                    m.retain,
                    m.payload.to_vec(),
                );
                sent(r)
            }
        }
    }

    pub(crate) fn try_subscribe(
        &self,
        filter: &str,
        qos: QoS,
        sub_id: Option<u32>,
    ) -> std::result::Result<(), Full> {
        match self {
            Client::V5(c) => {
                let r = match sub_id {
                    Some(id) => c.try_subscribe_with_properties(
                        filter.to_owned(),
                        qos_to_v5(qos),
                        p5::SubscribeProperties {
                            id: Some(id as usize),
                            user_properties: Vec::new(),
                        },
                    ),
                    None => c.try_subscribe(filter.to_owned(), qos_to_v5(qos)),
                };
                sent(r)
            }
            Client::V4(c) => sent(c.try_subscribe(filter.to_owned(), qos_to_v4(qos))),
        }
    }

    pub(crate) fn try_unsubscribe(&self, filter: &str) -> std::result::Result<(), Full> {
        match self {
            Client::V5(c) => sent(c.try_unsubscribe(filter.to_owned())),
            Client::V4(c) => sent(c.try_unsubscribe(filter.to_owned())),
        }
    }

    pub(crate) fn try_ack(&self, pkid: u16, qos: QoS) -> std::result::Result<(), Full> {
        match self {
            Client::V5(c) => {
                let mut p = p5::Publish::new("", qos_to_v5(qos), Bytes::new(), None);
                p.pkid = pkid;
                sent(c.try_ack(&p))
            }
            Client::V4(c) => {
                let mut p = rumqttc::Publish::new("", qos_to_v4(qos), Vec::new());
                p.pkid = pkid;
                sent(c.try_ack(&p))
            }
        }
    }

    pub(crate) fn try_disconnect(&self) -> std::result::Result<(), Full> {
        match self {
            Client::V5(c) => sent(c.try_disconnect()),
            Client::V4(c) => sent(c.try_disconnect()),
        }
    }
}

/// The receiving half: owns rumqttc's event loop.
pub(crate) enum Driver {
    V5(Box<V5Driver>),
    V4(Box<V4Driver>),
}

pub(crate) struct V5Driver {
    el: r5::EventLoop,
    last_connack: Option<p5::ConnAck>,
    skip_connack: bool,
    skip_fake_publishes: usize,
}

pub(crate) struct V4Driver {
    el: rumqttc::EventLoop,
    skip_fake_publishes: usize,
}

/// Capacity of rumqttc's request channel. The task keeps its own backlog beyond this.
pub(crate) const REQUEST_CHANNEL: usize = 256;
/// rumqttc's outgoing in-flight ceiling (the broker's Receive Maximum lowers it). rumqttc
/// allocates a slot per packet id up to this number for every connection, so not `u16::MAX`.
const OUTGOING_INFLIGHT: u16 = 1024;
/// The longest keep-alive MQTT can express (a `u16` of seconds). rumqttc writes
/// `as_secs() as u16` and computes `Instant::now() + keep_alive`, so longer ones saturate here.
const MAX_KEEP_ALIVE: Duration = Duration::from_secs(u16::MAX as u64);

impl Driver {
    /// Builds the rumqttc client and event loop for `cfg`.
    pub(crate) fn new(cfg: &MqttConfig) -> Result<(Client, Driver)> {
        let connect_secs = cfg.connect_timeout.as_secs().max(1);
        match cfg.protocol {
            Protocol::V5 => {
                let mut o = r5::MqttOptions::new(cfg.client_id.clone(), cfg.host.clone(), cfg.port);
                // rumqttc's MQTT 5 options assert a keep-alive of at least 5 s.
                o.set_keep_alive(cfg.keep_alive.clamp(Duration::from_secs(5), MAX_KEEP_ALIVE))
                    .set_clean_start(cfg.clean_start)
                    .set_manual_acks(true)
                    .set_connection_timeout(connect_secs)
                    .set_max_packet_size(Some(cfg.max_packet_size))
                    .set_receive_maximum(Some(cfg.receive_maximum))
                    .set_outgoing_inflight_upper_limit(OUTGOING_INFLIGHT)
                    .set_request_channel_capacity(REQUEST_CHANNEL)
                    .set_network_options(network_options());
                if let Some(expiry) = cfg.session_expiry {
                    let secs = u32::try_from(expiry.as_secs()).unwrap_or(u32::MAX);
                    o.set_session_expiry_interval(Some(secs));
                }
                if let Some(c) = &cfg.credentials {
                    o.set_credentials(c.username.clone(), c.password.clone());
                }
                if let Some(w) = &cfg.last_will {
                    o.set_last_will(p5::LastWill::new(
                        w.topic.clone(),
                        w.payload.to_vec(),
                        qos_to_v5(w.qos),
                        w.retain,
                        None,
                    ));
                }
                if let Some(tls) = &cfg.tls {
                    o.set_transport(rumqttc::Transport::tls_with_config(
                        rumqttc::TlsConfiguration::Rustls(tls.build()?),
                    ));
                }
                let (client, el) = r5::AsyncClient::new(o, REQUEST_CHANNEL);
                Ok((
                    Client::V5(client),
                    Driver::V5(Box::new(V5Driver {
                        el,
                        last_connack: None,
                        skip_connack: false,
                        skip_fake_publishes: 0,
                    })),
                ))
            }
            Protocol::V311 => {
                let mut o =
                    rumqttc::MqttOptions::new(cfg.client_id.clone(), cfg.host.clone(), cfg.port);
                let max = cfg.max_packet_size as usize;
                o.set_keep_alive(cfg.keep_alive.min(MAX_KEEP_ALIVE))
                    .set_clean_session(cfg.clean_start)
                    .set_manual_acks(true)
                    .set_max_packet_size(max, max)
                    .set_inflight(OUTGOING_INFLIGHT)
                    .set_request_channel_capacity(REQUEST_CHANNEL);
                if let Some(c) = &cfg.credentials {
                    o.set_credentials(c.username.clone(), c.password.clone());
                }
                if let Some(w) = &cfg.last_will {
                    o.set_last_will(rumqttc::LastWill::new(
                        w.topic.clone(),
                        w.payload.to_vec(),
                        qos_to_v4(w.qos),
                        w.retain,
                    ));
                }
                if let Some(tls) = &cfg.tls {
                    o.set_transport(rumqttc::Transport::tls_with_config(
                        rumqttc::TlsConfiguration::Rustls(tls.build()?),
                    ));
                }
                let (client, mut el) = rumqttc::AsyncClient::new(o, REQUEST_CHANNEL);
                el.network_options = network_options();
                el.network_options.set_connection_timeout(connect_secs);
                Ok((
                    Client::V4(client),
                    Driver::V4(Box::new(V4Driver {
                        el,
                        skip_fake_publishes: 0,
                    })),
                ))
            }
        }
    }

    /// The next event. Not cancel safe once connected (rumqttc may lose a half-written
    /// packet); the task only cancels it while connecting or when shutting down.
    pub(crate) async fn poll(&mut self) -> Result<Ev> {
        match self {
            Driver::V5(d) => loop {
                let ev = d.el.poll().await.map_err(error::connection_v5)?;
                if let Some(ev) = d.normalize(ev) {
                    return Ok(ev);
                }
            },
            Driver::V4(d) => loop {
                let ev = d.el.poll().await.map_err(error::connection_v4)?;
                if let Some(ev) = d.normalize(ev) {
                    return Ok(ev);
                }
            },
        }
    }

    /// Repairs rumqttc's state after a connection error, returning the events it had buffered
    /// but not yet yielded (the task must see them to keep its books straight).
    ///
    /// rumqttc moves in-flight publishes and the unread request channel into `pending` and
    /// retransmits `pending` on a resumed session (or clears it on a new one). The task keeps
    /// every request it made itself and resubmits the ones rumqttc had not started, in order,
    /// after the next CONNACK; so here everything but real retransmissions (publishes that
    /// already have a packet id, PUBRELs) is removed from `pending`, and retransmitted
    /// publishes get the DUP flag MQTT asks for.
    pub(crate) fn after_error(&mut self) -> Vec<Ev> {
        match self {
            Driver::V5(d) => {
                let buffered: Vec<_> = d.el.state.events.drain(..).collect();
                let mut evs: Vec<Ev> = buffered
                    .into_iter()
                    .filter_map(|e| d.normalize(e))
                    .collect();
                d.el.clean();
                // `clean` may have buffered nothing new, but drain again to be sure.
                evs.extend(
                    d.el.state
                        .events
                        .drain(..)
                        .collect::<Vec<_>>()
                        .into_iter()
                        .filter_map(|e| d.normalize(e)),
                );
                d.el.pending.retain_mut(|r| match r {
                    r5::Request::Publish(p) if p.pkid != 0 => {
                        p.dup = true;
                        true
                    }
                    r5::Request::PubRel(_) => true,
                    _ => false,
                });
                evs
            }
            Driver::V4(d) => {
                let buffered: Vec<_> = d.el.state.events.drain(..).collect();
                let evs: Vec<Ev> = buffered
                    .into_iter()
                    .filter_map(|e| d.normalize(e))
                    .collect();
                d.el.clean();
                d.el.pending.retain_mut(|r| match r {
                    rumqttc::Request::Publish(p) if p.pkid != 0 => {
                        p.dup = true;
                        true
                    }
                    rumqttc::Request::PubRel(_) => true,
                    _ => false,
                });
                evs
            }
        }
    }

    /// Starts a fresh rumqttc session state (after a CONNACK without a session, when the old
    /// state still holds a packet-id collision that would block new requests for ever).
    pub(crate) fn reset_state(&mut self) {
        match self {
            Driver::V5(d) => {
                d.el.state = r5::MqttState::new(OUTGOING_INFLIGHT, true);
                if let Some(connack) = d.last_connack.clone() {
                    // Re-apply the broker's limits (receive maximum, topic aliases); this
                    // buffers a second CONNACK event, which is skipped.
                    if d.el
                        .state
                        .handle_incoming_packet(r5::Incoming::ConnAck(connack))
                        .is_ok()
                    {
                        d.skip_connack = true;
                    }
                }
            }
            Driver::V4(d) => {
                d.el.state = rumqttc::MqttState::new(OUTGOING_INFLIGHT, true);
            }
        }
    }

    /// Tells rumqttc again about incoming QoS 2 messages this client already answered with
    /// PUBREC in the resumed session, so the broker's retransmitted PUBREL is answered with
    /// PUBCOMP instead of being treated as unsolicited (which would drop the connection on
    /// every reconnect).
    pub(crate) fn rearm_incoming_qos2(&mut self, pkids: &[u16]) {
        match self {
            Driver::V5(d) => {
                for &pkid in pkids {
                    let mut p = p5::Publish::new("", p5_qos2(), Bytes::new(), None);
                    p.pkid = pkid;
                    if d.el
                        .state
                        .handle_incoming_packet(r5::Incoming::Publish(p))
                        .is_ok()
                    {
                        d.skip_fake_publishes += 1;
                    }
                }
            }
            Driver::V4(d) => {
                for &pkid in pkids {
                    let mut p =
                        rumqttc::Publish::new("", rumqttc::QoS::ExactlyOnce, Vec::<u8>::new());
                    p.pkid = pkid;
                    if d.el
                        .state
                        .handle_incoming_packet(rumqttc::Incoming::Publish(p))
                        .is_ok()
                    {
                        d.skip_fake_publishes += 1;
                    }
                }
            }
        }
    }
}

/// TCP_NODELAY: MQTT packets are small and each waits for an answer; without it Nagle's
/// algorithm and delayed ACKs add about 40 ms to a QoS 1 round trip.
fn network_options() -> rumqttc::NetworkOptions {
    let mut n = rumqttc::NetworkOptions::new();
    n.set_tcp_nodelay(true);
    n
}

fn p5_qos2() -> rumqttc::v5::mqttbytes::QoS {
    rumqttc::v5::mqttbytes::QoS::ExactlyOnce
}

fn outgoing(o: Outgoing) -> Ev {
    match o {
        Outgoing::Publish(p) => Ev::OutPublish(p),
        Outgoing::AwaitAck(p) => Ev::OutAwaitAck(p),
        Outgoing::Subscribe(p) => Ev::OutSubscribe(p),
        Outgoing::Unsubscribe(_) => Ev::OutUnsubscribe,
        Outgoing::PubAck(p) => Ev::OutPubAck(p),
        Outgoing::PubRec(p) => Ev::OutPubRec(p),
        Outgoing::PubComp(p) => Ev::OutPubComp(p),
        Outgoing::Disconnect => Ev::OutDisconnect,
        Outgoing::PubRel(_) | Outgoing::PingReq | Outgoing::PingResp => Ev::Other,
    }
}

impl V5Driver {
    fn normalize(&mut self, ev: r5::Event) -> Option<Ev> {
        let inc = match ev {
            r5::Event::Outgoing(o) => return Some(outgoing(o)),
            r5::Event::Incoming(i) => i,
        };
        Some(match inc {
            r5::Incoming::ConnAck(c) => {
                if self.skip_connack {
                    self.skip_connack = false;
                    return None;
                }
                let props = c.properties.as_ref();
                let ev = Ev::ConnAck {
                    session_present: c.session_present,
                    max_packet_size: props.and_then(|p| p.max_packet_size),
                    sub_ids_available: props
                        .and_then(|p| p.subscription_identifiers_available)
                        .is_none_or(|v| v != 0),
                };
                self.last_connack = Some(c);
                ev
            }
            r5::Incoming::Publish(p) => {
                if p.topic.is_empty() && self.skip_fake_publishes > 0 {
                    self.skip_fake_publishes -= 1;
                    return None;
                }
                let (user_properties, content_type, sub_ids) = match p.properties {
                    Some(props) => (
                        props.user_properties,
                        props.content_type,
                        props.subscription_identifiers,
                    ),
                    None => (Vec::new(), None, Vec::new()),
                };
                Ev::Publish(InMsg {
                    topic: p.topic,
                    pkid: p.pkid,
                    qos: error::qos_from_v5(p.qos),
                    dup: p.dup,
                    payload: p.payload,
                    user_properties,
                    content_type,
                    sub_ids,
                })
            }
            r5::Incoming::PubAck(a) => Ev::PubAck {
                pkid: a.pkid,
                error: error::puback_v5(a.reason),
            },
            r5::Incoming::PubRec(a) => Ev::PubRec {
                pkid: a.pkid,
                error: error::pubrec_v5(a.reason),
            },
            r5::Incoming::PubComp(a) => Ev::PubComp {
                pkid: a.pkid,
                unknown: a.reason == p5::PubCompReason::PacketIdentifierNotFound,
            },
            r5::Incoming::SubAck(s) => Ev::SubAck {
                pkid: s.pkid,
                results: s.return_codes.into_iter().map(error::suback_v5).collect(),
            },
            _ => Ev::Other,
        })
    }
}

impl V4Driver {
    fn normalize(&mut self, ev: rumqttc::Event) -> Option<Ev> {
        let inc = match ev {
            rumqttc::Event::Outgoing(o) => return Some(outgoing(o)),
            rumqttc::Event::Incoming(i) => i,
        };
        Some(match inc {
            rumqttc::Incoming::ConnAck(c) => Ev::ConnAck {
                session_present: c.session_present,
                max_packet_size: None,
                sub_ids_available: false,
            },
            rumqttc::Incoming::Publish(p) => {
                if p.topic.is_empty() && self.skip_fake_publishes > 0 {
                    self.skip_fake_publishes -= 1;
                    return None;
                }
                Ev::Publish(InMsg {
                    topic: Bytes::from(p.topic.into_bytes()),
                    pkid: p.pkid,
                    qos: error::qos_from_v4(p.qos),
                    dup: p.dup,
                    payload: p.payload,
                    user_properties: Vec::new(),
                    content_type: None,
                    sub_ids: Vec::new(),
                })
            }
            rumqttc::Incoming::PubAck(a) => Ev::PubAck {
                pkid: a.pkid,
                error: None,
            },
            rumqttc::Incoming::PubRec(a) => Ev::PubRec {
                pkid: a.pkid,
                error: None,
            },
            rumqttc::Incoming::PubComp(a) => Ev::PubComp {
                pkid: a.pkid,
                unknown: false,
            },
            rumqttc::Incoming::SubAck(s) => Ev::SubAck {
                pkid: s.pkid,
                results: s.return_codes.into_iter().map(error::suback_v4).collect(),
            },
            _ => Ev::Other,
        })
    }
}

/// The encoded size of a PUBLISH of `m` with a packet id, for the size check before sending.
pub(crate) fn publish_size(m: &OutMsg, protocol: Protocol) -> usize {
    let mut len = 2 + m.topic.len() + m.payload.len();
    if m.qos != QoS::AtMostOnce {
        len += 2;
    }
    if protocol == Protocol::V5 {
        let mut props = 0;
        if let Some(ct) = &m.content_type {
            props += 1 + 2 + ct.len();
        }
        for (k, v) in &m.user_properties {
            props += 1 + 2 + k.len() + 2 + v.len();
        }
        len += varint_len(props) + props;
    }
    1 + varint_len(len) + len
}

fn varint_len(n: usize) -> usize {
    match n {
        0..=127 => 1,
        128..=16_383 => 2,
        16_384..=2_097_151 => 3,
        _ => 4,
    }
}

/// Delay before reconnect attempt `attempt` (1-based): exponential from `min`, capped at `max`,
/// with "equal jitter" (between half and all of the step) so reconnecting clients spread out.
pub(crate) fn backoff(attempt: u32, min: Duration, max: Duration) -> Duration {
    let exp = attempt.saturating_sub(1).min(20);
    let step = min.saturating_mul(1u32 << exp).min(max);
    let half = step / 2;
    let half_ms = u64::try_from(half.as_millis()).unwrap_or(u64::MAX);
    let jitter = rand::random_range(0..=half_ms.max(1));
    half + Duration::from_millis(jitter)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn publish_size_matches_rumqttc() {
        let m = OutMsg {
            topic: "polybus/test/x".into(),
            qos: QoS::AtLeastOnce,
            retain: false,
            payload: Bytes::from(vec![7u8; 300]),
            user_properties: vec![
                ("id".into(), "1234".into()),
                ("source".into(), "urn:x".into()),
            ],
            content_type: Some("text/plain".into()),
        };
        let mut p = p5::Publish::new(
            m.topic.clone(),
            qos_to_v5(m.qos),
            m.payload.clone(),
            Some(p5::PublishProperties {
                user_properties: m.user_properties.clone(),
                content_type: m.content_type.clone(),
                ..Default::default()
            }),
        );
        p.pkid = 1;
        assert_eq!(publish_size(&m, Protocol::V5), p.size());
        let mut p4 = rumqttc::Publish::new(
            m.topic.clone(),
            rumqttc::QoS::AtLeastOnce,
            m.payload.to_vec(),
        );
        p4.pkid = 1;
        assert_eq!(publish_size(&m, Protocol::V311), p4.size());
    }

    #[test]
    fn backoff_grows_with_jitter_and_is_capped() {
        let (min, max) = (Duration::from_millis(100), Duration::from_secs(5));
        for attempt in 1..30 {
            let d = backoff(attempt, min, max);
            let step = min.saturating_mul(1 << (attempt - 1).min(20)).min(max);
            assert!(
                d >= step / 2 && d <= step + Duration::from_millis(1),
                "{attempt}: {d:?}"
            );
        }
        assert!(backoff(30, min, max) <= max + Duration::from_millis(1));
    }
}
