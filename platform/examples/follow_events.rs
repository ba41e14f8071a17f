//! An integrator in Rust: catch up on stored events after the last id seen, then follow live
//! events, verifying the platform's signature on each and following the platform's key chain
//! across key rotations. See docs/integrators.md.
//!
//! cargo run -p fleetcast-platform --example follow_events -- erp.toml [LAST_ID]
//! (erp.toml is what `fleetcast integrator add erp` prints)

use std::time::Duration;

use fleetcast_proto::admin::FleetEvent;
use fleetcast_proto::auth::{PlatformPublicKey, Purpose, SignedEnvelope};
use fleetcast_proto::events::{EventBatch, EventsRequest};
use fleetcast_proto::keychain::KeyChain;
use rumqttc::{AsyncClient, Event, Incoming, MqttOptions, QoS};
use serde::de::DeserializeOwned;

#[derive(serde::Deserialize)]
struct Config {
    broker: String,
    username: String,
    password: String,
    platform_key: PlatformPublicKey,
    #[serde(default)]
    platform_key_gen: u32,
    topic_prefix: String,
    events_topic: String,
    request_topic: String,
    response_topic: String,
}

/// The key generation reached along the key chain and its key; what a message signed by a
/// later generation is judged by once the chain gets there.
struct Trust {
    generation: u32,
    key: PlatformPublicKey,
}

/// What a message is, judged by [`Trust::check`].
enum Verdict<T> {
    Verified(T),
    /// Signed by a later generation than the chain has reached: keep it, check it again later.
    Later,
    Dropped(String),
}

impl Trust {
    fn check<T: DeserializeOwned>(&self, purpose: Purpose, payload: &[u8]) -> Verdict<T> {
        let env: SignedEnvelope = match serde_json::from_slice(payload) {
            Ok(env) => env,
            Err(e) => return Verdict::Dropped(format!("not a signed envelope: {e}")),
        };
        if env.gen > self.generation {
            return Verdict::Later;
        }
        if env.gen < self.generation {
            return Verdict::Dropped(format!(
                "signed by key generation {}, rotated away",
                env.gen
            ));
        }
        match self.key.verify_envelope(purpose, &env) {
            Ok(body) => Verdict::Verified(body),
            Err(e) => Verdict::Dropped(e.to_string()),
        }
    }

    /// Follows the chain published on the keys topic; whether it got further.
    fn follow(&mut self, payload: &[u8]) -> bool {
        let reached = KeyChain::parse(payload)
            .map_err(|e| e.to_string())
            .and_then(|c| {
                c.follow(self.generation, self.key)
                    .map_err(|e| e.to_string())
            });
        match reached {
            Ok((generation, key)) if generation > self.generation => {
                eprintln!("key chain followed to generation {generation}");
                (self.generation, self.key) = (generation, key);
                true
            }
            Ok(_) => false,
            Err(e) => {
                eprintln!("dropped a key chain that does not verify: {e}");
                false
            }
        }
    }
}

