//! The connection: one background task owns rumqttc's event loop; handles share its books.
//!
//! Publishers, consumers and ackers never talk to the event loop directly. They lock the
//! shared [`State`], record what they want (a publish waiting for its PUBACK, a subscription
//! waiting for its SUBACK, an ack) and hand the request to rumqttc's request channel; the task
//! polls the event loop and settles the books from its events:
//!
//! * a request that rumqttc takes from the channel shows up as an `Outgoing` event, in channel
//!   order, which gives a publish its packet id (`fifo` keeps that order);
//! * PUBACK / PUBCOMP (or a failed PUBREC) with that packet id resolves the publish;
//! * on a connection error the requests rumqttc had not started go back to the front of the
//!   `backlog` and are sent again after the next CONNACK; publishes that were in flight are
//!   retransmitted by rumqttc when the broker resumed the session, and sent again by the task
//!   when it did not (then subscriptions are renewed too);
//! * reconnects wait an exponential backoff with jitter.
//!
//! The lock is a `std::sync::Mutex` held for short, non-blocking sections only; nothing that
//! can drop a [`Delivery`] (whose acker locks too) runs while it is held.

use std::collections::{BTreeMap, HashMap, HashSet, VecDeque};
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;

use polybus_core::{AckFuture, Acker, Delivery, Error, ErrorKind, NoopAcker, Result};
use tokio::sync::{Notify, mpsc, oneshot, watch};
use tokio::task::JoinHandle;

use crate::BACKEND;
use crate::config::{MqttConfig, Protocol, QoS, payload_limit};
use crate::convert;
use crate::driver::{self, Client, Driver, Ev, InMsg, OutMsg};
use crate::error::err;
use crate::topic;

/// The sink of a subscription's deliveries.
pub(crate) type Sink = mpsc::Sender<Result<Delivery>>;

/// What the handles share with the task.
pub(crate) struct Inner {
    pub(crate) cfg: MqttConfig,
    client: Client,
    st: Mutex<State>,
    shutdown: Notify,
    done_tx: watch::Sender<bool>,
    task: Mutex<Option<JoinHandle<()>>>,
    /// Spans, trace context and metrics of every producer and consumer on this connection.
    pub(crate) telemetry: polybus_core::telemetry::Telemetry,
}

/// A request handed (or to be handed) to rumqttc, in order.
#[derive(Debug)]
enum Req {
    Publish(u64),
    Subscribe(u32),
    Unsubscribe(String),
    Ack { pkid: u16, qos: QoS, epoch: u64 },
    Disconnect,
}

struct PubEntry {
    msg: OutMsg,
    waiter: Option<oneshot::Sender<Result<()>>>,
    pkid: Option<u16>,
    /// QoS 2: PUBREC received, the broker owns the message.
    released: bool,
}

struct LocalSub {
    filter: String,
    qos: QoS,
    sink: Sink,
    waiter: Option<oneshot::Sender<Result<()>>>,
    active: bool,
    /// Deliveries that found `sink` full, in arrival order. While any subscription has some,
    /// the task reads nothing more from the broker: unacknowledged QoS 1/2 messages stay with
    /// the broker (its in-flight window fills) and TCP holds back the rest. The task moves them
    /// into `sink` as the consumer makes room. At most the deliveries of the one message (and
    /// of what rumqttc had already read) wait here.
    overflow: VecDeque<Result<Delivery>>,
}

impl LocalSub {
    /// Hands `item` to the consumer in order: into the sink, or behind what already waits.
    /// Returns the delivery when the consumer is gone (the caller drops it outside the lock).
    fn offer(&mut self, item: Result<Delivery>) -> Option<Delivery> {
        if !self.overflow.is_empty() {
            self.overflow.push_back(item);
            return None;
        }
        match self.sink.try_send(item) {
            Ok(()) => None,
            Err(mpsc::error::TrySendError::Full(item)) => {
                self.overflow.push_back(item);
                None
            }
            Err(mpsc::error::TrySendError::Closed(item)) => item.ok(),
        }
    }

    /// Moves waiting deliveries into the sink while it has room. A closed sink (the consumer
    /// is gone) gets none: they go to `garbage`.
    fn flush_overflow(&mut self, garbage: &mut Vec<Delivery>) {
        while let Some(item) = self.overflow.pop_front() {
            match self.sink.try_send(item) {
                Ok(()) => {}
                Err(mpsc::error::TrySendError::Full(item)) => {
                    self.overflow.push_front(item);
                    return;
                }
                Err(mpsc::error::TrySendError::Closed(item)) => {
                    garbage.extend(item.ok());
                    self.discard_overflow(garbage);
                    return;
                }
            }
        }
    }

    /// Moves every waiting delivery to `garbage` (dropping one locks the state, so never
    /// under the lock).
    fn discard_overflow(&mut self, garbage: &mut Vec<Delivery>) {
        garbage.extend(self.overflow.drain(..).filter_map(Result::ok));
    }
}

