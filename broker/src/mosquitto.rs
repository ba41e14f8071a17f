//! fleetcast's broker policy ([`fleetcast_proto::acl`]) as Mosquitto 2 files: the password file,
//! the ACL file, and the `mosquitto.conf` lines that load them.
//!
//! Pure string generation; docs/mosquitto.md says how the policy maps and what Mosquitto cannot
//! express. Facts from Mosquitto 2.0's source (`src/security_default.c`, `src/password_mosq.c`)
//! this relies on:
//! - A password line is `user:$7$<iterations>$<base64 salt>$<base64 hash>`: PBKDF2-HMAC-SHA512,
//!   a 12-byte salt and a 64-byte hash, standard base64 with padding. Any other salt or hash
//!   length makes Mosquitto drop the user with only a log line.
//! - `read` is checked when a message is delivered, not when a client subscribes: subscribing to
//!   `#` is acknowledged, but only granted topics reach the client.
//! - A client's `user` block is checked first, its `deny` lines before its grants; then every
//!   `pattern` line, which applies to every user. `%c` is the client id, which Mosquitto does not
//!   tie to the username.

use std::collections::{BTreeSet, HashSet};
use std::fmt;
use std::fmt::Write as _;
use std::path::Path;

use base64::engine::general_purpose::STANDARD as BASE64;
use base64::Engine as _;
use fleetcast_proto::acl::{Claim, Principal};
use fleetcast_proto::topics::Topics;

/// mosquitto_passwd's default. The passwords are 128-bit random strings
/// ([`fleetcast_proto::auth::Secret::mqtt_password`]), so a slower hash would add no strength,
/// only CPU on every CONNECT when a whole fleet reconnects at once.
pub const PBKDF2_ITERATIONS: u32 = 101;
/// The only salt length Mosquitto accepts.
const SALT_LEN: usize = 12;

/// One broker user: who it is and the MQTT password it connects with.
#[derive(Clone)]
pub struct BrokerIdentity {
    pub principal: Principal,
    /// The password in clear, e.g. `Secret::mqtt_password()`; only its hash is written.
    pub password: String,
}

impl fmt::Debug for BrokerIdentity {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("BrokerIdentity")
            .field("principal", &self.principal)
            .field("password", &"..")
            .finish()
    }
}

/// The contents of Mosquitto's `password_file` and `acl_file`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct MosquittoFiles {
    pub passwd: String,
    pub acl: String,
}

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum MosquittoFilesError {
    #[error(
        "topic prefix {prefix:?} cannot go in a Mosquitto ACL file: it holds {ch:?} \
         (whitespace, control characters and % are not allowed)"
    )]
    Prefix { prefix: String, ch: char },
    #[error("broker username {username:?} does not name the principal {principal:?}")]
    Username {
        username: String,
        principal: Principal,
    },
    #[error("broker user {0:?} is listed twice")]
    Duplicate(String),
    #[error(
        "{0:?} cannot go in mosquitto.conf: it is empty or holds a control character or space"
    )]
    Path(String),
}

/// Generates both files for `identities`, each password hashed with a fresh random salt.
/// Fails if the prefix cannot be written into an ACL file, if a username does not parse back
/// to its principal (e.g. a machine id starting with `fleetcast-`), or on a repeated username.
pub fn mosquitto_files(
    topics: &Topics,
    identities: &[BrokerIdentity],
) -> Result<MosquittoFiles, MosquittoFilesError> {
    check_prefix(topics.prefix())?;
    let mut seen = HashSet::new();
    for id in identities {
        let username = id.principal.username();
        if Claim::parse(&username).as_ref() != Some(&claim_of(&id.principal)) {
            return Err(MosquittoFilesError::Username {
                username,
                principal: id.principal.clone(),
            });
        }
        if !seen.insert(username.clone()) {
            return Err(MosquittoFilesError::Duplicate(username));
        }
    }
    // Platform, operators, integrators, machines; by name within each: regenerating for the
    // same fleet gives the same ACL file, so a diff shows only real changes.
    let mut sorted: Vec<&BrokerIdentity> = identities.iter().collect();
    sorted.sort_by_key(|id| (kind_order(&id.principal), id.principal.username()));

    let mut passwd = String::new();
    for id in &sorted {
        let salt: [u8; SALT_LEN] = rand::random();
        let hash = hash_password(&id.password, &salt, PBKDF2_ITERATIONS);
        let _ = writeln!(passwd, "{}:{hash}", id.principal.username());
    }
    let mut acl = acl_header(topics);
    for id in &sorted {
        acl.push('\n');
        acl.push_str(&user_block(topics, &id.principal));
    }
    Ok(MosquittoFiles { passwd, acl })
}

