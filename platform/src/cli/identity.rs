//! `fleetcast operator`, `integrator`, `audit`, `events` and `key`: identities, the audit log,
//! stored events and key rotation.

use clap::{Args, Subcommand};
use fleetcast_broker::admin::{AdminClient, AdminError};
use fleetcast_proto::acl::Role;
use fleetcast_proto::admin::{
    AuditEntry, FleetEvent, IntegratorInfo, IntegratorProfile, OperatorInfo, OperatorProfile,
    MAX_MOSQUITTO_PAGE,
};
use fleetcast_proto::calls::{self, Call, Page};
use serde::Serialize;

use super::{print_json, table, ClientArgs, Profile};

#[derive(Subcommand)]
pub enum OperatorCmd {
    /// Create an operator and print its profile (TOML) to stdout: keep it secret, and pass it
    /// with --profile or FLEETCAST_PROFILE, or save it with `fleetcast profile save FILE`.
    Add {
        name: String,
        /// viewer (read only), operator (releases, rollbacks), or admin (also identities, keys).
        #[arg(long)]
        role: Role,
        /// Save the new profile as your own default (as `fleetcast profile save` does) instead
        /// of printing it: later commands act as this operator.
        #[arg(long)]
        save_profile: bool,
        /// With --save-profile: replace a saved profile that is already there.
        #[arg(long, requires = "save_profile")]
        force: bool,
    },
    /// List operators and their roles.
    List {
        #[arg(long)]
        json: bool,
    },
    /// Revoke an operator's credentials.
    Revoke { name: String },
}

#[derive(Subcommand)]
pub enum IntegratorCmd {
    /// Create a read-only integrator and print its config (TOML): broker username and password
    /// and the platform key to verify what it reads. An integrator that exists is refused
    /// unless --rotate.
    Add {
        name: String,
        /// Give an existing integrator a new password (and print its new config): the old one
        /// stops working at once and its live sessions on the embedded broker are closed.
        #[arg(long)]
        rotate: bool,
    },
    /// List integrators (no secrets).
    List {
        #[arg(long)]
        json: bool,
    },
    /// Revoke an integrator: its password stops working at once, its live sessions on the
    /// embedded broker are closed, and the name may be added again.
    Revoke { name: String },
}

#[derive(Args)]
pub struct AuditArgs {
    /// Entries after this id.
    #[arg(long, default_value_t = 0)]
    pub since: u64,
    #[arg(long)]
    pub json: bool,
}

#[derive(Args)]
pub struct EventsArgs {
    /// Events after this id (the last id you saw; 0 for all), oldest first. Without it (and
    /// without --last): the newest 100.
    #[arg(long, conflicts_with = "last")]
    pub since: Option<u64>,
    /// The newest N events, oldest first.
    #[arg(long, value_name = "N")]
    pub last: Option<u64>,
    /// With --since: at most this many (default: all, fetched in batches).
    #[arg(long)]
    pub limit: Option<u64>,
    #[arg(long)]
    pub json: bool,
}

/// What `fleetcast events` shows without --since or --last: a log of a fleet's every status
/// event is millions of lines (five per machine per rollout), and reading it from the start
/// holds pages of it in the platform's memory (docs/architecture.md, "Capacity").
pub const EVENTS_SHOWN: u64 = 100;

#[derive(Args)]
pub struct StatsArgs {
    #[arg(long)]
    pub json: bool,
}

#[derive(Subcommand)]
pub enum KeyCmd {
    /// Rotate the platform signing key: the new key is announced under the old one, machines
    /// follow it, and everything is signed with the new key from now on.
    Rotate,
}

