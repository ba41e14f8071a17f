//! The real platform in this process (`fleetcast_platform::serve` with its embedded broker and
//! authorizing gateway on a free loopback port) and the real agent as a child process (the
//! built `fleetcast-device` binary), for the tests that kill, starve and package the agent.

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use fleetcast_broker::admin::{AdminClient, AdminError};
use fleetcast_broker::client::{self, BrokerUrl};
use fleetcast_device::{InstallerConfig, MachineConfig};
use fleetcast_platform::{admin_secret_path, serve, ServeOptions};
use fleetcast_proto::admin::{
    AdminOp, AdminReply, FleetEvent, MachineInfo, ProvisionedMachine, ReleaseStatus,
};
use fleetcast_proto::{ArtifactId, GroupId, InstallPolicy, Kind, MachineId, ReleaseId, Topics};
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;

pub const WAIT: Duration = Duration::from_secs(30);

/// `fleetcast serve` in this process, as a fleet runs it: rumqttd behind the gateway, every
/// client with its own credentials.
pub struct RealPlatform {
    pub url: BrokerUrl,
    pub admin: AdminClient,
    shutdown: CancellationToken,
    task: Option<JoinHandle<Result<(), fleetcast_platform::PlatformError>>>,
}

impl Drop for RealPlatform {
    fn drop(&mut self) {
        self.shutdown.cancel();
        if let Some(task) = self.task.take() {
            task.abort();
        }
    }
}

impl RealPlatform {
    /// Starts the platform with its data in `data`; a port taken between choosing and binding
    /// it is retried with another.
    pub async fn start(data: &Path) -> Self {
        let mut last = String::new();
        for _ in 0..3 {
            let port = client::free_loopback_port().unwrap();
            let url = BrokerUrl::mqtt("127.0.0.1", port);
            let shutdown = CancellationToken::new();
            let opts = ServeOptions {
                data_dir: data.to_owned(),
                broker: url.clone(),
                embedded_listen: Some(([127, 0, 0, 1], port).into()),
                tls: None,
                topic_prefix: "fleet".into(),
                limits: Default::default(),
                compaction: Default::default(),
            };
            let task = tokio::spawn(serve(opts, shutdown.clone()));
            match connect_admin(&url, data, &task).await {
                Ok(admin) => {
                    return Self {
                        url,
                        admin,
                        shutdown,
                        task: Some(task),
                    }
                }
                Err(e) => {
                    last = e;
                    shutdown.cancel();
                    let _ = tokio::time::timeout(Duration::from_secs(10), task).await;
                }
            }
        }
        panic!("the platform did not start: {last}");
    }

    pub async fn request(&self, op: AdminOp) -> AdminReply {
        let name = op.name();
        self.admin
            .request_with_timeout(op, WAIT)
            .await
            .unwrap_or_else(|e| panic!("admin request {name}: {e}"))
    }

    pub async fn provision(&self, id: &str, groups: &[&str]) -> ProvisionedMachine {
        let op = AdminOp::MachineProvision {
            machine: MachineId::new(id).unwrap(),
            groups: groups.iter().map(|g| GroupId::new(*g).unwrap()).collect(),
            rotate: false,
        };
        match self.request(op).await {
            AdminReply::Provisioned { machine } => machine,
            other => panic!("unexpected reply to provisioning: {other:?}"),
        }
    }

    /// Uploads `bytes` as `kind` `version` and creates a release of it.
    pub async fn release(
        &self,
        dir: &Path,
        kind: &Kind,
        version: &str,
        bytes: &[u8],
        policy: InstallPolicy,
    ) -> (ArtifactId, ReleaseId) {
        let file = dir.join(format!("{kind}-{version}.bin"));
        std::fs::write(&file, bytes).unwrap();
        let artifact = self
            .admin
            .upload(&file, kind.clone(), version.into(), None, 65536, |_, _| {})
            .await
            .unwrap_or_else(|e| panic!("uploading {kind} {version}: {e}"))
            .id;
        let op = AdminOp::ReleaseCreate {
            kind: kind.clone(),
            version: version.into(),
            policy,
            notes: None,
        };
        match self.request(op).await {
            AdminReply::Release { release } => (artifact, release.id),
            other => panic!("unexpected reply to release create: {other:?}"),
        }
    }

