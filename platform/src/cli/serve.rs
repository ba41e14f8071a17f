//! `fleetcast serve`.

use std::net::SocketAddr;
use std::path::PathBuf;

use anyhow::Context;
use clap::Args;
use fleetcast_broker::gateway::TlsListen;
use fleetcast_broker::BrokerUrl;
use tokio_util::sync::CancellationToken;

use crate::keys::{admin_secret_path, load_or_create_keys, public_key_path};
use crate::limits::MachineLimits;
use crate::serve::{serve, ServeOptions};
use crate::store::compact::{self, AtStart, CompactError, Policy};

#[derive(Args)]
pub struct ServeArgs {
    /// Data directory (keys, database, artifacts). Client commands find the admin secret in
    /// the same FLEETCAST_DATA.
    #[arg(long, env = "FLEETCAST_DATA", default_value = "./fleetcast-data")]
    pub data: PathBuf,
    /// Where the embedded broker listens for plain MQTT (ignored with --broker). Keep it on
    /// loopback and serve other hosts over TLS (--tls-listen).
    #[arg(long, default_value = "127.0.0.1:1883")]
    pub listen: SocketAddr,
    /// No plain MQTT listener: TLS only.
    #[arg(long, requires = "tls_listen")]
    pub no_plain: bool,
    /// Where the embedded broker serves MQTT over TLS, e.g. 0.0.0.0:8883 (needs --tls-cert and
    /// --tls-key).
    #[arg(long, requires_all = ["tls_cert", "tls_key"])]
    pub tls_listen: Option<SocketAddr>,
    /// The broker's certificate chain (PEM, leaf first).
    #[arg(long)]
    pub tls_cert: Option<PathBuf>,
    /// The broker's private key (PEM).
    #[arg(long)]
    pub tls_key: Option<PathBuf>,
    /// Use this external broker (e.g. Mosquitto) instead of the embedded one.
    #[arg(long)]
    pub broker: Option<String>,
    #[arg(long, default_value = fleetcast_proto::topics::DEFAULT_PREFIX)]
    pub topic_prefix: String,
    /// Chunk bytes served to one machine, in MiB per second (half of it as a burst; chunk
    /// requests are allowed in proportion), beyond its first copy of each chunk, which goes at
    /// once. A bound on what one machine, or a stolen machine config, asking again and again
    /// can take of the platform.
    #[arg(long, default_value_t = 64.0, value_parser = positive_rate)]
    pub machine_rate: f64,
    /// Charge a machine's first copy of each chunk to --machine-rate too (by default it goes
    /// at once): caps every download at that rate, e.g. to spread a rollout over a metered
    /// uplink.
    #[arg(long)]
    pub pace_first_copies: bool,
    /// Status events the event log keeps (the newest; older ones are deleted in the
    /// background). Each machine's outcome per release stays in its target record.
    #[arg(long, default_value_t = crate::retention::DEFAULT_EVENTS_KEPT, value_parser = clap::value_parser!(u64).range(1..))]
    pub keep_events: u64,
    /// Compact the database: `auto` when its file has grown to 4 times its size after its
    /// last compaction (and 64 MiB at least), at start and, read hourly, while it runs;
    /// `always` at every start, and as `auto` while it runs; or `never` (the log says when one
    /// is due). sled's file holds several times its live data as records are rewritten;
    /// compaction copies the live data into a fresh file (`fleetcast db compact` does it by
    /// hand). While it runs, whatever stores waits for the copy (0.3 s for 13 MiB of live
    /// data, 2.1 s for 82 MiB, measured); reads and connections go on.
    #[arg(long, value_enum, default_value_t = Policy::Auto)]
    pub compact: Policy,
}

/// The start's line about the database, or an error that must stop the start (the database in
/// use). A compaction that failed leaves the database as it was, so the platform starts on it.
fn database_line(at_start: Result<AtStart, CompactError>) -> anyhow::Result<Option<String>> {
    use super::table::bytes;
    Ok(match at_start {
        Ok(AtStart::Fresh) => None,
        Ok(AtStart::NotDue { on_disk }) => Some(format!("{} on disk", bytes(on_disk))),
        Ok(AtStart::Compacted(r)) => {
            tracing::info!(
                before = r.before,
                after = r.after,
                records = r.records,
                took_ms = r.took.as_millis() as u64,
                "database compacted"
            );
            Some(format!(
                "compacted {} -> {} on disk in {:.1} s ({} records verified)",
                bytes(r.before),
                bytes(r.after),
                r.took.as_secs_f64(),
                r.records
            ))
        }
        Err(e @ CompactError::InUse(_)) => return Err(e.into()),
        Err(e) => {
            tracing::warn!(error = %e, "database not compacted");
            Some(format!("not compacted: {e}"))
        }
    })
}