pub async fn operator(cmd: OperatorCmd, client: &ClientArgs) -> anyhow::Result<()> {
    match cmd {
        OperatorCmd::Add {
            name,
            role,
            save_profile,
            force,
        } => {
            let env = super::profile::SearchEnv::from_process();
            if save_profile {
                // Before the operator exists: a profile that cannot be saved is never made.
                super::profile::save_path(&env, force)?;
            }
            let broker = client.broker()?;
            let operator = client.call(calls::OperatorAdd { name, role }).await?;
            let text = profile_toml(&operator, &broker);
            if !save_profile {
                print!("{text}");
                return Ok(());
            }
            match super::profile::save(&text, &env, force) {
                Ok(path) => {
                    println!(
                        "created operator {} (role {}); profile saved to {}: fleetcast now acts as {} unless told otherwise",
                        operator.operator,
                        operator.role,
                        path.display(),
                        operator.operator
                    );
                    Ok(())
                }
                Err(e) => {
                    // The operator exists now and its secret is nowhere else: print it.
                    print!("{text}");
                    Err(e
                        .context("operator created, but its profile (printed above) was not saved"))
                }
            }
        }
        OperatorCmd::List { json } => {
            let operators = client.call(calls::OperatorList {}).await?;
            if json {
                return print_json(&operators);
            }
            print!("{}", operators_text(&operators));
            Ok(())
        }
        OperatorCmd::Revoke { name } => {
            let message = client.call(calls::OperatorRevoke { name }).await?;
            println!("{message}");
            Ok(())
        }
    }
}

pub async fn integrator(cmd: IntegratorCmd, client: &ClientArgs) -> anyhow::Result<()> {
    match cmd {
        IntegratorCmd::Add { name, rotate } => {
            let integrator = client.call(calls::IntegratorAdd { name, rotate }).await?;
            print!("{}", integrator_toml(&integrator, &client.broker()?));
            Ok(())
        }
        IntegratorCmd::List { json } => {
            let integrators = client.call(calls::IntegratorList {}).await?;
            if json {
                return print_json(&integrators);
            }
            print!("{}", integrators_text(&integrators));
            Ok(())
        }
        IntegratorCmd::Revoke { name } => {
            let message = client.call(calls::IntegratorRevoke { name }).await?;
            println!("{message}");
            Ok(())
        }
    }
}

/// Fetches pages over `admin` from `since` until the platform says there is no more, or
/// `wanted` items. `page(since, limit)` makes the call.
async fn fetch_pages<C, T>(
    admin: &AdminClient,
    mut since: u64,
    wanted: u64,
    page: impl Fn(u64, Option<u32>) -> C,
) -> anyhow::Result<Vec<T>>
where
    C: Call<Reply = Page<T, u64>>,
{
    let mut all: Vec<T> = Vec::new();
    loop {
        let left = wanted.saturating_sub(all.len() as u64);
        if left == 0 {
            return Ok(all);
        }
        let limit = (left < u32::MAX as u64).then_some(left as u32);
        let Page { items, next, more } = admin.call(page(since, limit)).await?;
        all.extend(items);
        since = next;
        if !more {
            return Ok(all);
        }
    }
}

pub async fn audit(args: AuditArgs, client: &ClientArgs) -> anyhow::Result<()> {
    let admin = client.connect().await?;
    let all = fetch_pages(&admin, args.since, u64::MAX, |since, limit| calls::Audit {
        since,
        limit,
    })
    .await;
    admin.close().await;
    let all = all?;
    if args.json {
        return print_json(&all);
    }
    print!("{}", audit_text(&all));
    Ok(())
}

pub async fn events(args: EventsArgs, client: &ClientArgs) -> anyhow::Result<()> {
    let admin = client.connect().await?;
    let all = events_wanted(&admin, &args).await;
    admin.close().await;
    let all = all?;
    if args.json {
        return print_json(&all);
    }
    print!("{}", events_text(&all));
    Ok(())
}