#[derive(Default)]
struct State {
    connected: bool,
    closing: bool,
    closed: bool,
    /// Increases whenever the broker starts a new session: packet ids of older deliveries
    /// mean nothing any more.
    epoch: u64,
    next_seq: u64,
    pubs: BTreeMap<u64, PubEntry>,
    pkid_pub: HashMap<u16, u64>,
    collision: Option<(u16, u64)>,
    fifo: VecDeque<Req>,
    backlog: VecDeque<Req>,
    flushes: Vec<(u64, oneshot::Sender<()>)>,
    subs: HashMap<u32, LocalSub>,
    next_sub_id: u32,
    sub_pkid: HashMap<u16, u32>,
    /// QoS 1 deliveries handed out and not yet acknowledged to the broker.
    held1: HashSet<u16>,
    /// QoS 2 deliveries: `false` handed out, `true` PUBREC sent (waiting for PUBREL).
    qos2_in: HashMap<u16, bool>,
    /// Messages that arrived before any local subscription matched them (a resumed
    /// persistent session delivers right after CONNACK).
    stash: VecDeque<InMsg>,
    /// Filters recently unsubscribed: late messages for them are acknowledged and dropped.
    gone: VecDeque<String>,
    broker_max_packet: Option<u32>,
    sub_ids_available: bool,
    first: Option<oneshot::Sender<Result<()>>>,
    /// Deliveries to drop once the lock is released.
    garbage: Vec<Delivery>,
}

impl State {
    /// Removes a local subscription; deliveries still waiting for its sink go to `garbage`.
    fn remove_sub(&mut self, id: u32) -> Option<LocalSub> {
        let mut sub = self.subs.remove(&id)?;
        sub.discard_overflow(&mut self.garbage);
        Some(sub)
    }

    /// A subscription whose deliveries wait for room, and a handle on its sink.
    fn first_overflow(&self) -> Option<(u32, Sink)> {
        self.subs
            .iter()
            .find(|(_, s)| !s.overflow.is_empty())
            .map(|(id, s)| (*id, s.sink.clone()))
    }
}

const STASH_LIMIT: usize = 65_536;
const GONE_LIMIT: usize = 256;

fn lock(m: &Mutex<State>) -> MutexGuard<'_, State> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

impl Inner {
    /// Connects, spawns the task and waits for the first CONNACK.
    pub(crate) async fn connect(cfg: MqttConfig) -> Result<Arc<Inner>> {
        let (client, driver) = Driver::new(&cfg)?;
        let (first_tx, first_rx) = oneshot::channel();
        let (done_tx, _) = watch::channel(false);
        let connect_timeout = cfg.connect_timeout;
        let trace_policy = cfg.trace_policy;
        let inner = Arc::new(Inner {
            cfg,
            client,
            st: Mutex::new(State {
                first: Some(first_tx),
                next_sub_id: 1,
                sub_ids_available: true,
                ..State::default()
            }),
            shutdown: Notify::new(),
            done_tx,
            task: Mutex::new(None),
            telemetry: polybus_core::telemetry::Telemetry::new(BACKEND)
                .with_trace_policy(trace_policy),
        });
        let task = tokio::spawn(run(inner.clone(), driver));
        *inner.task.lock().unwrap_or_else(|e| e.into_inner()) = Some(task);
        let bound = connect_timeout.saturating_add(Duration::from_millis(500));
        match tokio::time::timeout(bound, first_rx).await {
            Ok(Ok(Ok(()))) => Ok(inner),
            Ok(Ok(Err(e))) => {
                inner.abort();
                Err(e)
            }
            Ok(Err(_)) => {
                inner.abort();
                Err(err(
                    ErrorKind::Connect,
                    "the connection task ended before CONNACK",
                ))
            }
            Err(_) => {
                inner.abort();
                Err(err(
                    ErrorKind::Connect,
                    format!(
                        "no CONNACK from {}:{} within {connect_timeout:?}",
                        inner.cfg.host, inner.cfg.port
                    ),
                ))
            }
        }
    }

