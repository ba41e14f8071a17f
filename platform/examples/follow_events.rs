//! An integrator in Rust: catch up on stored events after the last id seen, then follow live
//! events, verifying the platform's signature on each. See docs/integrators.md.
//!
//! cargo run -p fleetcast-platform --example follow_events -- erp.toml [LAST_ID]
//! (erp.toml is what `fleetcast integrator add erp` prints)

use std::time::Duration;

use fleetcast_proto::admin::FleetEvent;
use fleetcast_proto::auth::{PlatformPublicKey, Purpose};
use fleetcast_proto::events::{EventBatch, EventsRequest};
use rumqttc::{AsyncClient, Event, Incoming, MqttOptions, QoS};

#[derive(serde::Deserialize)]
struct Config {
    broker: String,
    username: String,
    password: String,
    platform_key: PlatformPublicKey,
    events_topic: String,
    request_topic: String,
    response_topic: String,
}

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
    let key = cfg.platform_key;
    loop {
        match eventloop.poll().await {
            Ok(Event::Incoming(Incoming::ConnAck(_))) => {
                for t in [&cfg.response_topic, &cfg.events_topic] {
                    client.subscribe(t, QoS::AtLeastOnce).await?;
                }
                client
                    .publish(&cfg.request_topic, QoS::AtLeastOnce, false, ask(last))
                    .await?;
            }
            Ok(Event::Incoming(Incoming::Publish(p))) if p.topic == cfg.response_topic => {
                match key.verify::<EventBatch>(Purpose::EventBatch, &p.payload) {
                    Ok(batch) if batch.client == cfg.username => {
                        for e in batch.events {
                            show(&mut last, e);
                        }
                        if batch.more {
                            client
                                .publish(&cfg.request_topic, QoS::AtLeastOnce, false, ask(last))
                                .await?;
                        }
                    }
                    _ => eprintln!("dropped an answer that does not verify"),
                }
            }
            Ok(Event::Incoming(Incoming::Publish(p))) => {
                match key.verify::<FleetEvent>(Purpose::Event, &p.payload) {
                    Ok(e) => show(&mut last, e),
                    Err(e) => eprintln!("dropped an event that does not verify: {e}"),
                }
            }
            Ok(_) => {}
            Err(e) => {
                eprintln!("connection: {e}; retrying");
                tokio::time::sleep(Duration::from_secs(1)).await;
            }
        }
    }
}

/// Prints an event once: ids only grow, so anything at or below the last one is a repeat.
fn show(last: &mut u64, e: FleetEvent) {
    if e.id > *last {
        *last = e.id;
        println!("{}", serde_json::to_string(&e).expect("json"));
    }
}