/// The events `args` ask for, over one connection: its newest id (`stats`), then the pages.
async fn events_wanted(admin: &AdminClient, args: &EventsArgs) -> anyhow::Result<Vec<FleetEvent>> {
    let (since, wanted) = match (args.since, args.last) {
        (Some(since), _) => (since, args.limit.unwrap_or(u64::MAX)),
        (None, last) => {
            let n = last.unwrap_or(EVENTS_SHOWN);
            let newest = admin.call(calls::Stats {}).await?.last_event_id;
            if newest > n {
                eprintln!(
                    "(the newest {n} events, up to id {newest}: --since 0 for all{})",
                    if last.is_none() {
                        ", --last N for more"
                    } else {
                        ""
                    }
                );
            }
            (
                newest.saturating_sub(n),
                n.min(args.limit.unwrap_or(u64::MAX)),
            )
        }
    };
    fetch_pages(admin, since, wanted, |since, limit| calls::EventsSince {
        since,
        limit,
    })
    .await
}

pub async fn stats(args: StatsArgs, client: &ClientArgs) -> anyhow::Result<()> {
    let stats = client.call(calls::Stats {}).await?;
    if args.json {
        return print_json(&stats);
    }
    let mib = |b: u64| b as f64 / (1024.0 * 1024.0);
    println!(
        "uptime                 {:.1} s",
        stats.uptime_ms as f64 / 1000.0
    );
    println!("chunk requests         {}", stats.chunk_requests);
    println!(
        "chunk frames sent      {} ({:.1} MiB, {:.1} MiB of it broadcast); {} not sent (every asker had it on its way)",
        stats.chunk_frames_sent,
        mib(stats.chunk_bytes_sent),
        mib(stats.chunk_bytes_broadcast),
        stats.chunk_frames_unneeded
    );
    println!(
        "status events stored   {} in {} flushes ({} received again after they were stored)",
        stats.status_events_stored, stats.ingest_flushes, stats.status_events_resent
    );
    println!(
        "refused                {} machine reports, {} chunk requests",
        stats.reports_dropped, stats.chunk_requests_refused
    );
    if let Some(g) = &stats.gateway {
        println!(
            "gateway sessions       {} open, {} since start, {} refused, {} closed for a violation, {} subscriptions refused (groups a machine is not in)",
            g.active, g.connections, g.refused, g.violations, g.subscriptions_refused
        );
        println!(
            "gateway frames         {} delivered ({} chunk frames, {} of them on subscribing), {} dropped (queue full), {} already queued, {} on their way (written moments before or still in the socket); {} served, {} sessions closed unread",
            g.frames_delivered, g.chunk_frames_delivered, g.frames_caught_up, g.frames_dropped, g.frames_already_queued, g.frames_recently_written, g.served, g.closed_unread
        );
    }
    if let Some(d) = &stats.database {
        println!("database               {}", database_line(d));
    }
    Ok(())
}

/// `stats`' line about the database file.
fn database_line(d: &fleetcast_proto::admin::DatabaseSize) -> String {
    use super::table::bytes;
    let last = match d.compacted_bytes {
        Some(b) => format!("{} after its last compaction", bytes(b)),
        None => "never compacted".to_owned(),
    };
    let due = if d.compaction_due {
        "compaction due: `serve` compacts it within the hour unless started with `--compact never` (`fleetcast db compact --online`: now)"
    } else {
        "no compaction due"
    };
    format!("{} on disk ({last}); {due}", bytes(d.on_disk_bytes))
}

pub async fn key(cmd: KeyCmd, client: &ClientArgs) -> anyhow::Result<()> {
    match cmd {
        KeyCmd::Rotate => {
            let message = client.call(calls::KeyRotate {}).await?;
            println!("{message}");
            Ok(())
        }
    }
}