/// The password file split in two: the platform's, operators' and integrators' users, and the
/// machines'. Each listener loads one of them (see [`conf`]), so a machine's credentials are
/// refused on the service listener, where client ids are free.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SplitPasswd {
    pub services: String,
    pub machines: String,
}

/// Splits a password file written by [`mosquitto_files`] (or pages of one appended) by whose each
/// user is. A line whose user parses as no principal goes nowhere.
pub fn split_passwd(passwd: &str) -> SplitPasswd {
    let mut out = SplitPasswd {
        services: String::new(),
        machines: String::new(),
    };
    for line in passwd.lines() {
        let user = line.split_once(':').map_or(line, |(u, _)| u);
        let to = match Claim::parse(user) {
            Some(Claim::Machine(_)) => &mut out.machines,
            Some(_) => &mut out.services,
            None => continue,
        };
        to.push_str(line);
        to.push('\n');
    }
    out
}

/// One Mosquitto listener: `[ADDR:]PORT`, and the certificate and key of its TLS if it has one.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Listener {
    /// The address to bind (None: every address).
    pub bind: Option<String>,
    pub port: u16,
    pub tls: Option<ListenerTls>,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ListenerTls {
    pub certfile: std::path::PathBuf,
    pub keyfile: std::path::PathBuf,
}

/// Where [`conf`] points Mosquitto: the two password files and the ACL file.
#[derive(Debug, Clone)]
pub struct ConfFiles<'a> {
    pub services_passwd: &'a Path,
    pub machines_passwd: &'a Path,
    pub acl: &'a Path,
}

/// A whole `fleetcast.conf` for Mosquitto's `include_dir`: `per_listener_settings true` and two
/// listeners. Machines connect to `machines`, which knows only machines' passwords and makes a
/// client's id its username (`use_username_as_clientid`), so one machine's credentials cannot
/// take over another machine's session. Everyone else connects to `services`, which knows no
/// machine. Both load the same ACL file. Mosquitto must not read these lines through
/// `include_dir` one listener at a time: 2.0 applies per-listener lines of an included file only
/// to listeners defined in that same file.
pub fn conf(
    files: &ConfFiles<'_>,
    machines: &Listener,
    services: &Listener,
) -> Result<String, MosquittoFilesError> {
    let mut out = String::from(
        "# fleetcast's broker policy (generated by fleetcast; see docs/mosquitto.md). Put it in a\n\
         # directory mosquitto.conf reads with include_dir, and define no other listener: one\n\
         # defined elsewhere gets no password file under per_listener_settings and refuses all.\n\
         per_listener_settings true\n\
         # Without it every request/response round trip waits ~40 ms on Nagle + delayed ACK.\n\
         set_tcp_nodelay true\n",
    );
    let _ = write!(
        out,
        "# fleetcast's clients read no packet larger: a client that sends one is disconnected\n\
         # and nothing of it is kept. Without it one machine's retained 3 MiB state was read\n\
         # by the platform at every (re)subscribe, and closed its connection each time.\n\
         max_packet_size {}\n",
        crate::client::MAX_PACKET
    );
    out.push_str(
        "# A durable session (clean session off) keeps its subscriptions after its client has\n\
         # gone, and Mosquitto bounds neither how many one client holds nor for how long: one\n\
         # machine's credentials left 335,000 filters (+295 MB) behind in 8 s. Machines use clean\n\
         # sessions; the platform's ingest is durable, and down for longer than this it loses what\n\
         # was queued for it, which machines send again.\n\
         persistent_client_expiration 1d\n",
    );
    out.push_str(
        "\n# Machines. A client's id is its username here: one machine's credentials cannot\n\
         # connect as another machine's client id and so end that machine's session.\n",
    );
    listener_lines(&mut out, machines, files.machines_passwd, files.acl)?;
    out.push_str("use_username_as_clientid true\n");
    out.push_str(
        "\n# The platform, operators and integrators (no machine's password works here).\n",
    );
    listener_lines(&mut out, services, files.services_passwd, files.acl)?;
    Ok(out)
}