    fn lock(&self) -> MutexGuard<'_, State> {
        lock(&self.st)
    }

    /// Runs `f` under the lock, then drops the deliveries it discarded.
    fn with<R>(&self, f: impl FnOnce(&mut State) -> R) -> R {
        let (r, garbage) = {
            let mut st = self.lock();
            let r = f(&mut st);
            (r, std::mem::take(&mut st.garbage))
        };
        drop(garbage);
        r
    }

    pub(crate) fn is_closed(&self) -> bool {
        let st = self.lock();
        st.closing || st.closed
    }

    pub(crate) fn is_connected(&self) -> bool {
        self.lock().connected
    }

    /// The packet limit: the configured one, lowered by the broker's maximum packet size
    /// (MQTT 5 CONNACK; the latest CONNACK counts, a broker may change it across a restart).
    pub(crate) fn max_packet_size(&self) -> u32 {
        let broker = self.lock().broker_max_packet;
        broker.map_or(self.cfg.max_packet_size, |b| {
            b.min(self.cfg.max_packet_size)
        })
    }

    /// The payload limit of this connection: the configured one
    /// ([`MqttConfig::max_payload`]), lowered to what fits the broker's maximum packet size
    /// when the broker announced a smaller one.
    pub(crate) fn max_payload(&self) -> usize {
        let ours = self.cfg.max_payload();
        match self.lock().broker_max_packet {
            Some(b) if b < self.cfg.max_packet_size => ours.min(payload_limit(b)),
            _ => ours,
        }
    }

    /// The delivery semantics of this connection, with the payload limit the broker allows.
    pub(crate) fn capabilities(&self) -> polybus_core::Capabilities {
        crate::client::capabilities(&self.cfg).with_max_payload(Some(self.max_payload()))
    }

    /// Sends a PUBLISH; resolves when the broker acknowledged it (PUBACK for QoS 1, PUBCOMP
    /// for QoS 2) or when it was written (QoS 0).
    pub(crate) async fn publish(&self, msg: OutMsg) -> Result<()> {
        let max_payload = self.max_payload();
        let max = self.max_packet_size() as usize;
        if msg.payload.len() > max_payload {
            return Err(err(
                ErrorKind::PayloadTooLarge,
                format!(
                    "payload is {} bytes, the limit is {max_payload} (max packet size {max} less room for topic and properties)",
                    msg.payload.len(),
                ),
            ));
        }
        let size = driver::publish_size(&msg, self.cfg.protocol);
        if size > max {
            return Err(err(
                ErrorKind::PayloadTooLarge,
                format!("the PUBLISH packet would be {size} bytes, the limit is {max}"),
            ));
        }
        let rx = {
            let mut st = self.lock();
            if st.closing || st.closed {
                return Err(Error::closed(BACKEND).with_message("the connection is closed"));
            }
            let (tx, rx) = oneshot::channel();
            let seq = st.next_seq;
            st.next_seq += 1;
            st.pubs.insert(
                seq,
                PubEntry {
                    msg,
                    waiter: Some(tx),
                    pkid: None,
                    released: false,
                },
            );
            st.backlog.push_back(Req::Publish(seq));
            self.pump(&mut st);
            rx
        };
        rx.await.unwrap_or_else(|_| {
            Err(Error::closed(BACKEND)
                .with_message("the connection closed before the broker acknowledged the publish"))
        })
    }

    /// Waits until every publish made so far is acknowledged (or failed).
    pub(crate) async fn flush(&self) -> Result<()> {
        let rx = {
            let mut st = self.lock();
            let Some((&last, _)) = st.pubs.last_key_value() else {
                return Ok(());
            };
            let (tx, rx) = oneshot::channel();
            st.flushes.push((last, tx));
            rx
        };
        rx.await
            .map_err(|_| Error::closed(BACKEND).with_message("the connection closed during flush"))
    }

    /// Registers a subscription delivering into `sink` and sends the SUBSCRIBE. The receiver
    /// resolves with the SUBACK's verdict.
    pub(crate) fn subscribe(
        self: &Arc<Self>,
        filter: String,
        qos: QoS,
        sink: Sink,
    ) -> Result<(u32, oneshot::Receiver<Result<()>>)> {
        topic::validate_filter(&filter)?;
        self.with(|st| {
            if st.closing || st.closed {
                return Err(Error::closed(BACKEND).with_message("the connection is closed"));
            }
            let id = st.next_sub_id;
            st.next_sub_id = st.next_sub_id.wrapping_add(1).clamp(1, 268_435_455);
            let (tx, rx) = oneshot::channel();
            let plain = topic::match_filter(&filter).to_owned();
            st.gone.retain(|g| *g != plain);
            st.subs.insert(
                id,
                LocalSub {
                    filter,
                    qos,
                    sink,
                    waiter: Some(tx),
                    active: false,
                    overflow: VecDeque::new(),
                },
            );
            st.backlog.push_back(Req::Subscribe(id));
            // Messages that arrived before this subscription existed.
            let stashed: Vec<InMsg> = {
                let (mine, rest): (Vec<_>, Vec<_>) = st.stash.drain(..).partition(|m| {
                    std::str::from_utf8(&m.topic).is_ok_and(|t| topic::matches(t, &plain))
                });
                st.stash = rest.into();
                mine
            };
            for m in stashed {
                self.on_publish(st, m);
            }
            self.pump(st);
            Ok((id, rx))
        })
    }

    /// Removes a local subscription. Sends UNSUBSCRIBE unless another local subscription uses
    /// the same filter, and, when the subscription is only going out of scope (`explicit` is
    /// false), unless the session is persistent: a persistent session keeps its
    /// subscriptions on the broker, which is the point of it.
    pub(crate) fn unsubscribe(&self, id: u32, explicit: bool) {
        self.with(|st| {
            let Some(sub) = st.remove_sub(id) else {
                return;
            };
            if st.closing
                || st.closed
                || (!explicit && !self.cfg.clean_start)
                || st.subs.values().any(|s| s.filter == sub.filter)
            {
                return;
            }
            st.gone
                .push_back(topic::match_filter(&sub.filter).to_owned());
            if st.gone.len() > GONE_LIMIT {
                st.gone.pop_front();
            }
            st.backlog.push_back(Req::Unsubscribe(sub.filter));
            self.pump(st);
        });
    }

    /// The local subscriptions to exactly `filter`.
    pub(crate) fn subscription_ids(&self, filter: &str) -> Vec<u32> {
        self.lock()
            .subs
            .iter()
            .filter(|(_, s)| s.filter == filter)
            .map(|(id, _)| *id)
            .collect()
    }

    /// Acknowledges a delivery to the broker (PUBACK or PUBREC).
    fn ack(&self, pkid: u16, qos: QoS, epoch: u64) {
        self.with(|st| {
            if st.epoch != epoch || st.closed {
                return;
            }
            st.backlog.push_back(Req::Ack { pkid, qos, epoch });
            self.pump(st);
        });
    }

    /// A delivery was dropped without ack. With a persistent session the broker sends it
    /// again after the next reconnect, so it stays unacknowledged (and a redelivery is let
    /// through). A clean session can never get it back, and an unacknowledged message would
    /// hold one of the broker's in-flight slots (Receive Maximum) for the rest of the
    /// connection, so it is acknowledged: dropped is dropped.
    fn release(&self, pkid: u16, qos: QoS, epoch: u64) {
        if self.cfg.clean_start {
            self.ack(pkid, qos, epoch);
            return;
        }
        self.with(|st| {
            if st.epoch != epoch {
                return;
            }
            match qos {
                QoS::AtLeastOnce => {
                    st.held1.remove(&pkid);
                }
                QoS::ExactlyOnce => {
                    if st.qos2_in.get(&pkid) == Some(&false) {
                        st.qos2_in.remove(&pkid);
                    }
                }
                QoS::AtMostOnce => {}
            }
        });
    }

    /// Hands backlog requests to rumqttc while it has room and the connection is up.
    fn pump(&self, st: &mut State) {
        if !st.connected || st.closed {
            return;
        }
        while let Some(req) = st.backlog.front() {
            // rumqttc takes a request off its channel when it emits the request's Outgoing
            // event, so `fifo` is what sits in the channel: do not build requests that would
            // only bounce off a full channel.
            if st.fifo.len() >= driver::REQUEST_CHANNEL {
                break;
            }
            let sent = match req {
                Req::Publish(seq) => st.pubs.get(seq).map(|e| self.client.try_publish(&e.msg)),
                Req::Subscribe(id) => match st.subs.get(id) {
                    Some(s) => {
                        let sub_id = (self.cfg.protocol == Protocol::V5 && st.sub_ids_available)
                            .then_some(*id);
                        Some(self.client.try_subscribe(&s.filter, s.qos, sub_id))
                    }
                    None => None,
                },
                Req::Unsubscribe(f) => Some(self.client.try_unsubscribe(f)),
                Req::Ack { pkid, qos, epoch } => {
                    (*epoch == st.epoch).then(|| self.client.try_ack(*pkid, *qos))
                }
                Req::Disconnect => Some(self.client.try_disconnect()),
            };
            match sent {
                // The request is obsolete (its publish or subscription is gone).
                None => {
                    st.backlog.pop_front();
                }
                Some(Ok(())) => {
                    if let Some(req) = st.backlog.pop_front() {
                        st.fifo.push_back(req);
                    }
                }
                Some(Err(driver::Full)) => break,
            }
        }
    }

    /// Resolves publish `seq`.
    fn complete(&self, st: &mut State, seq: u64, result: Result<()>) {
        if let Some(mut e) = st.pubs.remove(&seq)
            && let Some(w) = e.waiter.take()
        {
            let _ = w.send(result);
        }
        if st.flushes.is_empty() {
            return;
        }
        let lowest = st.pubs.first_key_value().map_or(u64::MAX, |(k, _)| *k);
        let mut i = 0;
        while i < st.flushes.len() {
            if st.flushes[i].0 < lowest {
                let (_, tx) = st.flushes.swap_remove(i);
                let _ = tx.send(());
            } else {
                i += 1;
            }
        }
    }

    /// Takes the first `fifo` entry `pred` accepts (normally the front).
    fn pop_fifo(st: &mut State, what: &str, pred: impl Fn(&Req) -> bool) -> Option<Req> {
        let pos = st.fifo.iter().position(pred)?;
        if pos != 0 {
            tracing::warn!(
                pos,
                what,
                "mqtt: request order differs from what rumqttc reported"
            );
        }
        st.fifo.remove(pos)
    }

    /// Settles the books for one event. Returns `true` when the task should end.
    fn handle(self: &Arc<Self>, st: &mut State, ev: Ev, driver: &mut Driver) -> bool {
        match ev {
            Ev::ConnAck {
                session_present,
                max_packet_size,
                sub_ids_available,
            } => self.on_connack(
                st,
                session_present,
                max_packet_size,
                sub_ids_available,
                driver,
            ),
            Ev::Publish(m) => self.on_publish(st, m),
            Ev::PubAck { pkid, error }
            | Ev::PubRec {
                pkid,
                error: error @ Some(_),
            } => {
                if let Some(seq) = st.pkid_pub.remove(&pkid) {
                    self.complete(st, seq, error.map_or(Ok(()), Err));
                }
                Self::resolve_collision(st, pkid);
            }
            Ev::PubRec { pkid, error: None } => {
                if let Some(seq) = st.pkid_pub.get(&pkid)
                    && let Some(e) = st.pubs.get_mut(seq)
                {
                    e.released = true;
                }
            }
            Ev::PubComp { pkid, unknown } => {
                if let Some(seq) = st.pkid_pub.remove(&pkid) {
                    if unknown {
                        // Either our earlier PUBCOMP went missing (the message was delivered)
                        // or the broker lost the message in a crash. Send it again: a
                        // duplicate (with the same event id) beats a loss.
                        tracing::warn!(
                            pkid,
                            "mqtt: the broker no longer knows a released QoS 2 publish; sending it again"
                        );
                        if let Some(e) = st.pubs.get_mut(&seq) {
                            e.pkid = None;
                            e.released = false;
                        }
                        st.backlog.push_front(Req::Publish(seq));
                    } else {
                        self.complete(st, seq, Ok(()));
                    }
                }
                Self::resolve_collision(st, pkid);
            }
            Ev::SubAck { pkid, results } => {
                if let Some(id) = st.sub_pkid.remove(&pkid) {
                    let verdict = results.into_iter().next().unwrap_or_else(|| {
                        Err(err(ErrorKind::Codec, "SUBACK without a reason code"))
                    });
                    match verdict {
                        Ok(_) => {
                            if let Some(s) = st.subs.get_mut(&id) {
                                s.active = true;
                                if let Some(w) = s.waiter.take() {
                                    let _ = w.send(Ok(()));
                                }
                            }
                        }
                        Err(e) => {
                            if let Some(mut s) = st.remove_sub(id) {
                                match s.waiter.take() {
                                    Some(w) => {
                                        let _ = w.send(Err(e));
                                    }
                                    None => {
                                        // A renewal after a reconnect was refused: the
                                        // subscription's stream ends.
                                        tracing::warn!(filter = s.filter, error = %e, "mqtt: the broker refused to renew a subscription");
                                        if let Some(d) = s.offer(Err(e)) {
                                            st.garbage.push(d);
                                        }
                                    }
                                }
                            }
                        }
                    }
                }
            }
            Ev::OutPublish(pkid) => {
                if pkid != 0 && st.pkid_pub.contains_key(&pkid) {
                    // A retransmission, or the publish that waited for a packet id collision.
                } else if let Some(Req::Publish(seq)) =
                    Self::pop_fifo(st, "publish", |r| matches!(r, Req::Publish(_)))
                {
                    if pkid == 0 {
                        self.complete(st, seq, Ok(()));
                    } else {
                        st.pkid_pub.insert(pkid, seq);
                        if let Some(e) = st.pubs.get_mut(&seq) {
                            e.pkid = Some(pkid);
                        }
                    }
                }
            }
            Ev::OutAwaitAck(pkid) => {
                if let Some(Req::Publish(seq)) =
                    Self::pop_fifo(st, "publish", |r| matches!(r, Req::Publish(_)))
                {
                    st.collision = Some((pkid, seq));
                }
            }
            Ev::OutSubscribe(pkid) => {
                if let Some(Req::Subscribe(id)) =
                    Self::pop_fifo(st, "subscribe", |r| matches!(r, Req::Subscribe(_)))
                {
                    st.sub_pkid.insert(pkid, id);
                }
            }
            Ev::OutUnsubscribe => {
                Self::pop_fifo(st, "unsubscribe", |r| matches!(r, Req::Unsubscribe(_)));
            }
            Ev::OutPubAck(pkid) => {
                Self::pop_fifo(
                    st,
                    "puback",
                    |r| matches!(r, Req::Ack { pkid: p, qos: QoS::AtLeastOnce, .. } if *p == pkid),
                );
                st.held1.remove(&pkid);
            }
            Ev::OutPubRec(pkid) => {
                Self::pop_fifo(
                    st,
                    "pubrec",
                    |r| matches!(r, Req::Ack { pkid: p, qos: QoS::ExactlyOnce, .. } if *p == pkid),
                );
                st.qos2_in.insert(pkid, true);
            }
            Ev::OutPubComp(pkid) => {
                st.qos2_in.remove(&pkid);
            }
            Ev::OutDisconnect => {
                Self::pop_fifo(st, "disconnect", |r| matches!(r, Req::Disconnect));
                return true;
            }
            Ev::Other => {}
        }
        self.pump(st);
        false
    }

    fn resolve_collision(st: &mut State, pkid: u16) {
        if let Some((p, seq)) = st.collision
            && p == pkid
        {
            st.collision = None;
            st.pkid_pub.insert(p, seq);
            if let Some(e) = st.pubs.get_mut(&seq) {
                e.pkid = Some(p);
            }
        }
    }

    fn on_connack(
        &self,
        st: &mut State,
        session_present: bool,
        max_packet_size: Option<u32>,
        sub_ids_available: bool,
        driver: &mut Driver,
    ) {
        st.connected = true;
        st.broker_max_packet = max_packet_size;
        st.sub_ids_available = sub_ids_available;
        if let Some(first) = st.first.take() {
            let _ = first.send(Ok(()));
        }
        let queued_subs: HashSet<u32> = st
            .backlog
            .iter()
            .filter_map(|r| match r {
                Req::Subscribe(id) => Some(*id),
                _ => None,
            })
            .collect();
        let mut front = VecDeque::new();
        if session_present {
            // The broker kept our subscriptions and in-flight state; rumqttc retransmits.
            // Subscriptions whose SUBACK never came are asked again.
            for id in std::mem::take(&mut st.sub_pkid).into_values() {
                if !queued_subs.contains(&id) {
                    front.push_back(Req::Subscribe(id));
                }
            }
            let answered: Vec<u16> = st
                .qos2_in
                .iter()
                .filter_map(|(p, sent)| sent.then_some(*p))
                .collect();
            driver.rearm_incoming_qos2(&answered);
        } else {
            // A new session: nothing of the old one counts. Subscribe again, send again what
            // the broker never acknowledged (in the original order).
            st.epoch += 1;
            st.stash.clear();
            st.held1.clear();
            st.qos2_in.clear();
            st.sub_pkid.clear();
            let mut ids: Vec<u32> = st
                .subs
                .keys()
                .filter(|id| !queued_subs.contains(id))
                .copied()
                .collect();
            ids.sort_unstable();
            front.extend(ids.into_iter().map(Req::Subscribe));
            st.pkid_pub.clear();
            if let Some((_, seq)) = st.collision.take() {
                if let Some(e) = st.pubs.get_mut(&seq) {
                    e.pkid = Some(0);
                }
                driver.reset_state();
            }
            // QoS 2 publishes whose PUBREC came but whose PUBCOMP did not are sent again too:
            // a broker that delivers on PUBREL (mosquitto) never delivered them, one that
            // delivers on PUBLISH did; a duplicate (same event id) beats a loss.
            let mut resend = Vec::new();
            for (seq, e) in st.pubs.iter_mut() {
                if e.pkid.is_some() {
                    e.pkid = None;
                    e.released = false;
                    resend.push(*seq);
                }
            }
            front.extend(resend.into_iter().map(Req::Publish));
        }
        front.extend(st.backlog.drain(..));
        st.backlog = front;
    }

    /// Routes an incoming PUBLISH to the local subscriptions it matches.
    fn on_publish(self: &Arc<Self>, st: &mut State, m: InMsg) {
        let (pkid, qos) = (m.pkid, m.qos);
        match qos {
            QoS::AtLeastOnce if m.dup && st.held1.contains(&pkid) => {
                // The broker resent what a consumer holds (or whose ack is on its way).
                return;
            }
            QoS::ExactlyOnce => match st.qos2_in.get(&pkid) {
                Some(true) => {
                    // Our PUBREC was lost: answer again, do not deliver twice.
                    let epoch = st.epoch;
                    st.backlog.push_back(Req::Ack { pkid, qos, epoch });
                    return;
                }
                Some(false) => return,
                None => {}
            },
            _ => {}
        }
        let Ok(topic) = std::str::from_utf8(&m.topic).map(Arc::<str>::from) else {
            tracing::warn!(pkid, "mqtt: dropping a message whose topic is not UTF-8");
            self.ack_now(st, pkid, qos);
            return;
        };
        let targets = Self::route(st, &topic, &m.sub_ids);
        if targets.is_empty() {
            if qos == QoS::AtMostOnce {
                return;
            }
            if st.gone.iter().any(|g| topic::matches(&topic, g)) {
                self.ack_now(st, pkid, qos);
            } else if st.stash.len() < STASH_LIMIT {
                st.stash.push_back(m);
            } else {
                tracing::warn!(
                    topic = &*topic,
                    "mqtt: no subscription matches and the stash is full; the broker redelivers in the next session"
                );
            }
            return;
        }
        match qos {
            QoS::AtLeastOnce => {
                st.held1.insert(pkid);
            }
            QoS::ExactlyOnce => {
                st.qos2_in.insert(pkid, false);
            }
            QoS::AtMostOnce => {}
        }
        let count = if m.dup { 2 } else { 1 };
        let event =
            match convert::decode_owned(m.payload, m.user_properties, m.content_type.as_deref()) {
                Ok(ev) => ev,
                Err(e) => {
                    self.telemetry.decode_failed(&e);
                    // A malformed CloudEvent: tell the consumers, and consume it so it does not
                    // come back for ever.
                    for id in &targets {
                        if let Some(s) = st.subs.get_mut(id) {
                            let copy = Error::new(e.kind(), BACKEND)
                                .with_message(format!("message on {topic}: {e}"));
                            if let Some(d) = s.offer(Err(copy)) {
                                st.garbage.push(d);
                            }
                        }
                    }
                    self.ack_now(st, pkid, qos);
                    return;
                }
            };
        let shared = (qos != QoS::AtMostOnce).then(|| {
            Arc::new(AckShared {
                inner: self.clone(),
                pkid,
                qos,
                epoch: st.epoch,
                remaining: AtomicUsize::new(targets.len()),
                dropped: AtomicBool::new(false),
            })
        });
        // The last target takes the event; the others get copies (the topic is shared).
        let last = targets.len() - 1;
        let mut event = Some(event);
        for (i, id) in targets.into_iter().enumerate() {
            let Some(s) = st.subs.get_mut(&id) else {
                continue;
            };
            let event = if i == last {
                event.take()
            } else {
                event.clone()
            };
            let Some(event) = event else { continue };
            let topic = Arc::clone(&topic);
            let delivery = match &shared {
                Some(shared) => Delivery::new(
                    event,
                    topic,
                    MqttAcker {
                        shared: shared.clone(),
                        settled: false,
                    },
                ),
                None => Delivery::new(event, topic, NoopAcker(BACKEND)),
            }
            .with_delivery_count(count);
            if let Some(d) = s.offer(Ok(delivery)) {
                st.garbage.push(d);
            }
        }
    }

    fn route(st: &State, topic: &str, sub_ids: &[usize]) -> Vec<u32> {
        let mut out: Vec<u32> = Vec::new();
        for sid in sub_ids {
            let Ok(id) = u32::try_from(*sid) else {
                continue;
            };
            if let Some(s) = st.subs.get(&id)
                && topic::matches(topic, topic::match_filter(&s.filter))
            {
                // Local subscriptions sharing this filter share the broker's subscription.
                out.extend(
                    st.subs
                        .iter()
                        .filter(|(_, o)| o.filter == s.filter)
                        .map(|(k, _)| *k),
                );
            }
        }
        if out.is_empty() {
            out.extend(
                st.subs
                    .iter()
                    .filter(|(_, s)| topic::matches(topic, topic::match_filter(&s.filter)))
                    .map(|(k, _)| *k),
            );
        }
        out.sort_unstable();
        out.dedup();
        out
    }

    fn ack_now(&self, st: &mut State, pkid: u16, qos: QoS) {
        if qos != QoS::AtMostOnce {
            let epoch = st.epoch;
            st.backlog.push_back(Req::Ack { pkid, qos, epoch });
        }
    }

    /// After a connection error: settle what rumqttc had buffered, put every request it had
    /// not started back in front of the backlog.
    fn on_error(self: &Arc<Self>, st: &mut State, driver: &mut Driver) {
        for ev in driver.after_error() {
            if self.handle(st, ev, driver) {
                st.closing = true;
            }
        }
        st.connected = false;
        let mut front: VecDeque<Req> = st.fifo.drain(..).collect();
        front.extend(st.backlog.drain(..));
        st.backlog = front;
    }

    /// Moves waiting deliveries of subscription `id` into its sink: the first with `permit`
    /// (`None`: the consumer is gone, they are dropped), then as many as fit.
    fn refill(&self, id: u32, permit: Option<mpsc::Permit<'_, Result<Delivery>>>) {
        self.with(|st| {
            let Some(s) = st.subs.get_mut(&id) else {
                return;
            };
            let Some(permit) = permit else {
                s.discard_overflow(&mut st.garbage);
                return;
            };
            if let Some(item) = s.overflow.pop_front() {
                permit.send(item);
            }
            s.flush_overflow(&mut st.garbage);
        });
    }

    /// Ends the connection's books: everything pending fails with `Closed`.
    fn finish(&self) {
        self.with(|st| {
            st.closed = true;
            st.connected = false;
            for (_, mut e) in std::mem::take(&mut st.pubs) {
                if let Some(w) = e.waiter.take() {
                    let _ = w.send(Err(Error::closed(BACKEND).with_message(
                        "the connection closed before the broker acknowledged the publish",
                    )));
                }
            }
            st.flushes.clear();
            for (_, mut s) in std::mem::take(&mut st.subs) {
                s.discard_overflow(&mut st.garbage);
                if let Some(w) = s.waiter.take() {
                    let _ = w.send(Err(Error::closed(BACKEND)));
                }
            }
            st.backlog.clear();
            st.fifo.clear();
            st.stash.clear();
            if let Some(first) = st.first.take() {
                let _ = first.send(Err(Error::closed(BACKEND)));
            }
        });
        // `send_replace`, not `send`: `send` keeps the old value when nobody is subscribed
        // yet, and `close` subscribes only after it started the DISCONNECT, which the task
        // may already have sent and ended on; `close` then waited out its whole timeout.
        self.done_tx.send_replace(true);
    }

    /// Starts a clean disconnect without waiting (for `Drop`).
    pub(crate) fn close_nowait(&self) {
        self.with(|st| {
            if !st.closing && !st.closed {
                st.closing = true;
                st.backlog.push_back(Req::Disconnect);
                self.pump(st);
            }
        });
        self.shutdown.notify_one();
    }

    /// Optionally flushes, then sends DISCONNECT and waits for the task to end.
    pub(crate) async fn close(&self, flush: bool) -> Result<()> {
        let timeout = self.cfg.close_timeout;
        let mut flushed = Ok(());
        if flush && !self.is_closed() {
            flushed = match tokio::time::timeout(timeout, self.flush()).await {
                Ok(r) => r,
                Err(_) => Err(err(
                    ErrorKind::Timeout,
                    format!("publishes still unacknowledged after {timeout:?}; closing anyway"),
                )),
            };
        }
        self.close_nowait();
        let mut done = self.done_tx.subscribe();
        if tokio::time::timeout(timeout, done.wait_for(|d| *d))
            .await
            .is_err()
        {
            self.abort();
        }
        flushed
    }

    /// Ends the task at once, without DISCONNECT: the broker sees the connection drop and
    /// publishes the last will.
    pub(crate) fn abort(&self) {
        if let Some(task) = self.task.lock().unwrap_or_else(|e| e.into_inner()).take() {
            task.abort();
        }
        self.finish();
    }

    /// A receiver that turns `true` when the task has ended.
    pub(crate) fn done(&self) -> watch::Receiver<bool> {
        self.done_tx.subscribe()
    }
}

