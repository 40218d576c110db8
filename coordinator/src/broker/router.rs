//! The embedded broker's state: sessions, subscriptions, retained messages and each
//! session's outgoing queue. Methods only change this state; the connection tasks
//! (`connection.rs`) do the network I/O and call in here under one lock.
//!
//! Invariants:
//! - A message's payload is stored once (`Bytes`), however many queues hold it; a retained
//!   or small payload is a copy of its own, so it never keeps a connection's read buffer
//!   alive. The retained store keeps a compressed copy of its own of a large payload when
//!   that saves memory (`retained.rs`); then only queues hold it as published, until sent.
//! - Every queue is bounded in messages and in payload bytes; a message that does not fit
//!   is dropped for that session only (as Mosquitto's `max_queued_messages` does), and
//!   packets the broker owes the client (acks, ping replies) always fit.
//! - At most one connection owns a session. A new CONNECT with the same client id takes it
//!   over; the old connection finds out the next time it asks for work and closes.
//! - QoS 1 messages sent and not yet acknowledged are kept, and sent again (with DUP) first
//!   when a persistent session reconnects. QoS 2 is not supported.

use std::collections::{BTreeMap, HashMap, VecDeque};
use std::sync::Arc;

use bytes::Bytes;
use rumqttc::mqttbytes::{matches, valid_filter, valid_topic};
use rumqttc::{Packet, QoS, SubscribeReasonCode};
use tokio::sync::Notify;

use retained::Retained;

mod retained;

/// Most messages queued for one session (sent or not, acked or not).
pub const MAX_QUEUED_MESSAGES: usize = 10_000;
/// Most payload bytes queued for one session. Payloads are shared between the sessions
/// that queue them, so this bounds how far a slow subscriber can hold the fleet's traffic,
/// not a copy per session.
pub const MAX_QUEUED_BYTES: usize = 64 * 1024 * 1024;
/// Most messages and payload bytes kept for a persistent session while its client is away
/// (Mosquitto keeps 1,000 by default). A node gone for good must not collect every command
/// sent to it; the one that matters, its newest, is retained and sent again anyway when it
/// subscribes.
pub const MAX_QUEUED_WHILE_AWAY: usize = 1_000;
pub const MAX_QUEUED_BYTES_WHILE_AWAY: usize = 4 * 1024 * 1024;
/// Payloads up to this size, and every retained one, are copied out of the buffer they
/// were read into before they are kept. A kept slice keeps its whole read buffer alive,
/// and a thousand nodes' small reports queued for the coordinator would each pin one;
/// larger live payloads (chunk frames, commands) are shared, not copied.
const COPY_PAYLOADS_UP_TO: usize = 16 * 1024;
/// Most QoS 1 messages sent to a client and not yet acknowledged.
pub const MAX_INFLIGHT: usize = 64;

/// One connection's identity: the session's client id and which connection of it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ConnectionId {
    pub client: Arc<str>,
    pub serial: u64,
}

/// A message as routed: published once, shared by every queue that holds it.
#[derive(Debug, Clone)]
pub struct Message {
    pub topic: Arc<str>,
    pub payload: Bytes,
    pub qos: QoS,
    pub retain: bool,
}

/// What the writer of a connection sends next.
#[derive(Debug)]
pub enum Outgoing {
    /// A reply the broker owes the client (CONNACK, SUBACK, PUBACK, PINGRESP, ...).
    Reply(Packet),
    /// A message to deliver; `pkid` is set for QoS 1, `dup` when it is sent again.
    Deliver {
        message: Message,
        pkid: u16,
        dup: bool,
    },
}

/// The answer to a writer asking for work.
#[derive(Debug)]
pub enum Work {
    Send(Vec<Outgoing>),
    /// Nothing to send yet: wait on the session's notify.
    Wait(Arc<Notify>),
    /// This connection no longer owns the session (taken over or closed).
    Closed,
}

#[derive(Debug)]
struct Session {
    /// The connection that owns the session; `None` while the client is away.
    owner: Option<u64>,
    clean: bool,
    subscriptions: HashMap<String, QoS>,
    replies: VecDeque<Packet>,
    queue: VecDeque<Message>,
    queued_bytes: usize,
    /// QoS 1 messages sent and not yet acknowledged, by packet id.
    inflight: BTreeMap<u16, Message>,
    /// Messages in `inflight` that the current connection has not sent yet (a resumed
    /// session's unacknowledged ones, sent again first).
    resend: VecDeque<u16>,
    next_pkid: u16,
    wake: Arc<Notify>,
    dropped: u64,
}