fn listener_lines(
    out: &mut String,
    l: &Listener,
    passwd: &Path,
    acl: &Path,
) -> Result<(), MosquittoFilesError> {
    let _ = match &l.bind {
        Some(addr) => writeln!(out, "listener {} {}", l.port, conf_word(addr)?),
        None => writeln!(out, "listener {}", l.port),
    };
    if let Some(tls) = &l.tls {
        let _ = writeln!(out, "certfile {}", conf_path(&tls.certfile)?);
        let _ = writeln!(out, "keyfile {}", conf_path(&tls.keyfile)?);
    }
    let _ = writeln!(out, "allow_anonymous false");
    let _ = writeln!(out, "password_file {}", conf_path(passwd)?);
    let _ = writeln!(out, "acl_file {}", conf_path(acl)?);
    Ok(())
}

fn conf_path(p: &Path) -> Result<String, MosquittoFilesError> {
    let s = p.display().to_string();
    if s.is_empty() || s.chars().any(char::is_control) {
        return Err(MosquittoFilesError::Path(s));
    }
    Ok(s)
}

/// A bind address: one word.
fn conf_word(s: &str) -> Result<&str, MosquittoFilesError> {
    if s.is_empty() || s.chars().any(|c| c.is_whitespace() || c.is_control()) {
        return Err(MosquittoFilesError::Path(s.to_owned()));
    }
    Ok(s)
}

/// `$7$<iterations>$<base64 salt>$<base64 PBKDF2-HMAC-SHA512>`, as mosquitto_passwd writes it.
fn hash_password(password: &str, salt: &[u8; SALT_LEN], iterations: u32) -> String {
    let mut hash = [0u8; 64];
    pbkdf2::pbkdf2_hmac::<sha2::Sha512>(password.as_bytes(), salt, iterations, &mut hash);
    format!(
        "$7${iterations}${}${}",
        BASE64.encode(salt),
        BASE64.encode(hash)
    )
}

fn check_prefix(prefix: &str) -> Result<(), MosquittoFilesError> {
    // A newline would start a new ACL line; `%` would be substituted in pattern lines;
    // Mosquitto trims blanks around topics.
    match prefix
        .chars()
        .find(|c| c.is_control() || c.is_whitespace() || *c == '%')
    {
        Some(ch) => Err(MosquittoFilesError::Prefix {
            prefix: prefix.to_owned(),
            ch,
        }),
        None => Ok(()),
    }
}

fn claim_of(p: &Principal) -> Claim {
    match p {
        Principal::Platform => Claim::Platform,
        Principal::Operator { name, .. } => Claim::Operator(name.clone()),
        Principal::Integrator { name } => Claim::Integrator(name.clone()),
        Principal::Machine { id, .. } => Claim::Machine(id.clone()),
    }
}

fn kind_order(p: &Principal) -> u8 {
    match p {
        Principal::Platform => 0,
        Principal::Operator { .. } => 1,
        Principal::Integrator { .. } => 2,
        Principal::Machine { .. } => 3,
    }
}