/// The connection task.
async fn run(inner: Arc<Inner>, mut driver: Driver) {
    let mut attempts: u32 = 0;
    loop {
        // Backpressure: while a consumer's buffer is full, read nothing more from the broker.
        // A closing connection reads on, to get its DISCONNECT out.
        let (waiting, connected) = {
            let st = inner.lock();
            let waiting = (!st.closing && !st.closed)
                .then(|| st.first_overflow())
                .flatten();
            (waiting, st.connected)
        };
        if let Some((id, sink)) = waiting {
            tokio::select! {
                permit = sink.reserve() => inner.refill(id, permit.ok()),
                () = inner.shutdown.notified() => {}
            }
            continue;
        }
        let polled = if connected {
            Some(driver.poll().await)
        } else {
            // Connecting: cancelling the attempt loses nothing.
            tokio::select! {
                r = driver.poll() => Some(r),
                () = inner.shutdown.notified() => None,
            }
        };
        match polled {
            None => {
                if inner.is_closed() {
                    break;
                }
            }
            Some(Ok(ev)) => {
                let is_connack = matches!(ev, Ev::ConnAck { .. });
                let exit = inner.with(|st| inner.handle(st, ev, &mut driver));
                if is_connack {
                    attempts = 0;
                }
                if exit {
                    break;
                }
            }
            Some(Err(e)) => {
                let text = e.to_string();
                let (first, closing) = inner.with(|st| {
                    inner.on_error(st, &mut driver);
                    (st.first.take(), st.closing || st.closed)
                });
                if let Some(first) = first {
                    let _ = first.send(Err(e));
                    break;
                }
                if closing {
                    break;
                }
                attempts = attempts.saturating_add(1);
                let delay = driver::backoff(attempts, inner.cfg.backoff_min, inner.cfg.backoff_max);
                tracing::warn!(error = %text, attempt = attempts, ?delay, "mqtt: connection lost, reconnecting");
                tokio::select! {
                    () = tokio::time::sleep(delay) => {}
                    () = inner.shutdown.notified() => {
                        if inner.is_closed() {
                            break;
                        }
                    }
                }
            }
        }
    }
    drop(driver);
    inner.finish();
}

