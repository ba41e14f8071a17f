//! `fleetcast serve`.

use std::net::SocketAddr;
use std::path::PathBuf;

use anyhow::Context;
use clap::Args;
use fleetcast_broker::BrokerUrl;
use tokio_util::sync::CancellationToken;

use crate::keys::{admin_secret_path, load_or_create_keys, public_key_path};
use crate::serve::{serve, ServeOptions};

#[derive(Args)]
pub struct ServeArgs {
    /// Data directory (keys, database, artifacts).
    #[arg(long, default_value = "./fleetcast-data")]
    pub data: PathBuf,
    /// Where the embedded broker listens (ignored with --broker).
    #[arg(long, default_value = "127.0.0.1:1883")]
    pub listen: SocketAddr,
    /// Use this external broker (e.g. Mosquitto) instead of the embedded one.
    #[arg(long)]
    pub broker: Option<String>,
    #[arg(long, default_value = fleetcast_proto::topics::DEFAULT_PREFIX)]
    pub topic_prefix: String,
}

pub async fn run(args: ServeArgs) -> anyhow::Result<()> {
    let (broker, embedded_listen) = match &args.broker {
        Some(b) => (b.parse::<BrokerUrl>()?, None),
        None => {
            let url = BrokerUrl {
                host: args.listen.ip().to_string(),
                port: args.listen.port(),
            };
            (url, Some(args.listen))
        }
    };
    let keys = load_or_create_keys(&args.data)
        .with_context(|| format!("preparing data dir {}", args.data.display()))?;
    println!("fleetcast platform");
    println!("  data dir:        {}", args.data.display());
    println!(
        "  public key:      {} ({})",
        public_key_path(&args.data).display(),
        keys.public
    );
    println!(
        "  admin secret:    {}",
        admin_secret_path(&args.data).display()
    );
    match embedded_listen {
        Some(l) => println!("  broker:          embedded, listening on mqtt://{l}"),
        None => println!("  broker:          external, {broker}"),
    }
    println!("  topic prefix:    {}", args.topic_prefix);
    drop(keys);
    let shutdown = CancellationToken::new();
    let ctrl_c = tokio::spawn({
        let shutdown = shutdown.clone();
        async move {
            if tokio::signal::ctrl_c().await.is_ok() {
                eprintln!("stopping...");
            }
            shutdown.cancel();
        }
    });
    let opts = ServeOptions {
        data_dir: args.data,
        broker,
        embedded_listen,
        topic_prefix: args.topic_prefix,
        limits: Default::default(),
    };
    let result = serve(opts, shutdown).await;
    ctrl_c.abort();
    result.context("platform stopped with an error")
}