fn acl_header(topics: &Topics) -> String {
    let p = topics.prefix();
    format!(
        "# Generated by fleetcast from its broker policy (proto::acl). Do not edit by hand:\n\
         # regenerate it, then reload Mosquitto (kill -HUP). See docs/mosquitto.md.\n\
         #\n\
         # Anything not granted here is denied. Mosquitto checks read access when it delivers a\n\
         # message, not when a client subscribes: a subscription to # is acknowledged, but only\n\
         # granted topics reach the client. A client's user block is checked first (deny lines\n\
         # before grants), then the pattern lines, which apply to every user.\n\
         #\n\
         # Where Mosquitto is looser than fleetcast's embedded-broker gateway:\n\
         # - Machines read {p}/artifacts/+/chunks, every artifact broadcast; the gateway allows\n\
         #   only subscriptions to one concrete artifact. Chunks are content-addressed and\n\
         #   verified, so this exposes artifact bytes to other machines of the fleet, nothing more.\n\
         # - Admin and integrator topics carry the client id (%c below), and Mosquitto does not tie\n\
         #   client ids to usernames: an operator (or integrator) who connects with another one's\n\
         #   client id takes over that session and its responses. Admin requests are MAC'd and\n\
         #   integrator answers signed, so neither can be forged; machines are denied both trees.\n\
         # - Any client can take over any client id's session (disconnecting its owner) but gets\n\
         #   only its own username's grants: topics below are per username, never per client id.\n\
         \n\
         # Operators: requests, uploads and responses of their own client id only.\n\
         pattern write {p}/admin/%c/request\n\
         pattern write {p}/admin/%c/upload\n\
         pattern read {p}/admin/%c/response\n\
         # Integrators: stored-event requests and answers of their own client id only.\n\
         pattern write {p}/integrators/%c/events/get\n\
         pattern read {p}/integrators/%c/events\n"
    )
}

/// The lines both operators and integrators read.
fn observer_reads(p: &str) -> String {
    format!(
        "topic read {p}/events\n\
         topic read {p}/rollouts/+/progress\n\
         topic read {p}/platform/keys\n"
    )
}