    pub async fn publish(&self, release: &ReleaseId, machine: &MachineId) {
        let op = AdminOp::ReleasePublish {
            release: release.clone(),
            machines: vec![machine.clone()],
            groups: vec![],
            allow_empty: false,
            waves: None,
        };
        match self.request(op).await {
            AdminReply::Plan { .. } => {}
            other => panic!("unexpected reply to publish: {other:?}"),
        }
    }

    pub async fn status(&self, release: &ReleaseId) -> ReleaseStatus {
        match self
            .request(AdminOp::ReleaseStatus {
                release: release.clone(),
                after: None,
                limit: None,
            })
            .await
        {
            AdminReply::ReleaseStatus { status } => status,
            other => panic!("unexpected reply to release status: {other:?}"),
        }
    }

    pub async fn machine(&self, id: &MachineId) -> MachineInfo {
        match self.request(AdminOp::Machines).await {
            AdminReply::Machines { machines } => machines
                .into_iter()
                .find(|m| &m.id == id)
                .unwrap_or_else(|| panic!("{id} is not in the platform's machine list")),
            other => panic!("unexpected reply to machines: {other:?}"),
        }
    }

    /// Waits until the platform's machine record satisfies `done`.
    pub async fn wait_machine(
        &self,
        id: &MachineId,
        what: &str,
        done: impl Fn(&MachineInfo) -> bool,
    ) -> MachineInfo {
        let deadline = Instant::now() + WAIT;
        loop {
            let m = self.machine(id).await;
            if done(&m) {
                return m;
            }
            assert!(
                Instant::now() < deadline,
                "{what}: not within {WAIT:?}; the platform's record: {m:#?}"
            );
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    /// Every event stored so far.
    pub async fn events(&self) -> Vec<FleetEvent> {
        let mut out = Vec::new();
        let mut since = 0;
        loop {
            match self
                .request(AdminOp::EventsSince { since, limit: None })
                .await
            {
                AdminReply::Events { events, next, more } => {
                    out.extend(events);
                    since = next;
                    if !more {
                        return out;
                    }
                }
                other => panic!("unexpected reply to events: {other:?}"),
            }
        }
    }
}

async fn connect_admin(
    url: &BrokerUrl,
    data: &Path,
    task: &JoinHandle<Result<(), fleetcast_platform::PlatformError>>,
) -> Result<AdminClient, String> {
    let secret_path = admin_secret_path(data);
    let deadline = Instant::now() + WAIT;
    while Instant::now() < deadline {
        if task.is_finished() {
            return Err("serve ended".into());
        }
        if let Ok(secret) = fleetcast_broker::admin::load_secret(None, &secret_path) {
            if let Ok(admin) =
                AdminClient::connect(url, Topics::default(), secret, Duration::from_secs(5)).await
            {
                match admin
                    .request_with_timeout(AdminOp::Machines, Duration::from_millis(500))
                    .await
                {
                    Ok(_) => return Ok(admin),
                    Err(AdminError::Timeout { .. }) => {}
                    Err(e) => return Err(e.to_string()),
                }
                admin.close().await;
            }
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    Err(format!("no answer within {WAIT:?}"))
}

/// The machine config an operator would install: the provisioned identity, this broker, the
/// data dir, and the slots installer for `kind` with `health_cmd`.
pub fn machine_config(
    p: &ProvisionedMachine,
    url: &BrokerUrl,
    data_dir: &Path,
    kind: &Kind,
    health_cmd: Option<String>,
) -> MachineConfig {
    let mut c = MachineConfig::from_provisioned(p, &url.to_string(), data_dir.to_owned());
    c.installers
        .insert(kind.clone(), InstallerConfig::Slots { health_cmd });
    c.initial_versions.insert(kind.clone(), "1.0.0".into());
    c
}

/// The `fleetcast-device` binary this test binary was built with.
pub fn agent_bin() -> PathBuf {
    PathBuf::from(env!("CARGO_BIN_EXE_fleetcast-device"))
}

/// A `fleetcast-device run` process, SIGKILLed and reaped on drop.
pub struct AgentProcess {
    child: Child,
    pub log: PathBuf,
}

impl AgentProcess {
    /// Runs `bin run --config config`, its output appended to `log`.
    pub fn spawn(bin: &Path, config: &Path, log: &Path) -> Self {
        let out = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(log)
            .unwrap();
        let child = Command::new(bin)
            .arg("run")
            .arg("--config")
            .arg(config)
            .env("RUST_LOG", "fleetcast_device=debug,info")
            .stdin(Stdio::null())
            .stdout(out.try_clone().unwrap())
            .stderr(out)
            .spawn()
            .unwrap_or_else(|e| panic!("cannot start {}: {e}", bin.display()));
        Self {
            child,
            log: log.to_owned(),
        }
    }

    pub fn child(&mut self) -> &mut Child {
        &mut self.child
    }

    /// `kill -9`: no chance to finish a write, a report or a goodbye.
    pub fn kill9(&mut self) {
        self.child.kill().unwrap();
        let status = self.child.wait().unwrap();
        assert!(
            std::os::unix::process::ExitStatusExt::signal(&status) == Some(libc::SIGKILL),
            "the agent had already exited ({status}); its log:\n{}",
            self.log_tail()
        );
    }

    /// Fails when the agent exited on its own.
    pub fn assert_running(&mut self) {
        if let Ok(Some(status)) = self.child.try_wait() {
            panic!("the agent exited ({status}); its log:\n{}", self.log_tail());
        }
    }

    pub fn log_tail(&self) -> String {
        let text = std::fs::read_to_string(&self.log).unwrap_or_default();
        let lines: Vec<&str> = text.lines().collect();
        lines[lines.len().saturating_sub(40)..].join("\n")
    }
}

impl Drop for AgentProcess {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Polls `done` every 20 ms for up to `WAIT`.
pub async fn wait_for(what: &str, mut done: impl FnMut() -> bool) {
    let deadline = Instant::now() + WAIT;
    while !done() {
        assert!(Instant::now() < deadline, "{what}: not within {WAIT:?}");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// Reproducible bytes of `len` that differ per `seed`.
pub fn artifact_bytes(len: usize, seed: u8) -> Vec<u8> {
    let mut x = 0x9E37_79B9_7F4A_7C15u64 ^ u64::from(seed);
    let mut out = Vec::with_capacity(len + 8);
    while out.len() < len {
        x = x
            .wrapping_mul(6364136223846793005)
            .wrapping_add(1442695040888963407);
        out.extend_from_slice(&x.to_le_bytes());
    }
    out.truncate(len);
    out
}

/// What the slots installer's `current` link points at, checked: the slot is complete (its
/// `artifact`, `version` and `artifact_id` files are all there) and verified (the artifact
/// hashes to the id it claims). Returns (slot name, version, artifact id).
pub fn current_slot(slots: &Path) -> (String, String, ArtifactId) {
    let link = slots.join("current");
    let target =
        std::fs::read_link(&link).unwrap_or_else(|e| panic!("{}: not a link: {e}", link.display()));
    let slot = target.to_string_lossy().into_owned();
    assert!(
        slot == "a" || slot == "b",
        "current points at {slot:?}, not a slot"
    );
    let dir = slots.join(&slot);
    let read = |name: &str| {
        std::fs::read_to_string(dir.join(name))
            .unwrap_or_else(|e| panic!("slot {slot} is incomplete: {name}: {e}"))
    };
    let version = read("version");
    let claimed: ArtifactId = read("artifact_id").trim().parse().unwrap();
    let bytes = std::fs::read(dir.join("artifact"))
        .unwrap_or_else(|e| panic!("slot {slot} is incomplete: artifact: {e}"));
    assert_eq!(
        ArtifactId::of(&bytes),
        claimed,
        "slot {slot}'s artifact does not hash to the id it claims"
    );
    (slot, version, claimed)
}
