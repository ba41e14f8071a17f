//! Test support (feature `testing`): a real Mosquitto on a free loopback port, open to anyone or
//! enforcing fleetcast's generated password and ACL files.

use std::net::{SocketAddr, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use crate::client::BrokerUrl;
use crate::mosquitto::{self, MosquittoFiles};

/// A Mosquitto process started for one test; killed on drop.
pub struct Mosquitto {
    child: Child,
    bin: PathBuf,
    conf: PathBuf,
    dir: tempfile::TempDir,
    /// Where the platform, operators and integrators connect.
    pub url: BrokerUrl,
    /// Where machines connect: a listener of their own under the generated files
    /// ([`Mosquitto::start_with_files`]), else the same as `url`.
    pub machine_url: BrokerUrl,
}

/// Where the mosquitto binary is, if installed (Debian puts it in /usr/sbin).
pub fn mosquitto_binary() -> Option<PathBuf> {
    for dir in std::env::var("PATH")
        .unwrap_or_default()
        .split(':')
        .chain(["/usr/sbin", "/usr/local/sbin"])
    {
        let p = PathBuf::from(dir).join("mosquitto");
        if p.is_file() {
            return Some(p);
        }
    }
    None
}

impl Mosquitto {
    /// Starts mosquitto with anonymous access, TCP_NODELAY, and no persistence. `extra` is
    /// appended to its config (e.g. ACL settings).
    pub fn start(extra: &str) -> std::io::Result<Self> {
        Self::launch(false, |_dir, port, _| {
            Ok(format!(
                "listener {port} 127.0.0.1\nset_tcp_nodelay true\nallow_anonymous true\n{extra}\n"
            ))
        })
    }

    /// Starts mosquitto enforcing fleetcast's generated files as an operator would run them:
    /// the password files and the ACL file written into its temp dir and loaded by
    /// [`mosquitto::conf`], machines on one loopback listener ([`Mosquitto::machine_url`]) and
    /// everyone else on another ([`Mosquitto::url`]). Anonymous clients are refused. Its log is
    /// kept: see [`Mosquitto::log`].
    pub fn start_with_files(files: &MosquittoFiles) -> std::io::Result<Self> {
        Self::launch(true, |dir, port, machine_port| {
            write_files(dir, files)?;
            let on = |port| mosquitto::Listener {
                bind: Some("127.0.0.1".into()),
                port,
                tls: None,
            };
            let conf = mosquitto::conf(
                &mosquitto::ConfFiles {
                    services_passwd: &dir.join(PASSWD),
                    machines_passwd: &dir.join(MACHINES_PASSWD),
                    acl: &dir.join(ACL),
                },
                &on(machine_port),
                &on(port),
            )
            .map_err(std::io::Error::other)?;
            // As root, mosquitto drops to the `mosquitto` user before it reads the password and
            // ACL files, and could not read our private temp dir; `user root` keeps whoever
            // started it (a non-root mosquitto ignores the option).
            Ok(format!(
                "{conf}user root\nlog_dest file {}\nlog_type error\nlog_type warning\nlog_type notice\nlog_type information\n",
                dir.join(LOG).display()
            ))
        })
    }

    /// The broker's process id (benchmarks read its CPU time and memory).
    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// Replaces the password and ACL files; [`Mosquitto::reload`] makes mosquitto read them.
    pub fn rewrite_files(&self, files: &MosquittoFiles) -> std::io::Result<()> {
        write_files(self.dir.path(), files)
    }

    /// Sends SIGHUP: mosquitto rereads its config, password and ACL files. When it keeps a log
    /// ([`Mosquitto::start_with_files`]), returns once it logged the reload: its single-threaded
    /// loop logs that as it starts reloading and reads no packet before it is done, so packets
    /// sent after this returns meet the new files.
    pub fn reload(&self) -> std::io::Result<()> {
        const RELOADING: &str = "Reloading config.";
        let before = self.log().matches(RELOADING).count();
        let status = Command::new("kill")
            .arg("-HUP")
            .arg(self.child.id().to_string())
            .status()?;
        if !status.success() {
            return Err(std::io::Error::other(format!("kill -HUP failed: {status}")));
        }
        if !self.dir.path().join(LOG).exists() {
            return Ok(());
        }
        let deadline = Instant::now() + Duration::from_secs(5);
        while self.log().matches(RELOADING).count() == before {
            if Instant::now() > deadline {
                return Err(std::io::Error::other(format!(
                    "mosquitto did not log a reload within 5 s; its log:\n{}",
                    self.log()
                )));
            }
            std::thread::sleep(Duration::from_millis(10));
        }
        Ok(())
    }

    /// What mosquitto logged so far (empty unless started with [`Mosquitto::start_with_files`]).
    pub fn log(&self) -> String {
        std::fs::read_to_string(self.dir.path().join(LOG)).unwrap_or_default()
    }

    /// Starts mosquitto on a free port (and a second one for machines if `two`) with
    /// `settings(dir, port, machine_port)` after the common settings, retrying on a port clash.
    fn launch(
        two: bool,
        settings: impl Fn(&Path, u16, u16) -> std::io::Result<String>,
    ) -> std::io::Result<Self> {
        let bin = mosquitto_binary().ok_or_else(|| {
            std::io::Error::new(
                std::io::ErrorKind::NotFound,
                "mosquitto is not installed (apt-get install mosquitto)",
            )
        })?;
        let mut last_err = None;
        for _ in 0..5 {
            let port = crate::client::free_loopback_port()?;
            let machine_port = if two {
                crate::client::free_loopback_port()?
            } else {
                port
            };
            let dir = tempfile::tempdir()?;
            let conf = dir.path().join("mosquitto.conf");
            let settings = settings(dir.path(), port, machine_port)?;
            std::fs::write(
                &conf,
                format!("persistence false\nmax_queued_messages 10000\n{settings}"),
            )?;
            let mut child = Command::new(&bin)
                .arg("-c")
                .arg(&conf)
                .stdout(Stdio::null())
                .stderr(Stdio::null())
                .spawn()?;
            let deadline = Instant::now() + Duration::from_secs(5);
            while Instant::now() < deadline {
                if listening(port) && listening(machine_port) {
                    return Ok(Self {
                        child,
                        bin: bin.clone(),
                        conf,
                        dir,
                        url: BrokerUrl::mqtt("127.0.0.1", port),
                        machine_url: BrokerUrl::mqtt("127.0.0.1", machine_port),
                    });
                }
                if let Ok(Some(_)) = child.try_wait() {
                    break; // port clash or bad config: try another port
                }
                std::thread::sleep(Duration::from_millis(20));
            }
            let _ = child.kill();
            let _ = child.wait();
            last_err = Some(std::io::Error::other(format!(
                "mosquitto did not listen on 127.0.0.1:{port} and :{machine_port}"
            )));
        }
        Err(last_err.expect("loop ran"))
    }
}

fn listening(port: u16) -> bool {
    let addr = SocketAddr::from(([127, 0, 0, 1], port));
    TcpStream::connect_timeout(&addr, Duration::from_millis(100)).is_ok()
}

const PASSWD: &str = "fleetcast.passwd";
const MACHINES_PASSWD: &str = "fleetcast-machines.passwd";
const ACL: &str = "fleetcast.acl";
const LOG: &str = "mosquitto.log";

/// Writes the password files (split by [`mosquitto::split_passwd`]) and the ACL file, readable
/// by their owner only (the password files hold hashes).
fn write_files(dir: &Path, files: &MosquittoFiles) -> std::io::Result<()> {
    let split = mosquitto::split_passwd(&files.passwd);
    for (name, text) in [
        (PASSWD, &split.services),
        (MACHINES_PASSWD, &split.machines),
        (ACL, &files.acl),
    ] {
        let path = dir.join(name);
        std::fs::write(&path, text)?;
        #[cfg(unix)]
        {
            use std::os::unix::fs::PermissionsExt;
            std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o600))?;
        }
    }
    Ok(())
}