#[derive(Subcommand)]
pub enum BrokerCmd {
    /// Write Mosquitto's files for the whole fleet into DIR: fleetcast.passwd (the platform,
    /// operators, integrators), fleetcast-machines.passwd, fleetcast.acl, and fleetcast.conf,
    /// which defines two listeners, one for machines and one for everyone else, for a directory
    /// mosquitto.conf reads with include_dir. Run it again after provisioning, revoking or adding
    /// identities, then reload Mosquitto (docs/mosquitto.md).
    MosquittoConfig {
        #[arg(long)]
        out: std::path::PathBuf,
        /// The machines' listener, `[ADDR:]PORT`. A client's id is its username there, so one
        /// machine's credentials cannot end another machine's session.
        #[arg(long, default_value = "8883", value_parser = parse_listener)]
        machines_listener: (Option<String>, u16),
        /// The listener of the platform, operators and integrators, `[ADDR:]PORT`. Machines'
        /// passwords do not work there.
        #[arg(long, default_value = "127.0.0.1:1883", value_parser = parse_listener)]
        services_listener: (Option<String>, u16),
        /// Server certificate chain (PEM) for TLS on the listeners; with --key. A service
        /// listener on a loopback address stays plain.
        #[arg(long, requires = "key")]
        cert: Option<std::path::PathBuf>,
        /// The certificate's private key (PEM).
        #[arg(long, requires = "cert")]
        key: Option<std::path::PathBuf>,
        /// The user Mosquitto runs as (its `user` option; Debian's package: mosquitto). Run as
        /// root, this command gives the password files (0600) to that user: Mosquitto started
        /// as root drops to it before it reads them, and could read no file of root's.
        #[arg(long, default_value = "mosquitto")]
        mosquitto_user: String,
    },
}

/// Who gets the password files Mosquitto reads, and what to tell the operator. Run as root:
/// `run_as`, the user Mosquitto drops to before it reads them (files of root's 0600 kept
/// Debian's Mosquitto from starting, and at a reload made it refuse everyone). Run as anyone
/// else: nobody (the files stay the caller's, as they must be for a Mosquitto run as the
/// caller), with a warning when `run_as` is another user that exists.
fn password_file_owner(run_as: &str) -> (Option<(u32, u32)>, Option<String>) {
    // SAFETY: geteuid has no preconditions.
    let root = unsafe { libc::geteuid() } == 0;
    match (root, user_ids(run_as)) {
        (true, Some(ids)) => (Some(ids), None),
        (true, None) => (
            None,
            Some(format!(
                "note: no user {run_as:?} here, so the password files stay root's (0600): a                  Mosquitto that drops to another user cannot read them (--mosquitto-user USER)"
            )),
        ),
        // SAFETY: geteuid has no preconditions.
        (false, Some((uid, _))) if uid != unsafe { libc::geteuid() } => (
            None,
            Some(format!(
                "warning: the password files are yours (0600), so a Mosquitto running as                  {run_as:?} cannot read them: run this as root (they are then given to                  {run_as:?}) or as {run_as:?}"
            )),
        ),
        (false, _) => (None, None),
    }
}

/// The uid and primary gid of user `name`, if there is one.
fn user_ids(name: &str) -> Option<(u32, u32)> {
    let name = std::ffi::CString::new(name).ok()?;
    let mut buf = vec![0 as libc::c_char; 16 * 1024];
    // SAFETY: every pointer is to memory of ours that outlives the call, `buf` with its length;
    // getpwnam_r writes only into `pwd` and `buf`, and `found` points at `pwd` or is null.
    unsafe {
        let mut pwd: libc::passwd = std::mem::zeroed();
        let mut found: *mut libc::passwd = std::ptr::null_mut();
        let rc = libc::getpwnam_r(
            name.as_ptr(),
            &mut pwd,
            buf.as_mut_ptr(),
            buf.len(),
            &mut found,
        );
        (rc == 0 && !found.is_null()).then_some((pwd.pw_uid, pwd.pw_gid))
    }
}