/// The settlement state of one received QoS 1/2 message, shared by its deliveries (one per
/// local subscription it matched).
struct AckShared {
    inner: Arc<Inner>,
    pkid: u16,
    qos: QoS,
    epoch: u64,
    remaining: AtomicUsize,
    dropped: AtomicBool,
}

/// Settles an MQTT QoS 1/2 delivery: `ack` (and `term`) send PUBACK/PUBREC once every local
/// delivery of the message is acked; `nack` is unsupported (MQTT has none); a delivery dropped
/// unsettled is not acknowledged, so the broker sends it again in the next session of a
/// persistent client.
struct MqttAcker {
    shared: Arc<AckShared>,
    settled: bool,
}

impl MqttAcker {
    fn settle(&mut self, acked: bool) {
        if self.settled {
            return;
        }
        self.settled = true;
        let s = &self.shared;
        if !acked {
            s.dropped.store(true, Ordering::Release);
        }
        if s.remaining.fetch_sub(1, Ordering::AcqRel) == 1 {
            if s.dropped.load(Ordering::Acquire) {
                s.inner.release(s.pkid, s.qos, s.epoch);
            } else {
                s.inner.ack(s.pkid, s.qos, s.epoch);
            }
        }
    }
}

impl Acker for MqttAcker {
    fn backend(&self) -> &'static str {
        BACKEND
    }
    fn ack(&mut self) -> AckFuture<'_> {
        self.settle(true);
        AckFuture::ready(Ok(()))
    }
    fn term(&mut self) -> AckFuture<'_> {
        // MQTT has no reject: consuming the message is how it is never delivered again.
        self.settle(true);
        AckFuture::ready(Ok(()))
    }
}

impl Drop for MqttAcker {
    fn drop(&mut self) {
        self.settle(false);
    }
}