fn user_block(topics: &Topics, principal: &Principal) -> String {
    let p = topics.prefix();
    let user = principal.username();
    match principal {
        // The platform may publish and read anything (proto::acl), also outside the prefix.
        // `#` does not match `$SYS/...` topics in Mosquitto.
        Principal::Platform => format!("user {user}\ntopic readwrite #\n"),
        Principal::Operator { .. } => format!(
            "user {user}\n\
             topic deny {p}/integrators/#\n\
             {}",
            observer_reads(p)
        ),
        Principal::Integrator { .. } => format!(
            "user {user}\n\
             topic deny {p}/admin/#\n\
             {}",
            observer_reads(p)
        ),
        Principal::Machine { id, groups } => {
            let mut s = format!(
                "user {user}\n\
                 topic deny {p}/admin/#\n\
                 topic deny {p}/integrators/#\n\
                 topic write {p}/machines/{id}/status\n\
                 topic write {p}/machines/{id}/state\n\
                 topic write {p}/machines/{id}/online\n\
                 topic write {p}/machines/{id}/chunks/get\n\
                 topic read {p}/machines/{id}/release/+\n\
                 topic read {p}/machines/{id}/command\n\
                 topic read {p}/machines/{id}/status/ack\n\
                 topic read {p}/machines/{id}/chunks\n"
            );
            let groups: BTreeSet<&str> = groups.iter().map(|g| g.as_str()).collect();
            for g in groups {
                let _ = writeln!(s, "topic read {p}/groups/{g}/release/+");
            }
            let _ = writeln!(s, "topic read {p}/artifacts/+/chunks");
            let _ = writeln!(s, "topic read {p}/platform/keys");
            s
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use fleetcast_proto::acl::Role;
    use fleetcast_proto::ids::{GroupId, MachineId};

    fn machine(id: &str, groups: &[&str]) -> Principal {
        Principal::Machine {
            id: MachineId::new(id).unwrap(),
            groups: groups.iter().map(|g| GroupId::new(*g).unwrap()).collect(),
        }
    }

    fn ident(principal: Principal, password: &str) -> BrokerIdentity {
        BrokerIdentity {
            principal,
            password: password.to_owned(),
        }
    }

    fn fleet() -> Vec<BrokerIdentity> {
        vec![
            ident(machine("vm-2", &["g2"]), "pw-vm-2"),
            ident(machine("vm-1", &["g1", "shared", "g1"]), "pw-vm-1"),
            ident(Principal::Integrator { name: "erp".into() }, "pw-int"),
            ident(
                Principal::Operator {
                    name: "alice".into(),
                    role: Role::Admin,
                },
                "pw-op",
            ),
            ident(Principal::Platform, "pw-platform"),
        ]
    }

    /// The lines of `user`'s block, without the `user` line.
    fn block<'a>(acl: &'a str, user: &str) -> Vec<&'a str> {
        let mut lines = acl.lines().skip_while(|l| *l != format!("user {user}"));
        assert!(lines.next().is_some(), "no block for {user}");
        lines.take_while(|l| !l.is_empty()).collect()
    }

    #[test]
    fn a_hash_matches_one_written_by_mosquitto_passwd() {
        // `mosquitto_passwd -b` (Mosquitto 2.0.11) for password 0123456789abcdef0123456789abcdef.
        let line = "$7$101$G/3jvHHEov0vnHzU$6fivC3qj/HpL49oqHIdLnxZZ6Ijqqfe02Kyy0qW85d7HmpYAwNnrZkX2GOfjat9HIq92zdXeM9HpMIbmuDvlzw==";
        let salt: [u8; SALT_LEN] = BASE64
            .decode("G/3jvHHEov0vnHzU")
            .unwrap()
            .try_into()
            .unwrap();
        assert_eq!(
            hash_password("0123456789abcdef0123456789abcdef", &salt, 101),
            line
        );
        assert_ne!(
            hash_password("0123456789abcdef0123456789abcdeF", &salt, 101),
            line
        );
    }

    #[test]
    fn every_identity_gets_one_password_line_with_a_fresh_salt_that_checks_its_password() {
        let files = mosquitto_files(&Topics::default(), &fleet()).unwrap();
        let lines: Vec<&str> = files.passwd.lines().collect();
        let users: Vec<&str> = lines.iter().map(|l| l.split(':').next().unwrap()).collect();
        assert_eq!(
            users,
            [
                "fleetcast-platform",
                "fleetcast-op-alice",
                "fleetcast-int-erp",
                "vm-1",
                "vm-2"
            ]
        );
        let mut salts = HashSet::new();
        for (line, password) in
            lines
                .iter()
                .zip(["pw-platform", "pw-op", "pw-int", "pw-vm-1", "pw-vm-2"])
        {
            let (_, hash) = line.split_once(':').unwrap();
            let parts: Vec<&str> = hash.split('$').collect();
            assert_eq!(&parts[..3], ["", "7", "101"], "{line}");
            let salt: [u8; SALT_LEN] = BASE64.decode(parts[3]).unwrap().try_into().unwrap();
            assert_eq!(BASE64.decode(parts[4]).unwrap().len(), 64);
            assert_eq!(hash_password(password, &salt, 101), hash, "{line}");
            assert!(salts.insert(salt), "salt reused in {line}");
        }
    }

    #[test]
    fn the_acl_file_starts_with_a_do_not_edit_header_and_has_a_block_per_user() {
        let files = mosquitto_files(&Topics::default(), &fleet()).unwrap();
        assert!(files.acl.starts_with(
            "# Generated by fleetcast from its broker policy (proto::acl). Do not edit by hand:\n"
        ));
        for line in files.passwd.lines() {
            let user = line.split(':').next().unwrap();
            block(&files.acl, user);
        }
        // Patterns apply to every user: only the client-id-keyed admin and integrator topics
        // use them, and machines deny both trees in their blocks.
        let patterns: Vec<&str> = files
            .acl
            .lines()
            .filter(|l| l.starts_with("pattern"))
            .collect();
        assert_eq!(
            patterns,
            [
                "pattern write fleet/admin/%c/request",
                "pattern write fleet/admin/%c/upload",
                "pattern read fleet/admin/%c/response",
                "pattern write fleet/integrators/%c/events/get",
                "pattern read fleet/integrators/%c/events",
            ]
        );
    }

    #[test]
    fn a_machine_writes_its_reports_and_reads_its_own_its_groups_and_broadcast_topics() {
        let t = Topics::new("acme/fleet");
        let files = mosquitto_files(&t, &fleet()).unwrap();
        assert_eq!(
            block(&files.acl, "vm-1"),
            [
                "topic deny acme/fleet/admin/#",
                "topic deny acme/fleet/integrators/#",
                "topic write acme/fleet/machines/vm-1/status",
                "topic write acme/fleet/machines/vm-1/state",
                "topic write acme/fleet/machines/vm-1/online",
                "topic write acme/fleet/machines/vm-1/chunks/get",
                "topic read acme/fleet/machines/vm-1/release/+",
                "topic read acme/fleet/machines/vm-1/command",
                "topic read acme/fleet/machines/vm-1/status/ack",
                "topic read acme/fleet/machines/vm-1/chunks",
                "topic read acme/fleet/groups/g1/release/+",
                "topic read acme/fleet/groups/shared/release/+",
                "topic read acme/fleet/artifacts/+/chunks",
                "topic read acme/fleet/platform/keys",
            ]
        );
        // Every granted machine topic is one proto::acl grants (the policy is the source of
        // truth; the artifact's `+` stands for every concrete artifact, checked here with an
        // example; a release `+` is the filter the policy grants, as it is).
        let m = machine("vm-1", &["g1", "shared"]);
        let a = fleetcast_proto::ArtifactId::of(b"x").to_string();
        for line in block(&files.acl, "vm-1") {
            let (access, topic) = line
                .strip_prefix("topic ")
                .unwrap()
                .split_once(' ')
                .unwrap();
            let topic = topic.replace("artifacts/+", &format!("artifacts/{a}"));
            match access {
                "write" => assert!(m.may_publish(&t, "vm-1", &topic), "{line}"),
                "read" => assert!(m.may_subscribe(&t, "vm-1", &topic), "{line}"),
                "deny" => {}
                other => panic!("unexpected access {other} in {line}"),
            }
        }
    }

    #[test]
    fn operators_and_integrators_only_read_shared_topics_and_deny_each_others_trees() {
        let files = mosquitto_files(&Topics::default(), &fleet()).unwrap();
        let shared = [
            "topic read fleet/events",
            "topic read fleet/rollouts/+/progress",
            "topic read fleet/platform/keys",
        ];
        let op = block(&files.acl, "fleetcast-op-alice");
        assert_eq!(op[0], "topic deny fleet/integrators/#");
        assert_eq!(op[1..], shared);
        let int = block(&files.acl, "fleetcast-int-erp");
        assert_eq!(int[0], "topic deny fleet/admin/#");
        assert_eq!(int[1..], shared);
        assert_eq!(
            block(&files.acl, "fleetcast-platform"),
            ["topic readwrite #"]
        );
    }

    #[test]
    fn names_that_do_not_parse_back_to_their_principal_and_repeats_are_refused() {
        let t = Topics::default();
        let reserved = ident(machine("fleetcast-op-mallory", &[]), "x");
        assert!(matches!(
            mosquitto_files(&t, &[reserved]),
            Err(MosquittoFilesError::Username { .. })
        ));
        let newline = ident(
            Principal::Operator {
                name: "a\ntopic readwrite #".into(),
                role: Role::Viewer,
            },
            "x",
        );
        assert!(matches!(
            mosquitto_files(&t, &[newline]),
            Err(MosquittoFilesError::Username { .. })
        ));
        assert_eq!(
            mosquitto_files(
                &t,
                &[
                    ident(machine("vm-1", &[]), "a"),
                    ident(machine("vm-1", &["g"]), "b")
                ]
            ),
            Err(MosquittoFilesError::Duplicate("vm-1".into()))
        );
        for (prefix, ch) in [("a b", ' '), ("a\nb", '\n'), ("a/%u", '%')] {
            assert_eq!(
                mosquitto_files(&Topics::new(prefix), &fleet()),
                Err(MosquittoFilesError::Prefix {
                    prefix: prefix.into(),
                    ch
                })
            );
        }
    }

    #[test]
    fn the_conf_gives_machines_a_listener_of_their_own_where_the_username_is_the_client_id() {
        let files = ConfFiles {
            services_passwd: Path::new("/etc/m/fleetcast.passwd"),
            machines_passwd: Path::new("/etc/m/fleetcast-machines.passwd"),
            acl: Path::new("/etc/m/fleetcast.acl"),
        };
        let machines = Listener {
            bind: None,
            port: 8883,
            tls: Some(ListenerTls {
                certfile: "/etc/m/cert.pem".into(),
                keyfile: "/etc/m/key.pem".into(),
            }),
        };
        let services = Listener {
            bind: Some("127.0.0.1".into()),
            port: 1883,
            tls: None,
        };
        let s = conf(&files, &machines, &services).unwrap();
        let settings: Vec<&str> = s.lines().filter(|l| !l.starts_with('#')).collect();
        assert_eq!(
            settings,
            [
                "per_listener_settings true",
                "set_tcp_nodelay true",
                "max_packet_size 2097152",
                "persistent_client_expiration 1d",
                "",
                "listener 8883",
                "certfile /etc/m/cert.pem",
                "keyfile /etc/m/key.pem",
                "allow_anonymous false",
                "password_file /etc/m/fleetcast-machines.passwd",
                "acl_file /etc/m/fleetcast.acl",
                "use_username_as_clientid true",
                "",
                "listener 1883 127.0.0.1",
                "allow_anonymous false",
                "password_file /etc/m/fleetcast.passwd",
                "acl_file /etc/m/fleetcast.acl",
            ]
        );
        let bad = Listener {
            bind: Some("0.0.0.0 9".into()),
            ..services.clone()
        };
        assert!(conf(&files, &machines, &bad).is_err());
        let bad_path = ConfFiles {
            acl: Path::new("/a\nb"),
            ..files
        };
        assert!(conf(&bad_path, &machines, &services).is_err());
    }

    #[test]
    fn the_password_file_splits_into_the_services_and_the_machines() {
        let files = mosquitto_files(&Topics::default(), &fleet()).unwrap();
        let split = split_passwd(&files.passwd);
        let users = |f: &str| -> Vec<String> {
            f.lines()
                .map(|l| l.split_once(':').unwrap().0.to_owned())
                .collect()
        };
        assert_eq!(
            users(&split.services),
            [
                "fleetcast-platform",
                "fleetcast-op-alice",
                "fleetcast-int-erp"
            ]
        );
        assert_eq!(users(&split.machines), ["vm-1", "vm-2"]);
        // Every line lands in one of the two, unchanged.
        assert_eq!(
            split.services.len() + split.machines.len(),
            files.passwd.len()
        );
        assert_eq!(split_passwd("fleetcast-bogus:x\n").services, "");
    }

    #[test]
    fn the_debug_form_of_an_identity_hides_its_password() {
        let s = format!("{:?}", ident(Principal::Platform, "hunter2"));
        assert!(!s.contains("hunter2"), "{s}");
    }
}