/// `[ADDR:]PORT`; `[v6]:PORT` for an IPv6 address.
fn parse_listener(s: &str) -> Result<(Option<String>, u16), String> {
    let (addr, port) = match s.rsplit_once(':') {
        Some((a, p)) => (Some(a.trim_start_matches('[').trim_end_matches(']')), p),
        None => (None, s),
    };
    let port: u16 = port
        .parse()
        .ok()
        .filter(|p| *p > 0)
        .ok_or_else(|| format!("{s:?}: expected [ADDR:]PORT with a port from 1 to 65535"))?;
    match addr {
        Some(a) if a.parse::<std::net::IpAddr>().is_err() => {
            Err(format!("{s:?}: {a:?} is not an IP address"))
        }
        a => Ok((a.map(str::to_owned), port)),
    }
}

pub async fn broker(cmd: BrokerCmd, client: &ClientArgs) -> anyhow::Result<()> {
    use anyhow::Context;
    use fleetcast_broker::mosquitto::{self, Listener, ListenerTls};
    match cmd {
        BrokerCmd::MosquittoConfig {
            out,
            machines_listener,
            services_listener,
            cert,
            key,
            mosquitto_user,
        } => {
            // Checked before anything is asked of the platform.
            anyhow::ensure!(
                machines_listener.1 != services_listener.1,
                "the machines' and the service listener need ports of their own (both {})",
                machines_listener.1
            );
            let admin = client.connect().await?;
            let files = mosquitto_files_all(&admin, None).await;
            admin.close().await;
            let calls::MosquittoFiles { passwd, acl, .. } = files?;
            std::fs::create_dir_all(&out).with_context(|| format!("creating {}", out.display()))?;
            let out = std::fs::canonicalize(&out)?;
            let absolute = |p: std::path::PathBuf| -> anyhow::Result<std::path::PathBuf> {
                std::fs::canonicalize(&p).with_context(|| format!("{}", p.display()))
            };
            let tls = match (cert, key) {
                (Some(cert), Some(key)) => Some(ListenerTls {
                    certfile: absolute(cert)?,
                    keyfile: absolute(key)?,
                }),
                _ => None,
            };
            let loopback = |a: &Option<String>| {
                a.as_deref()
                    .and_then(|a| a.parse::<std::net::IpAddr>().ok())
                    .is_some_and(|ip| ip.is_loopback())
            };
            let machines = Listener {
                bind: machines_listener.0,
                port: machines_listener.1,
                tls: tls.clone(),
            };
            let services = Listener {
                tls: tls.filter(|_| !loopback(&services_listener.0)),
                bind: services_listener.0,
                port: services_listener.1,
            };
            let path = |name: &str| out.join(name);
            let (sp, mp, a, c) = (
                path("fleetcast.passwd"),
                path("fleetcast-machines.passwd"),
                path("fleetcast.acl"),
                path("fleetcast.conf"),
            );
            let conf = mosquitto::conf(
                &mosquitto::ConfFiles {
                    services_passwd: &sp,
                    machines_passwd: &mp,
                    acl: &a,
                },
                &machines,
                &services,
            )?;
            let split = mosquitto::split_passwd(&passwd);
            let (owner, note) = password_file_owner(&mosquitto_user);
            crate::keys::write_atomic_owned(&sp, split.services.as_bytes(), 0o600, owner)?;
            crate::keys::write_atomic_owned(&mp, split.machines.as_bytes(), 0o600, owner)?;
            crate::keys::write_atomic(&a, acl.as_bytes(), 0o644)?;
            crate::keys::write_atomic(&c, conf.as_bytes(), 0o644)?;
            let at = |l: &Listener| {
                let scheme = if l.tls.is_some() { "mqtts" } else { "mqtt" };
                format!(
                    "{scheme}://{}:{}",
                    l.bind.as_deref().unwrap_or("HOST"),
                    l.port
                )
            };
            println!(
                "wrote {}, {}, {} and {}\n\
                 machines connect to {} (their configs' `broker`), the platform, operators and \
                 integrators to {}\n\
                 read {} with include_dir from mosquitto.conf and define no listener there, then \
                 reload Mosquitto (kill -HUP); a changed listener needs a restart",
                sp.display(),
                mp.display(),
                a.display(),
                c.display(),
                at(&machines),
                at(&services),
                out.display()
            );
            if let Some(note) = note {
                eprintln!("{note}");
            }
            if machines.tls.is_none() {
                eprintln!(
                    "warning: the machines' listener has no TLS (--cert, --key): their passwords \
                     cross the network in clear"
                );
            }
            Ok(())
        }
    }
}