impl Mosquitto {
    /// Kills the broker (SIGKILL: clients see the connection drop, nothing is persisted).
    pub fn kill(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }

    /// Starts it again on the same port with the same config.
    pub fn restart(&mut self) -> std::io::Result<()> {
        self.kill();
        let (port, machine_port) = (self.url.port, self.machine_url.port);
        let deadline = Instant::now() + Duration::from_secs(10);
        loop {
            self.child = Command::new(&self.bin)
                .arg("-c")
                .arg(&self.conf)
                .stdout(Stdio::null())
                .stderr(Stdio::null())
                .spawn()?;
            let started = Instant::now();
            while started.elapsed() < Duration::from_secs(2) {
                if listening(port) && listening(machine_port) {
                    return Ok(());
                }
                if let Ok(Some(_)) = self.child.try_wait() {
                    break; // the port is still in TIME_WAIT or similar: try again
                }
                std::thread::sleep(Duration::from_millis(20));
            }
            let _ = self.child.kill();
            let _ = self.child.wait();
            if Instant::now() > deadline {
                return Err(std::io::Error::other(format!(
                    "mosquitto did not listen again on 127.0.0.1:{port} and :{machine_port}"
                )));
            }
            std::thread::sleep(Duration::from_millis(200));
        }
    }
}

impl Drop for Mosquitto {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// A throw-away CA and a server certificate for 127.0.0.1 and localhost that it signed (PEM).
pub struct TestPki {
    pub ca_pem: String,
    pub cert_pem: String,
    pub key_pem: String,
}

/// Makes a [`TestPki`] with rcgen.
pub fn test_pki() -> TestPki {
    use rcgen::{BasicConstraints, CertificateParams, CertifiedIssuer, DnType, IsCa, KeyPair};
    let mut ca_params = CertificateParams::new(Vec::<String>::new()).expect("CA params");
    ca_params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    ca_params
        .distinguished_name
        .push(DnType::CommonName, "fleetcast test CA");
    let ca = CertifiedIssuer::self_signed(ca_params, KeyPair::generate().expect("CA key"))
        .expect("CA certificate");
    let key = KeyPair::generate().expect("server key");
    let params = CertificateParams::new(vec!["127.0.0.1".to_owned(), "localhost".to_owned()])
        .expect("server params");
    let cert = params.signed_by(&key, &ca).expect("server certificate");
    TestPki {
        ca_pem: ca.pem(),
        cert_pem: cert.pem(),
        key_pem: key.serialize_pem(),
    }
}
