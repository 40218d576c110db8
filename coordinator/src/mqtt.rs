//! The MQTT link: client options, and the task that drives rumqttc's event loop.
//!
//! The link task owns the `EventLoop` and nothing else: it forwards connects, disconnects and
//! incoming messages to the main loop, and sleeps with exponential backoff between failed
//! attempts (rumqttc itself retries on the very next `poll`, with no delay). The main loop
//! owns the `AsyncClient` and only ever uses its non-blocking `try_*` methods, so it never
//! waits on the event loop it depends on.
//!
//! What rumqttc does on reconnect matters here: with a clean session, requests still queued
//! when the connection dropped are discarded at the next ConnAck. Subscriptions and retained
//! commands are therefore re-sent by the main loop on every [`LinkEvent::Connected`].

use std::sync::Arc;
use std::time::Duration;

use rand::RngCore as _;
use rumqttc::{AsyncClient, Event, EventLoop, MqttOptions, Outgoing, Packet, Publish};
use tokio::sync::{mpsc, watch, Notify};
use tokio::task::JoinHandle;

use protocol::format::MAX_MQTT_PACKET;

const KEEP_ALIVE: Duration = Duration::from_secs(30);
const BACKOFF_MIN: Duration = Duration::from_millis(200);
const BACKOFF_MAX: Duration = Duration::from_secs(10);
/// Requests rumqttc buffers between the main loop and the socket. Kept moderate because a
/// chunk frame is up to ~260 KiB; the main loop keeps its own bounded outbox behind it.
const REQUEST_CHANNEL: usize = 256;
/// How long a clean disconnect may take at shutdown.
const DISCONNECT_GRACE: Duration = Duration::from_secs(3);

/// What the link task tells the main loop.
#[derive(Debug)]
pub enum LinkEvent {
    /// A (re)connection was acknowledged, with a new clean session: nothing is subscribed.
    Connected,
    /// The connection dropped; requests queued in rumqttc will be discarded on reconnect.
    Disconnected,
    /// A message from the broker.
    Message(Publish),
}

/// The client half of the MQTT connection, plus the task driving it.
pub struct Link {
    pub client: AsyncClient,
    pub events: mpsc::Receiver<LinkEvent>,
    /// Notified whenever rumqttc sent a request, i.e. its request channel has room again.
    pub room: Arc<Notify>,
    stop: watch::Sender<bool>,
    task: JoinHandle<()>,
}

impl Link {
    /// Starts connecting to `host:port` in the background; returns at once.
    pub fn start(host: &str, port: u16) -> Link {
        let mut suffix = [0u8; 4];
        rand::rngs::OsRng.fill_bytes(&mut suffix);
        let mut options =
            MqttOptions::new(format!("coordinator-{}", hex::encode(suffix)), host, port);
        options
            .set_clean_session(true)
            .set_keep_alive(KEEP_ALIVE)
            // rumqttc's default limit is 10 KiB; commands embed whole manifests.
            .set_max_packet_size(MAX_MQTT_PACKET, MAX_MQTT_PACKET);
        let (client, eventloop) = AsyncClient::new(options, REQUEST_CHANNEL);
        let (events_tx, events) = mpsc::channel(1024);
        let room = Arc::new(Notify::new());
        let (stop, stop_rx) = watch::channel(false);
        let broker = format!("{host}:{port}");
        let task = tokio::spawn(drive(eventloop, events_tx, room.clone(), stop_rx, broker));
        Link {
            client,
            events,
            room,
            stop,
            task,
        }
    }

    /// Sends a clean DISCONNECT if connected, and stops the link task.
    pub async fn close(self) {
        let Link {
            client,
            events,
            stop,
            mut task,
            ..
        } = self;
        // The task exits when the DISCONNECT went out, or at once if it is between attempts.
        let _ = client.try_disconnect();
        let _ = stop.send(true);
        drop(events);
        if tokio::time::timeout(DISCONNECT_GRACE, &mut task)
            .await
            .is_err()
        {
            tracing::warn!("MQTT disconnect did not finish in time; dropping the connection");
            task.abort();
        }
    }
}