/// Mosquitto's files for the whole fleet, asked for in pages of `limit` machines (None: the
/// platform's most) and appended in order.
pub async fn mosquitto_files_all(
    admin: &AdminClient,
    limit: Option<u32>,
) -> Result<calls::MosquittoFiles, AdminError> {
    let limit = Some(limit.unwrap_or(MAX_MOSQUITTO_PAGE));
    let mut files = admin
        .call(calls::MosquittoConfig { after: None, limit })
        .await?;
    // A page that names no cursor cannot be continued, whatever it says.
    while let (Some(after), true) = (files.next.take(), files.more) {
        let page = admin
            .call(calls::MosquittoConfig {
                after: Some(after),
                limit,
            })
            .await?;
        files.passwd.push_str(&page.passwd);
        files.acl.push_str(&page.acl);
        files.next = page.next;
        files.more = page.more;
    }
    files.more = false;
    Ok(files)
}

/// The operator's profile, as `--profile` reads it.
pub fn profile_toml(p: &OperatorProfile, broker: &str) -> String {
    let profile = Profile {
        operator: p.operator.clone(),
        role: p.role,
        secret: p.secret.clone(),
        platform_key: p.platform_key,
        topic_prefix: p.topic_prefix.clone(),
        broker: Some(broker.to_owned()),
        ca_file: None,
    };
    format!(
        "# fleetcast operator profile for {} (role {}). Keep it secret: it is this operator's key.\n# Use it with: fleetcast --profile FILE ...  (or FLEETCAST_PROFILE=FILE), or once: fleetcast profile save FILE\n{}",
        p.operator,
        p.role,
        toml::to_string(&profile).expect("profile serializes")
    )
}

#[derive(Serialize)]
struct IntegratorToml<'a> {
    name: &'a str,
    broker: &'a str,
    username: &'a str,
    password: &'a str,
    platform_key: String,
    platform_key_gen: u32,
    topic_prefix: &'a str,
    events_topic: String,
    progress_topic: String,
    request_topic: String,
    response_topic: String,
}

/// An integrator's config: read-only broker credentials and what to verify with.
pub fn integrator_toml(p: &IntegratorProfile, broker: &str) -> String {
    let prefix = &p.topic_prefix;
    let cfg = IntegratorToml {
        name: &p.name,
        broker,
        username: &p.username,
        password: &p.password,
        platform_key: p.platform_key.to_hex(),
        platform_key_gen: p.platform_key_gen,
        topic_prefix: prefix,
        events_topic: format!("{prefix}/events"),
        progress_topic: format!("{prefix}/rollouts/+/progress"),
        request_topic: format!("{prefix}/integrators/{}/events/get", p.username),
        response_topic: format!("{prefix}/integrators/{}/events", p.username),
    };
    format!(
        "# fleetcast integrator {}: read-only. Use the username as MQTT client id, or\n# {}.SUFFIX to run several clients: request_topic and response_topic are then named by\n# that client id ({}/integrators/{}.SUFFIX/events/get and .../events).\n# Everything it reads is signed by platform_key, generation platform_key_gen of the key\n# chain; see docs/integrators.md.\n{}",
        p.name,
        p.username,
        prefix,
        p.username,
        toml::to_string(&cfg).expect("config serializes")
    )
}

