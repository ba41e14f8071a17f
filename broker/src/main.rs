//! `fleetcast-broker`: the embedded broker alone, for a machine that runs only the broker.
//! Without auth: use it on a trusted network, or run `fleetcast serve`, which adds auth.

use std::net::SocketAddr;

use clap::Parser;
use fleetcast_broker::{BrokerSettings, EmbeddedBroker};

#[derive(Parser)]
#[command(
    version,
    about = "fleetcast's embedded MQTT broker (rumqttd), standalone"
)]
struct Args {
    /// Address to listen on.
    #[arg(long, default_value = "127.0.0.1:1883")]
    listen: SocketAddr,
}

fn main() -> anyhow::Result<()> {
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env().unwrap_or_else(|_| "warn".into()),
        )
        .init();
    let args = Args::parse();
    let broker = EmbeddedBroker::start(BrokerSettings::new(args.listen))?;
    println!("fleetcast-broker listening on {}", broker.url());
    loop {
        std::thread::park();
    }
}