impl Session {
    fn new(clean: bool) -> Session {
        Session {
            owner: None,
            clean,
            subscriptions: HashMap::new(),
            replies: VecDeque::new(),
            queue: VecDeque::new(),
            queued_bytes: 0,
            inflight: BTreeMap::new(),
            resend: VecDeque::new(),
            next_pkid: 0,
            wake: Arc::new(Notify::new()),
            dropped: 0,
        }
    }

    fn held(&self) -> usize {
        self.queue.len() + self.inflight.len()
    }

    /// Queues `message` unless the session is full or cannot take it while away.
    fn offer(&mut self, message: Message) {
        if self.owner.is_none() && message.qos == QoS::AtMostOnce {
            return;
        }
        let (most, most_bytes) = match self.owner {
            Some(_) => (MAX_QUEUED_MESSAGES, MAX_QUEUED_BYTES),
            None => (MAX_QUEUED_WHILE_AWAY, MAX_QUEUED_BYTES_WHILE_AWAY),
        };
        if self.held() >= most || self.queued_bytes + message.payload.len() > most_bytes {
            self.dropped += 1;
            return;
        }
        self.queued_bytes += message.payload.len();
        self.queue.push_back(message);
        self.wake.notify_one();
    }

    fn reply(&mut self, packet: Packet) {
        self.replies.push_back(packet);
        self.wake.notify_one();
    }

    fn take_pkid(&mut self) -> u16 {
        loop {
            self.next_pkid = self.next_pkid.checked_add(1).unwrap_or(1);
            if !self.inflight.contains_key(&self.next_pkid) {
                return self.next_pkid;
            }
        }
    }
}

/// The result of a CONNECT.
#[derive(Debug)]
pub struct Connected {
    pub id: ConnectionId,
    pub session_present: bool,
}

/// Sessions, subscriptions and retained messages of the embedded broker.
#[derive(Debug, Default)]
pub struct Router {
    sessions: HashMap<Arc<str>, Session>,
    /// Filters without wildcards, by topic: most subscriptions (a node's inbox, a release's
    /// chunk topic), found with one lookup per publish.
    exact: HashMap<String, HashMap<Arc<str>, QoS>>,
    /// Filters with wildcards (the coordinator's few), matched one by one.
    wildcard: HashMap<String, HashMap<Arc<str>, QoS>>,
    retained: HashMap<Arc<str>, Retained>,
    next_serial: u64,
}

impl Router {
    /// Opens a session for `client` (or resumes its persistent one) and makes a new
    /// connection its owner. A connection that owned it before is closed by this.
    pub fn connect(&mut self, client: &str, clean: bool) -> Connected {
        self.next_serial += 1;
        let serial = self.next_serial;
        let resumable = !clean && self.sessions.get(client).is_some_and(|s| !s.clean);
        if !resumable {
            if let Some(old) = self.sessions.get(client) {
                // Wake the old connection's writer so it sees it lost the session.
                old.wake.notify_one();
            }
            self.remove_session(client);
        }
        let key: Arc<str> = match self.sessions.get_key_value(client) {
            Some((key, _)) => key.clone(),
            None => Arc::from(client),
        };
        let session = self
            .sessions
            .entry(key.clone())
            .or_insert_with(|| Session::new(clean));
        // The old connection's writer is waiting on the old notify; a fresh one for the
        // new connection, after waking the old, keeps the two from stealing wakeups.
        session.wake.notify_one();
        session.wake = Arc::new(Notify::new());
        session.owner = Some(serial);
        session.replies.clear();
        session.resend = session.inflight.keys().copied().collect();
        Connected {
            id: ConnectionId {
                client: key,
                serial,
            },
            session_present: resumable,
        }
    }

    /// The connection ended. Returns whether it still owned its session (so that its will,
    /// if any, is due). A clean session is forgotten; a persistent one keeps its
    /// subscriptions and QoS 1 messages for the client's return.
    pub fn disconnect(&mut self, id: &ConnectionId) -> bool {
        let Some(session) = self.sessions.get_mut(&id.client) else {
            return false;
        };
        if session.owner != Some(id.serial) {
            return false;
        }
        session.owner = None;
        if session.clean {
            self.remove_session(&id.client);
        } else {
            session.replies.clear();
            session.resend.clear();
            let dropped: usize = session
                .queue
                .iter()
                .filter(|m| m.qos == QoS::AtMostOnce)
                .map(|m| m.payload.len())
                .sum();
            session.queue.retain(|m| m.qos == QoS::AtLeastOnce);
            session.queued_bytes -= dropped;
        }
        true
    }