pub fn operators_text(ops: &[OperatorInfo]) -> String {
    let rows: Vec<Vec<String>> = ops
        .iter()
        .map(|o| {
            vec![
                o.name.clone(),
                o.role.to_string(),
                table::time(Some(o.created_at_ms)),
                o.created_by.clone(),
            ]
        })
        .collect();
    table::render(&["OPERATOR", "ROLE", "CREATED", "BY"], &rows)
}

pub fn integrators_text(integrators: &[IntegratorInfo]) -> String {
    let rows: Vec<Vec<String>> = integrators
        .iter()
        .map(|i| {
            vec![
                i.name.clone(),
                i.username.clone(),
                table::time(Some(i.created_at_ms)),
                i.created_by.clone(),
            ]
        })
        .collect();
    table::render(&["INTEGRATOR", "USERNAME", "CREATED", "BY"], &rows)
}

pub fn audit_text(entries: &[AuditEntry]) -> String {
    let rows: Vec<Vec<String>> = entries
        .iter()
        .map(|e| {
            let mut request = e.request.clone();
            if let Some(o) = request.as_object_mut() {
                o.remove("op");
            }
            // The request last: it can be long, and a column before the result padded every
            // line's result out to its width.
            vec![
                e.id.to_string(),
                table::time(Some(e.at_ms)),
                e.operator.clone(),
                e.action.clone(),
                e.result.clone(),
                request.to_string(),
            ]
        })
        .collect();
    table::render(
        &["ID", "WHEN", "OPERATOR", "ACTION", "RESULT", "REQUEST"],
        &rows,
    )
}

pub fn events_text(events: &[FleetEvent]) -> String {
    let rows: Vec<Vec<String>> = events
        .iter()
        .map(|e| {
            vec![
                e.id.to_string(),
                table::time(Some(e.recorded_at_ms)),
                e.machine.to_string(),
                e.release
                    .as_ref()
                    .map_or_else(|| "-".to_owned(), |r| r.to_string()),
                format!("{} {}", e.kind, e.version),
                e.phase.to_string(),
                e.error.clone().unwrap_or_default(),
            ]
        })
        .collect();
    table::render(
        &[
            "ID", "RECORDED", "MACHINE", "RELEASE", "VERSION", "PHASE", "ERROR",
        ],
        &rows,
    )
}

#[cfg(test)]
mod tests {
    use super::*;
    use fleetcast_proto::auth::{PlatformKey, Secret};

    /// Run as root (as CI is), the password files go to the user Mosquitto drops to, and one
    /// that replaces an older file does too; a user that does not exist leaves them root's,
    /// with a note. (Mosquitto 2.0 as Debian runs it could not read root's 0600 files.)
    #[test]
    fn password_files_written_as_root_go_to_the_user_mosquitto_runs_as() {
        use std::os::unix::fs::{MetadataExt, PermissionsExt};
        // SAFETY: geteuid has no preconditions.
        if unsafe { libc::geteuid() } != 0 {
            eprintln!("SKIPPED: needs root");
            return;
        }
        let nobody = user_ids("nobody").expect("Debian has a user nobody");
        assert_ne!(nobody.0, 0);
        let (owner, note) = password_file_owner("nobody");
        assert_eq!((owner, note), (Some(nobody), None));
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("fleetcast.passwd");
        std::fs::write(&path, "old").unwrap();
        crate::keys::write_atomic_owned(&path, b"u:hash\n", 0o600, owner).unwrap();
        let meta = std::fs::metadata(&path).unwrap();
        assert_eq!((meta.uid(), meta.gid()), nobody);
        assert_eq!(meta.permissions().mode() & 0o777, 0o600);
        assert_eq!(std::fs::read(&path).unwrap(), b"u:hash\n");
        let (owner, note) = password_file_owner("no-such-user-here");
        assert_eq!(owner, None);
        assert!(note.unwrap().contains("--mosquitto-user"));
    }