/// Most messages kept while the key chain has not reached the generation that signed them.
const MAX_HELD: usize = 1000;

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let mut args = std::env::args().skip(1);
    let path = args
        .next()
        .ok_or_else(|| anyhow::anyhow!("usage: follow_events CONFIG [LAST_ID]"))?;
    let mut last: u64 = args.next().map(|s| s.parse()).transpose()?.unwrap_or(0);
    let cfg: Config = toml::from_str(&std::fs::read_to_string(&path)?)?;
    let url: fleetcast_broker::BrokerUrl = cfg.broker.parse()?;
    let mut opts = MqttOptions::new(&cfg.username, url.host, url.port);
    opts.set_credentials(&cfg.username, &cfg.password);
    opts.set_keep_alive(Duration::from_secs(10));
    opts.set_max_packet_size(2 << 20, 2 << 20);
    let (client, mut eventloop) = AsyncClient::new(opts, 64);
    let ask = |since| serde_json::to_vec(&EventsRequest { since, limit: None }).expect("json");
    let keys_topic = format!("{}/platform/keys", cfg.topic_prefix);
    let mut trust = Trust {
        generation: cfg.platform_key_gen,
        key: cfg.platform_key,
    };
    // Messages signed by a generation the chain has not reached yet: (topic, payload).
    let mut held: Vec<(String, Vec<u8>)> = Vec::new();
    // Live events that came while catching up: shown once the catch-up is done, in order
    // (shown at once, they would make the older events of the catch-up look like repeats).
    let mut live: Option<Vec<FleetEvent>> = Some(Vec::new());
    // More came live than kept meanwhile: catch up once more after this round.
    let mut overflowed = false;
    loop {
        let (topic, payload) = match eventloop.poll().await {
            Ok(Event::Incoming(Incoming::ConnAck(_))) => {
                live.get_or_insert_with(Vec::new);
                // The keys first: the broker hands out a filter's retained message at once.
                for t in [&keys_topic, &cfg.response_topic, &cfg.events_topic] {
                    client.subscribe(t, QoS::AtLeastOnce).await?;
                }
                client
                    .publish(&cfg.request_topic, QoS::AtLeastOnce, false, ask(last))
                    .await?;
                continue;
            }
            Ok(Event::Incoming(Incoming::Publish(p))) => (p.topic, p.payload.to_vec()),
            Ok(_) => continue,
            Err(e) => {
                eprintln!("connection: {e}; retrying");
                tokio::time::sleep(Duration::from_secs(1)).await;
                continue;
            }
        };
        let mut todo = vec![(topic, payload)];
        if todo[0].0 == keys_topic {
            if !trust.follow(&todo[0].1) {
                continue;
            }
            todo = std::mem::take(&mut held);
        }
        for (topic, payload) in todo {
            let more = if topic == cfg.response_topic {
                match trust.check::<EventBatch>(Purpose::EventBatch, &payload) {
                    Verdict::Verified(batch) if batch.client == cfg.username => {
                        batch.events.into_iter().for_each(|e| show(&mut last, e));
                        if !batch.more && !overflowed {
                            // Caught up: what came live meanwhile, in order.
                            let mut came = live.take().unwrap_or_default();
                            came.sort_by_key(|e| e.id);
                            came.into_iter().for_each(|e| show(&mut last, e));
                        }
                        let again = batch.more || overflowed;
                        overflowed = false;
                        again
                    }
                    Verdict::Verified(_) => {
                        eprintln!("dropped an answer to another client");
                        false
                    }
                    Verdict::Later => {
                        hold(&mut held, topic, payload);
                        false
                    }
                    Verdict::Dropped(why) => {
                        eprintln!("dropped an answer that does not verify: {why}");
                        false
                    }
                }
            } else {
                match trust.check::<FleetEvent>(Purpose::Event, &payload) {
                    Verdict::Verified(e) => match live.as_mut() {
                        Some(came) if came.len() < MAX_HELD => came.push(e),
                        // More than that: read from the store by one more round of catch-up.
                        Some(_) => overflowed = true,
                        None => show(&mut last, e),
                    },
                    Verdict::Later => {
                        hold(&mut held, topic, payload);
                    }
                    Verdict::Dropped(why) => {
                        eprintln!("dropped an event that does not verify: {why}")
                    }
                }
                false
            };
            if more {
                client
                    .publish(&cfg.request_topic, QoS::AtLeastOnce, false, ask(last))
                    .await?;
            }
        }
    }
}

/// Keeps a message until the key chain reaches its generation (at most [`MAX_HELD`]).
fn hold(held: &mut Vec<(String, Vec<u8>)>, topic: String, payload: Vec<u8>) {
    if held.len() < MAX_HELD {
        held.push((topic, payload));
    } else {
        eprintln!("dropped a message of a later key generation: {MAX_HELD} held already");
    }
}

/// Prints an event once: ids only grow, so anything at or below the last one is a repeat.
fn show(last: &mut u64, e: FleetEvent) {
    if e.id > *last {
        *last = e.id;
        println!("{}", serde_json::to_string(&e).expect("json"));
    }
}
