//! Test support (feature `testing`): a real Mosquitto on a free loopback port.

use std::net::{SocketAddr, TcpStream};
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use crate::client::BrokerUrl;

/// A Mosquitto process started for one test; killed on drop.
pub struct Mosquitto {
    child: Child,
    bin: PathBuf,
    conf: PathBuf,
    _dir: tempfile::TempDir,
    pub url: BrokerUrl,
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
        let bin = mosquitto_binary().ok_or_else(|| {
            std::io::Error::new(
                std::io::ErrorKind::NotFound,
                "mosquitto is not installed (apt-get install mosquitto)",
            )
        })?;
        let mut last_err = None;
        for _ in 0..5 {
            let port = crate::client::free_loopback_port()?;
            let dir = tempfile::tempdir()?;
            let conf = dir.path().join("mosquitto.conf");
            std::fs::write(
                &conf,
                format!(
                    "listener {port} 127.0.0.1\nallow_anonymous true\nset_tcp_nodelay true\npersistence false\nmax_queued_messages 10000\n{extra}\n"
                ),
            )?;
            let mut child = Command::new(&bin)
                .arg("-c")
                .arg(&conf)
                .stdout(Stdio::null())
                .stderr(Stdio::null())
                .spawn()?;
            let addr = SocketAddr::from(([127, 0, 0, 1], port));
            let deadline = Instant::now() + Duration::from_secs(5);
            while Instant::now() < deadline {
                if TcpStream::connect_timeout(&addr, Duration::from_millis(100)).is_ok() {
                    return Ok(Self {
                        child,
                        bin: bin.clone(),
                        conf,
                        _dir: dir,
                        url: BrokerUrl::mqtt("127.0.0.1", port),
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
                "mosquitto did not listen on {addr}"
            )));
        }
        Err(last_err.expect("loop ran"))
    }
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
        let addr = SocketAddr::from(([127, 0, 0, 1], self.url.port));
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
                if TcpStream::connect_timeout(&addr, Duration::from_millis(100)).is_ok() {
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
                    "mosquitto did not listen again on {addr}"
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