    #[test]
    fn a_listener_is_a_port_with_an_optional_ip_address() {
        assert_eq!(parse_listener("8883"), Ok((None, 8883)));
        assert_eq!(
            parse_listener("127.0.0.1:1883"),
            Ok((Some("127.0.0.1".into()), 1883))
        );
        assert_eq!(parse_listener("[::1]:1883"), Ok((Some("::1".into()), 1883)));
        for bad in ["", "0", "65536", "host:1883", "127.0.0.1:", "1883 x"] {
            assert!(parse_listener(bad).is_err(), "{bad:?}");
        }
    }

    #[test]
    fn an_operator_profile_reads_back_as_the_profile_the_cli_loads() {
        let p = OperatorProfile {
            operator: "alice".into(),
            role: Role::Viewer,
            secret: Secret::from_bytes([3; 32]),
            platform_key: PlatformKey::from_seed([4; 32]).public(),
            topic_prefix: "fleet".into(),
        };
        let text = profile_toml(&p, "mqtt://h:1883");
        let back: Profile = toml::from_str(&text).unwrap();
        assert_eq!(
            (back.operator.as_str(), back.role, back.broker.as_deref()),
            ("alice", Role::Viewer, Some("mqtt://h:1883"))
        );
        assert_eq!(back.secret, p.secret);
        assert!(toml::from_str::<Profile>(&format!("{text}\nextra = 1\n")).is_err());
    }

    #[test]
    fn audit_and_event_tables_show_who_what_and_the_result() {
        let entry = AuditEntry {
            id: 4,
            at_ms: 0,
            operator: "val".into(),
            client: "fleetcast-op-val.1".into(),
            action: "release_publish".into(),
            request: serde_json::json!({"op": "release_publish", "release": "r-000001"}),
            result: "operator val has role viewer; release_publish needs operator".into(),
        };
        let text = audit_text(&[entry]);
        let row = text.lines().nth(1).unwrap();
        for want in ["4", "val", "release_publish", "r-000001", "role viewer"] {
            assert!(row.contains(want), "{want} missing: {row}");
        }
        assert!(!row.contains("\"op\""), "the action is not repeated: {row}");
        let event = FleetEvent {
            id: 9,
            recorded_at_ms: 0,
            machine: fleetcast_proto::MachineId::new("vm-1").unwrap(),
            release: None,
            kind: fleetcast_proto::Kind::new("app").unwrap(),
            version: String::new(),
            phase: fleetcast_proto::Phase::Rejected,
            at_ms: 0,
            attempt: 1,
            progress: None,
            error: Some("bad signature".into()),
            detail: None,
        };
        let row = events_text(&[event]).lines().nth(1).unwrap().to_owned();
        for want in ["9", "vm-1", " - ", "rejected", "bad signature"] {
            assert!(row.contains(want), "{want} missing: {row}");
        }
    }

    #[test]
    fn an_integrator_config_names_its_credentials_and_topics() {
        let p = IntegratorProfile {
            name: "erp".into(),
            username: "fleetcast-int-erp".into(),
            password: "pw".into(),
            platform_key: PlatformKey::from_seed([4; 32]).public(),
            platform_key_gen: 3,
            topic_prefix: "fleet".into(),
        };
        let text = integrator_toml(&p, "mqtt://h:1");
        let v: toml::Value = toml::from_str(&text).unwrap();
        assert_eq!(v["username"].as_str(), Some("fleetcast-int-erp"));
        assert_eq!(v["password"].as_str(), Some("pw"));
        // Without the generation a client that pins a rotated key can verify nothing.
        assert_eq!(v["platform_key_gen"].as_integer(), Some(3));
        assert!(
            text.contains("fleet/integrators/fleetcast-int-erp.SUFFIX/events/get"),
            "{text}"
        );
        assert_eq!(
            v["request_topic"].as_str(),
            Some("fleet/integrators/fleetcast-int-erp/events/get")
        );
    }
}