/// Drives rumqttc's event loop until stopped. See the module doc.
async fn drive(
    mut eventloop: EventLoop,
    events: mpsc::Sender<LinkEvent>,
    room: Arc<Notify>,
    mut stop: watch::Receiver<bool>,
    broker: String,
) {
    let mut backoff = Backoff::new(BACKOFF_MIN, BACKOFF_MAX);
    let mut state = LinkState::Starting;
    loop {
        let forward = match eventloop.poll().await {
            Ok(Event::Incoming(Packet::ConnAck(_))) => {
                backoff.reset();
                match state.on_connack() {
                    Some(LinkChange::Up { after_failures: 0 }) => {
                        tracing::info!(broker = %broker, "connected to the MQTT broker");
                    }
                    Some(LinkChange::Up { after_failures }) => {
                        tracing::info!(broker = %broker, after_failures, "connected to the MQTT broker");
                    }
                    _ => {}
                }
                Some(LinkEvent::Connected)
            }
            Ok(Event::Incoming(Packet::Publish(publish))) => Some(LinkEvent::Message(publish)),
            Ok(Event::Outgoing(Outgoing::Disconnect)) => return,
            Ok(Event::Outgoing(_)) => {
                room.notify_one();
                None
            }
            Ok(Event::Incoming(_)) => None,
            Err(error) => {
                let was_up = state.is_up();
                match state.on_error() {
                    Some(LinkChange::Lost) => tracing::warn!(
                        broker = %broker, error = %error,
                        "lost the connection to the MQTT broker; reconnecting with backoff"
                    ),
                    Some(LinkChange::Unreachable) => tracing::warn!(
                        broker = %broker, error = %error,
                        "cannot connect to the MQTT broker; retrying with backoff (is it running? see --broker)"
                    ),
                    _ => {
                        tracing::debug!(broker = %broker, error = %error, "MQTT connect attempt failed")
                    }
                }
                if was_up && events.send(LinkEvent::Disconnected).await.is_err() {
                    return;
                }
                if *stop.borrow() {
                    return;
                }
                tokio::select! {
                    () = tokio::time::sleep(backoff.next_delay()) => {}
                    _ = stop.changed() => return,
                }
                None
            }
        };
        if let Some(event) = forward {
            if events.send(event).await.is_err() {
                return;
            }
        }
    }
}

/// Exponential backoff: `min`, doubling up to `max`, back to `min` on [`Backoff::reset`].
#[derive(Debug)]
pub struct Backoff {
    min: Duration,
    max: Duration,
    next: Duration,
}

impl Backoff {
    pub fn new(min: Duration, max: Duration) -> Backoff {
        Backoff {
            min,
            max,
            next: min,
        }
    }

    pub fn next_delay(&mut self) -> Duration {
        let delay = self.next;
        self.next = (self.next * 2).min(self.max);
        delay
    }

    pub fn reset(&mut self) {
        self.next = self.min;
    }
}

/// The connection's state as far as logging goes: one line per change, not per attempt.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum LinkState {
    /// Never connected yet.
    Starting,
    Up,
    Down {
        failures: u32,
    },
}

#[derive(Debug, PartialEq, Eq)]
enum LinkChange {
    Up { after_failures: u32 },
    Lost,
    Unreachable,
}

impl LinkState {
    fn is_up(self) -> bool {
        self == LinkState::Up
    }

    fn on_connack(&mut self) -> Option<LinkChange> {
        let change = match *self {
            LinkState::Up => None,
            LinkState::Starting => Some(LinkChange::Up { after_failures: 0 }),
            LinkState::Down { failures } => Some(LinkChange::Up {
                after_failures: failures,
            }),
        };
        *self = LinkState::Up;
        change
    }

    fn on_error(&mut self) -> Option<LinkChange> {
        let (next, change) = match *self {
            LinkState::Up => (LinkState::Down { failures: 1 }, Some(LinkChange::Lost)),
            LinkState::Starting => (
                LinkState::Down { failures: 1 },
                Some(LinkChange::Unreachable),
            ),
            LinkState::Down { failures } => (
                LinkState::Down {
                    failures: failures.saturating_add(1),
                },
                None,
            ),
        };
        *self = next;
        change
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn backoff_doubles_from_200ms_to_10s_and_resets() {
        let mut backoff = Backoff::new(BACKOFF_MIN, BACKOFF_MAX);
        let delays: Vec<u128> = (0..9).map(|_| backoff.next_delay().as_millis()).collect();
        assert_eq!(
            delays,
            [200, 400, 800, 1600, 3200, 6400, 10_000, 10_000, 10_000]
        );
        backoff.reset();
        assert_eq!(backoff.next_delay(), BACKOFF_MIN);
    }

    #[test]
    fn the_link_logs_once_per_state_change_not_per_attempt() {
        let mut state = LinkState::Starting;
        assert_eq!(state.on_error(), Some(LinkChange::Unreachable));
        assert_eq!(state.on_error(), None);
        assert_eq!(state.on_error(), None);
        assert_eq!(
            state.on_connack(),
            Some(LinkChange::Up { after_failures: 3 })
        );
        assert_eq!(state.on_error(), Some(LinkChange::Lost));
        assert_eq!(state.on_error(), None);
        assert_eq!(
            state.on_connack(),
            Some(LinkChange::Up { after_failures: 2 })
        );
    }
}