    fn remove_session(&mut self, client: &str) {
        let Some(session) = self.sessions.remove(client) else {
            return;
        };
        for filter in session.subscriptions.keys() {
            self.forget_subscriber(filter, client);
        }
    }

    /// The subscriber table `filter` belongs in.
    fn table_for(&mut self, filter: &str) -> &mut HashMap<String, HashMap<Arc<str>, QoS>> {
        if filter_has_wildcards(filter) {
            &mut self.wildcard
        } else {
            &mut self.exact
        }
    }

    fn forget_subscriber(&mut self, filter: &str, client: &str) {
        let table = self.table_for(filter);
        if let Some(subscribers) = table.get_mut(filter) {
            subscribers.remove(client);
            if subscribers.is_empty() {
                table.remove(filter);
            }
        }
    }

    fn owned(&mut self, id: &ConnectionId) -> Option<&mut Session> {
        self.sessions
            .get_mut(&id.client)
            .filter(|s| s.owner == Some(id.serial))
    }

    /// Queues a reply the broker owes the client of `id`.
    pub fn reply(&mut self, id: &ConnectionId, packet: Packet) {
        if let Some(session) = self.owned(id) {
            session.reply(packet);
        }
    }

    /// Subscribes `id`'s session to each filter and queues the SUBACK, then the retained
    /// messages the new filters match.
    pub fn subscribe(&mut self, id: &ConnectionId, pkid: u16, filters: &[(String, QoS)]) {
        if self.owned(id).is_none() {
            return;
        }
        let mut codes = Vec::with_capacity(filters.len());
        let mut granted = Vec::new();
        for (filter, requested) in filters {
            if !valid_filter(filter) {
                codes.push(SubscribeReasonCode::Failure);
                continue;
            }
            let qos = match requested {
                QoS::AtMostOnce => QoS::AtMostOnce,
                QoS::AtLeastOnce | QoS::ExactlyOnce => QoS::AtLeastOnce,
            };
            codes.push(SubscribeReasonCode::Success(qos));
            self.table_for(filter)
                .entry(filter.clone())
                .or_default()
                .insert(id.client.clone(), qos);
            if let Some(session) = self.owned(id) {
                session.subscriptions.insert(filter.clone(), qos);
            }
            granted.push((filter.as_str(), qos));
        }
        // Most filters are exact (every agent's inbox, at each reconnect): one lookup each.
        // Only a wildcard filter scans the store.
        let mut retained: HashMap<Arc<str>, (&Retained, QoS)> = HashMap::new();
        for (filter, granted) in granted {
            let matching: Box<dyn Iterator<Item = &Retained>> = if filter_has_wildcards(filter) {
                Box::new(
                    self.retained
                        .values()
                        .filter(|message| matches(message.topic(), filter)),
                )
            } else {
                Box::new(self.retained.get(filter).into_iter())
            };
            for message in matching {
                let qos = lower(message.qos(), granted);
                retained
                    .entry(message.topic().clone())
                    .and_modify(|(_, q)| *q = higher(*q, qos))
                    .or_insert((message, qos));
            }
        }
        let retained: Vec<Message> = retained
            .into_values()
            .map(|(message, qos)| message.message(qos))
            .collect();
        let Some(session) = self.owned(id) else {
            return;
        };
        session.reply(Packet::SubAck(rumqttc::SubAck::new(pkid, codes)));
        for message in retained {
            session.offer(message);
        }
    }

    /// Removes `id`'s subscriptions to `filters` and queues the UNSUBACK.
    pub fn unsubscribe(&mut self, id: &ConnectionId, pkid: u16, filters: &[String]) {
        let Some(session) = self.owned(id) else {
            return;
        };
        for filter in filters {
            session.subscriptions.remove(filter);
        }
        for filter in filters {
            self.forget_subscriber(filter, &id.client);
        }
        self.reply(id, Packet::UnsubAck(rumqttc::UnsubAck::new(pkid)));
    }