fn positive_rate(s: &str) -> Result<f64, String> {
    match s.parse::<f64>() {
        Ok(r) if r.is_finite() && r > 0.0 => Ok(r),
        _ => Err(format!("{s:?} is not a positive number of MiB/s")),
    }
}

pub async fn run(args: ServeArgs) -> anyhow::Result<()> {
    match fleetcast_broker::fdlimit::raise_open_file_limit() {
        Ok(n) => tracing::info!(
            open_files = n,
            "open-file limit (one per connected machine)"
        ),
        Err(e) => tracing::warn!(error = %e, "cannot raise the open-file limit"),
    }
    let (broker, embedded_listen) = match &args.broker {
        Some(b) => (b.parse::<BrokerUrl>()?, None),
        None if args.no_plain => (BrokerUrl::mqtt("127.0.0.1", 0), None),
        None => (
            BrokerUrl::mqtt(args.listen.ip().to_string(), args.listen.port()),
            Some(args.listen),
        ),
    };
    let tls = match (&args.broker, args.tls_listen) {
        (None, Some(addr)) => {
            let read = |p: &Option<PathBuf>| -> anyhow::Result<Vec<u8>> {
                let p = p
                    .as_ref()
                    .context("--tls-listen needs --tls-cert and --tls-key")?;
                std::fs::read(p).with_context(|| format!("reading {}", p.display()))
            };
            Some(TlsListen {
                addr,
                cert_chain_pem: read(&args.tls_cert)?,
                key_pem: read(&args.tls_key)?,
            })
        }
        (Some(_), Some(_)) => anyhow::bail!(
            "--tls-listen is for the embedded broker; it cannot be used with --broker"
        ),
        _ => None,
    };
    // Before anything is written: a second `serve` on a taken port would otherwise create its
    // data dir, keys and database, then stop.
    for addr in embedded_listen.iter().chain(tls.as_ref().map(|t| &t.addr)) {
        if let Err(e) = std::net::TcpListener::bind(addr) {
            anyhow::bail!(
                "cannot listen on {addr}: {e}{}; nothing was started or written",
                match e.kind() {
                    std::io::ErrorKind::AddrInUse =>
                        " (another `fleetcast serve` or MQTT broker listens there: stop it, or choose another address with --listen / --tls-listen)",
                    std::io::ErrorKind::AddrNotAvailable =>
                        " (no interface of this host has that address)",
                    _ => "",
                }
            );
        }
    }
    let keys = load_or_create_keys(&args.data)
        .with_context(|| format!("preparing data dir {}", args.data.display()))?;
    println!("fleetcast platform");
    match crate::disk::space(&args.data) {
        Ok((free, total)) => println!(
            "  data dir:        {} ({} MiB free of {} MiB{})",
            args.data.display(),
            free >> 20,
            total >> 20,
            if crate::disk::is_low(free, total) {
                "; low: on a full disk serve stops, see docs/operations.md"
            } else {
                ""
            }
        ),
        Err(_) => println!("  data dir:        {}", args.data.display()),
    }
    println!(
        "  public key:      {} ({})",
        public_key_path(&args.data).display(),
        keys.public
    );
    println!(
        "  admin secret:    {}",
        admin_secret_path(&args.data).display()
    );
    match (&embedded_listen, &tls, &args.broker) {
        (_, _, Some(_)) => println!("  broker:          external, {broker}"),
        (plain, tls, None) => {
            if let Some(l) = plain {
                println!("  broker:          embedded, listening on mqtt://{l}");
            }
            if let Some(t) = tls {
                println!(
                    "  broker:          embedded, listening on mqtts://{}",
                    t.addr
                );
            }
        }
    }
    println!("  topic prefix:    {}", args.topic_prefix);
    println!(
        "  per machine:     {} MiB/s of chunks{}",
        args.machine_rate,
        if args.pace_first_copies {
            ""
        } else {
            " asked for again (first copies at once)"
        }
    );
    println!("  event log:       the newest {} events", args.keep_events);
    let db = args.data.join("db");
    let policy = args.compact;
    let at_start = tokio::task::spawn_blocking(move || compact::at_start(&db, policy))
        .await
        .context("compaction task")?;
    if let Some(line) = database_line(at_start)? {
        println!("  database:        {line}");
    }
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
        tls,
        topic_prefix: args.topic_prefix,
        limits: MachineLimits {
            events_kept: args.keep_events,
            first_copies_free: !args.pace_first_copies,
            ..MachineLimits::with_rate(args.machine_rate)
        },
        compaction: crate::AutoCompaction {
            policy,
            ..Default::default()
        },
    };
    let result = serve(opts, shutdown).await;
    ctrl_c.abort();
    result.context("platform stopped with an error")
}