    /// Routes a message to every matching subscription and, if `retain`, stores it (an
    /// empty retained payload deletes the topic's retained message). Topics are checked by
    /// the caller ([`valid_publish_topic`]).
    pub fn publish(&mut self, topic: &str, payload: Bytes, qos: QoS, retain: bool) {
        let topic: Arc<str> = Arc::from(topic);
        let payload = if retain || payload.len() <= COPY_PAYLOADS_UP_TO {
            Bytes::copy_from_slice(&payload)
        } else {
            payload
        };
        if retain {
            if payload.is_empty() {
                self.retained.remove(&topic);
            } else {
                self.retained.insert(
                    topic.clone(),
                    Retained::new(topic.clone(), payload.clone(), qos),
                );
            }
        }
        // A client with overlapping subscriptions gets one copy, at the highest QoS.
        let mut targets: HashMap<Arc<str>, QoS> = HashMap::new();
        let exact = self.exact.get(&*topic).into_iter();
        let wildcard = self
            .wildcard
            .iter()
            .filter(|(filter, _)| matches(&topic, filter))
            .map(|(_, subscribers)| subscribers);
        for subscribers in exact.chain(wildcard) {
            for (client, granted) in subscribers {
                let qos = lower(qos, *granted);
                targets
                    .entry(client.clone())
                    .and_modify(|q| *q = higher(*q, qos))
                    .or_insert(qos);
            }
        }
        for (client, qos) in targets {
            if let Some(session) = self.sessions.get_mut(&client) {
                session.offer(Message {
                    topic: topic.clone(),
                    payload: payload.clone(),
                    qos,
                    retain: false,
                });
            }
        }
    }

    /// The client acknowledged QoS 1 message `pkid`.
    pub fn acknowledge(&mut self, id: &ConnectionId, pkid: u16) {
        if let Some(session) = self.owned(id) {
            if let Some(message) = session.inflight.remove(&pkid) {
                session.queued_bytes -= message.payload.len();
                session.wake.notify_one();
            }
        }
    }

    /// What `id`'s writer sends next: replies first, then unacknowledged messages of a
    /// resumed session, then queued ones while the in-flight window has room.
    pub fn next_work(&mut self, id: &ConnectionId, most: usize) -> Work {
        let Some(session) = self.owned(id) else {
            return Work::Closed;
        };
        let mut batch = Vec::new();
        while batch.len() < most {
            if let Some(packet) = session.replies.pop_front() {
                batch.push(Outgoing::Reply(packet));
                continue;
            }
            if let Some(pkid) = session.resend.pop_front() {
                if let Some(message) = session.inflight.get(&pkid) {
                    batch.push(Outgoing::Deliver {
                        message: message.clone(),
                        pkid,
                        dup: true,
                    });
                }
                continue;
            }
            let window_full = session.inflight.len() >= MAX_INFLIGHT;
            let Some(front) = session.queue.front() else {
                break;
            };
            if front.qos == QoS::AtLeastOnce && window_full {
                break;
            }
            let message = session.queue.pop_front().expect("front exists");
            let mut pkid = 0;
            if message.qos == QoS::AtLeastOnce {
                pkid = session.take_pkid();
                session.inflight.insert(pkid, message.clone());
            } else {
                session.queued_bytes -= message.payload.len();
            }
            batch.push(Outgoing::Deliver {
                message,
                pkid,
                dup: false,
            });
        }
        if batch.is_empty() {
            Work::Wait(session.wake.clone())
        } else {
            Work::Send(batch)
        }
    }

    /// Messages dropped for `client` because its queue was full, since its session began.
    pub fn dropped(&self, client: &str) -> u64 {
        self.sessions.get(client).map_or(0, |s| s.dropped)
    }

    #[cfg(test)]
    fn retained_count(&self) -> usize {
        self.retained.len()
    }
}

/// Whether clients may publish to `topic`: not empty, no wildcards.
pub fn valid_publish_topic(topic: &str) -> bool {
    !topic.is_empty() && valid_topic(topic)
}

fn filter_has_wildcards(filter: &str) -> bool {
    filter.contains(['+', '#'])
}

fn lower(a: QoS, b: QoS) -> QoS {
    if (a as u8) <= (b as u8) {
        a
    } else {
        b
    }
}

fn higher(a: QoS, b: QoS) -> QoS {
    if (a as u8) >= (b as u8) {
        a
    } else {
        b
    }
}

#[cfg(test)]
mod tests;
