//! The update logic as a pure state machine: `handle(now, input) -> actions`, no I/O.
//!
//! One [`KindRecord`] per version type holds what is installed, what sits in the rollback slot,
//! the highest notice `seq` accepted, and at most one [`Job`] (plus one notice queued behind a
//! running install). The agent loop feeds verified notices, commands, download and install
//! results and clock ticks in, and carries out the returned [`Action`]s. The whole [`Ledger`] is
//! persisted after every decision, so a restarted agent resumes each job from its step.
//!
//! A notice that is not verifiably the platform's ([`Input::Unverified`]) is reported as
//! `rejected` without a release: nothing it claims is trusted. Such reports are deduplicated by
//! the payload's hash and rate-limited, so junk on a topic the machine reads cannot make it
//! flood the platform.

use std::cmp::Ordering;
use std::collections::{BTreeMap, VecDeque};

use fleetcast_proto::chunk::Layout;
use fleetcast_proto::command::{Command, CommandAction};
use fleetcast_proto::release::{compare_versions, validate_version};
use fleetcast_proto::status::{KindState, Progress};
use fleetcast_proto::{ArtifactId, GroupId, InstallPolicy, Kind, MachineId, Phase, ReleaseId};
use fleetcast_proto::{ReleaseNotice, Target};
use serde::{Deserialize, Serialize};

/// How many unverified notices the ledger remembers (by payload hash) as already reported.
pub const UNVERIFIED_SEEN_MAX: usize = 32;
/// Unverified notices are reported at most once per topic per window...
pub const UNVERIFIED_WINDOW_MS: u64 = 60_000;
/// ...and at most this many per window over all topics.
pub const UNVERIFIED_PER_WINDOW: usize = 4;

/// A version present on the machine. `artifact` is unknown for versions the machine shipped with.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Installed {
    pub version: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub artifact: Option<ArtifactId>,
}

/// Where a job stands. Persisted: a restarted agent resumes from here.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Step {
    Downloading,
    /// Downloaded, waiting for the policy (window, idle) or for `activate`.
    Deferred,
    Installing,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Job {
    pub notice: ReleaseNotice,
    pub step: Step,
    /// `activate` arrived while downloading: install as soon as the download is done.
    #[serde(default)]
    pub activated: bool,
    /// The rollback slot already holds the artifact: switch back, no download.
    #[serde(default)]
    pub from_previous: bool,
}

/// A status event without the envelope fields (machine, ctr, time) the agent adds.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct StatusReport {
    pub kind: Kind,
    pub release: Option<ReleaseId>,
    pub version: String,
    pub phase: Phase,
    #[serde(default)]
    pub progress: Option<Progress>,
    #[serde(default = "one")]
    pub attempt: u32,
    #[serde(default)]
    pub error: Option<String>,
    #[serde(default)]
    pub detail: Option<String>,
}

fn one() -> u32 {
    1
}

impl StatusReport {
    fn new(notice: &ReleaseNotice, phase: Phase) -> Self {
        Self {
            kind: notice.kind.clone(),
            release: Some(notice.release.clone()),
            version: notice.version.clone(),
            phase,
            progress: None,
            attempt: 1,
            error: None,
            detail: None,
        }
    }
    fn error(mut self, e: impl Into<String>) -> Self {
        self.error = Some(e.into());
        self
    }
    fn detail(mut self, d: impl Into<String>) -> Self {
        self.detail = Some(d.into());
        self
    }
}

#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct KindRecord {
    /// Highest notice seq accepted for this kind.
    #[serde(default)]
    pub accepted_seq: u64,
    /// Seq of the last notice refused for this kind: its retained copy comes back on every
    /// reconnect and is not reported again.
    #[serde(default)]
    pub rejected_seq: u64,
    #[serde(default)]
    pub installed: Option<Installed>,
    /// What the inactive (rollback) slot holds.
    #[serde(default)]
    pub previous: Option<Installed>,
    #[serde(default)]
    pub job: Option<Job>,
    /// A newer notice accepted while an install was running; started when it ends.
    #[serde(default)]
    pub queued: Option<ReleaseNotice>,
    /// The latest status reported for this kind (for `report` and the retained state).
    #[serde(default)]
    pub last: Option<StatusReport>,
}

/// Everything the machine decides on, persisted as a whole.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Ledger {
    #[serde(default)]
    pub kinds: BTreeMap<Kind, KindRecord>,
    #[serde(default)]
    pub last_command_seq: u64,
    /// The groups the platform last said this machine is in (a `groups` command); until one
    /// comes, those of the config. The platform's membership wins over a config edited later.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub groups: Option<Vec<GroupId>>,
    /// blake3 (hex) of the last [`UNVERIFIED_SEEN_MAX`] unverified notices reported: a retained
    /// one comes back on every reconnect and is reported once. The hash of the bytes, not the
    /// seq the notice claims: a forgery must not mark a genuine notice's seq as seen.
    #[serde(default, skip_serializing_if = "VecDeque::is_empty")]
    pub unverified_seen: VecDeque<String>,
    /// The latest failure reported (a job that failed, a notice refused), for a technician's
    /// `fleetcast-device status`: the per-kind `last` is overwritten by the next job.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub last_error: Option<LastError>,
}

/// A failure the machine reported, with the time it did.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct LastError {
    pub at_ms: u64,
    pub kind: Kind,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub release: Option<ReleaseId>,
    /// Empty for a notice that did not verify (nothing it claims is trusted).
    #[serde(default)]
    pub version: String,
    pub phase: Phase,
    pub error: String,
}

impl Ledger {
    /// Artifacts the machine may still need on disk: what is installed, what the rollback slot
    /// holds (a rollback installs it from there, or from `artifacts/` with the command
    /// installer), and what each job or queued notice is about to fetch or install.
    pub fn artifacts_in_use(&self) -> std::collections::HashSet<ArtifactId> {
        let mut keep = std::collections::HashSet::new();
        for rec in self.kinds.values() {
            keep.extend(rec.installed.as_ref().and_then(|i| i.artifact));
            keep.extend(rec.previous.as_ref().and_then(|i| i.artifact));
            keep.extend(rec.job.as_ref().map(|j| j.notice.artifact.id));
            keep.extend(rec.queued.as_ref().map(|n| n.artifact.id));
        }
        keep
    }
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum InstallOutcome {
    Installed,
    /// The installer failed before switching; the old version is still active.
    Failed(String),
    /// Installed, unhealthy, switched back.
    RolledBack(String),
}

/// A notice on a release topic that is not verifiably the platform's: a bad or missing
/// signature, a retired key, a malformed envelope or body.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct UnverifiedNotice {
    /// Where it arrived: the rate limit is per topic.
    pub topic: String,
    /// The topic's kind (nothing in the body is trusted).
    pub kind: Kind,
    /// blake3 of the payload bytes.
    pub digest: [u8; 32],
    pub error: String,
    /// The release id it claims, unverified: only shown to operators in `detail`.
    pub claimed: Option<ReleaseId>,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Input {
    /// A notice whose platform signature verified.
    Notice(ReleaseNotice),
    /// A notice that is not verifiably the platform's. Reported without a release, never
    /// acted on.
    Unverified(UnverifiedNotice),
    /// A command whose platform signature verified.
    Command(Command),
    DownloadProgress {
        kind: Kind,
        release: ReleaseId,
        progress: Progress,
        attempt: u32,
    },
    DownloadFinished {
        kind: Kind,
        release: ReleaseId,
    },
    DownloadFailed {
        kind: Kind,
        release: ReleaseId,
        error: String,
        attempts: u32,
    },
    InstallFinished {
        kind: Kind,
        release: ReleaseId,
        outcome: InstallOutcome,
    },
    /// Re-check deferred installs against the clock.
    Tick,
    Busy(bool),
    /// The agent started: restart whatever each persisted job was doing.
    Resume,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Action {
    Report(StatusReport),
    PublishState,
    StartDownload {
        kind: Kind,
        notice: ReleaseNotice,
    },
    CancelDownload {
        kind: Kind,
        release: ReleaseId,
    },
    StartInstall {
        kind: Kind,
        notice: ReleaseNotice,
        from_previous: bool,
    },
    /// The groups whose release topics to follow changed (after the ledger is persisted).
    FollowGroups {
        joined: Vec<GroupId>,
        left: Vec<GroupId>,
    },
    Persist,
}

/// The decision logic of one machine.
#[derive(Debug, Clone)]
pub struct Updater {
    me: MachineId,
    groups: Vec<GroupId>,
    utc_offset_minutes: i32,
    busy: bool,
    pub ledger: Ledger,
    /// When an unverified notice was last reported, per topic, within the last window.
    unverified_reports: BTreeMap<String, u64>,
}

impl Updater {
    pub fn new(
        me: MachineId,
        groups: Vec<GroupId>,
        utc_offset_minutes: i32,
        mut ledger: Ledger,
        initial_versions: &BTreeMap<Kind, String>,
    ) -> Self {
        for (kind, version) in initial_versions {
            let rec = ledger.kinds.entry(kind.clone()).or_default();
            if rec.installed.is_none() {
                rec.installed = Some(Installed {
                    version: version.clone(),
                    artifact: None,
                });
            }
        }
        let groups = ledger.groups.clone().unwrap_or(groups);
        Self {
            me,
            groups,
            utc_offset_minutes,
            busy: false,
            ledger,
            unverified_reports: BTreeMap::new(),
        }
    }

    pub fn busy(&self) -> bool {
        self.busy
    }

    /// The groups whose notices this machine follows: the platform's once it has said, else the
    /// config's.
    pub fn groups(&self) -> &[GroupId] {
        &self.groups
    }

    /// Whether a downloaded `idle` job waits for the machine to be free (and nothing else,
    /// such as an `activate`, lets it install now).
    pub fn waits_for_idle(&self) -> bool {
        self.ledger.kinds.values().any(|r| {
            r.job.as_ref().is_some_and(|j| {
                j.step == Step::Deferred && !j.activated && j.notice.policy == InstallPolicy::Idle
            })
        })
    }

    /// Per-kind inventory for the retained state message.
    pub fn kind_states(&self) -> BTreeMap<Kind, KindState> {
        self.ledger
            .kinds
            .iter()
            .map(|(kind, rec)| {
                let installed = rec.installed.as_ref();
                let state = KindState {
                    version: installed.map(|i| i.version.clone()),
                    artifact: installed.and_then(|i| i.artifact),
                    release: rec.last.as_ref().and_then(|l| l.release.clone()),
                    phase: rec.last.as_ref().map(|l| l.phase),
                    seq: rec.accepted_seq,
                };
                (kind.clone(), state)
            })
            .collect()
    }

    pub fn handle(&mut self, now_ms: u64, input: Input) -> Vec<Action> {
        let mut out = Vec::new();
        match input {
            Input::Notice(notice) => self.on_notice(now_ms, notice, &mut out),
            Input::Unverified(n) => self.on_unverified(now_ms, n, &mut out),
            Input::Command(cmd) => self.on_command(now_ms, cmd, &mut out),
            Input::Tick => self.check_deferred(now_ms, &mut out),
            Input::Busy(busy) => {
                if busy != self.busy {
                    self.busy = busy;
                    out.push(Action::PublishState);
                    self.check_deferred(now_ms, &mut out);
                }
            }
            Input::Resume => self.resume(&mut out),
            Input::DownloadProgress { kind, release, .. }
            | Input::DownloadFinished { kind, release }
            | Input::DownloadFailed { kind, release, .. }
            | Input::InstallFinished { kind, release, .. }
                if !self.is_current(&kind, &release) =>
            {
                tracing::debug!(%kind, %release, "result for a job that is no longer current; dropped");
            }
            job_event => self.on_job_event(now_ms, job_event, &mut out),
        }
        if out.iter().any(|a| matches!(a, Action::Report(_))) {
            for a in &out {
                if let Action::Report(r) = a {
                    if r.phase != Phase::Rejected {
                        if let Some(rec) = self.ledger.kinds.get_mut(&r.kind) {
                            rec.last = Some(r.clone());
                        }
                    }
                    if let (true, Some(error)) = (r.phase.is_failure(), &r.error) {
                        // Every failure report comes with `Persist`.
                        self.ledger.last_error = Some(LastError {
                            at_ms: now_ms,
                            kind: r.kind.clone(),
                            release: r.release.clone(),
                            version: r.version.clone(),
                            phase: r.phase,
                            error: error.clone(),
                        });
                    }
                }
            }
        }
        out
    }

    /// Reports an unverified notice once (by payload hash), at most once per topic per window
    /// and [`UNVERIFIED_PER_WINDOW`] per window in all.
    fn on_unverified(&mut self, now_ms: u64, n: UnverifiedNotice, out: &mut Vec<Action>) {
        let UnverifiedNotice {
            topic,
            kind,
            digest,
            error,
            claimed,
        } = n;
        let digest = hex::encode(digest);
        if self.ledger.unverified_seen.contains(&digest) {
            tracing::debug!(%topic, "unverified notice already reported; ignored");
            return;
        }
        // Entries from the future (the clock went back) are dropped, not kept for ever.
        self.unverified_reports
            .retain(|_, at| *at <= now_ms && now_ms - *at < UNVERIFIED_WINDOW_MS);
        if self.unverified_reports.contains_key(&topic)
            || self.unverified_reports.len() >= UNVERIFIED_PER_WINDOW
        {
            tracing::warn!(%topic, "unverified notice not reported (rate limit): {error}");
            return;
        }
        self.unverified_reports.insert(topic.clone(), now_ms);
        self.ledger.unverified_seen.push_back(digest);
        while self.ledger.unverified_seen.len() > UNVERIFIED_SEEN_MAX {
            self.ledger.unverified_seen.pop_front();
        }
        let mut detail = format!("unverified notice on {topic}");
        if let Some(r) = claimed {
            detail.push_str(&format!("; it claims release {r} (unverified)"));
        }
        out.push(Action::Report(StatusReport {
            kind,
            release: None,
            version: String::new(),
            phase: Phase::Rejected,
            progress: None,
            attempt: 1,
            error: Some(error),
            detail: Some(detail),
        }));
        out.push(Action::Persist);
    }

    fn is_current(&self, kind: &Kind, release: &ReleaseId) -> bool {
        self.ledger
            .kinds
            .get(kind)
            .and_then(|r| r.job.as_ref())
            .is_some_and(|j| &j.notice.release == release)
    }

    fn check_notice(&self, n: &ReleaseNotice, rec: &KindRecord) -> Result<(), String> {
        if !n.addresses(&self.me, &self.groups) {
            let why = match &n.target {
                Target::Machine(_) => "another machine",
                Target::Group(_) => "a group this machine is not in",
            };
            return Err(format!("notice addresses {}, {why}", n.target));
        }
        validate_version(&n.version)?;
        n.policy.validate().map_err(|e| e.to_string())?;
        Layout::new(n.artifact.size, n.artifact.chunk_size)
            .map_err(|e| format!("invalid artifact layout: {e}"))?;
        if let Some(installed) = &rec.installed {
            if !n.rollback && compare_versions(&n.version, &installed.version) == Ordering::Less {
                return Err(format!(
                    "downgrade from {} to {} refused (not a rollback)",
                    installed.version, n.version
                ));
            }
        }
        Ok(())
    }

    fn on_notice(&mut self, now_ms: u64, n: ReleaseNotice, out: &mut Vec<Action>) {
        let rec = self.ledger.kinds.entry(n.kind.clone()).or_default();
        if n.seq <= rec.accepted_seq {
            tracing::debug!(kind = %n.kind, release = %n.release, seq = n.seq, accepted = rec.accepted_seq,
                "notice not newer than the accepted one; ignored");
            return;
        }
        if n.seq == rec.rejected_seq {
            tracing::debug!(kind = %n.kind, release = %n.release, seq = n.seq,
                "notice already rejected; ignored");
            return;
        }
        let rec = rec.clone();
        if let Err(why) = self.check_notice(&n, &rec) {
            tracing::warn!(kind = %n.kind, release = %n.release, "notice rejected: {why}");
            let mut report = StatusReport::new(&n, Phase::Rejected).error(why);
            // The platform refuses an event whose version breaks the protocol's rules
            // (protocol.md §3.1): sent as it came, the refusal itself was never recorded.
            if validate_version(&n.version).is_err() {
                report.version = String::new();
            }
            out.push(Action::Report(report));
            if let Some(rec) = self.ledger.kinds.get_mut(&n.kind) {
                rec.rejected_seq = n.seq;
            }
            out.push(Action::Persist);
            return;
        }
        let rec = self.ledger.kinds.get_mut(&n.kind).expect("entry exists");
        rec.accepted_seq = n.seq;
        rec.queued = None;
        match rec.job.as_ref().map(|j| (j.step, j.notice.release.clone())) {
            Some((Step::Installing, _)) => {
                // An install cannot be interrupted: run this one right after it. Even a notice
                // for what is installed now must wait: the running install is about to replace
                // it (a rollback to the current version while a newer one installs).
                out.push(Action::Report(
                    StatusReport::new(&n, Phase::Notified)
                        .detail("queued behind a running install"),
                ));
                rec.queued = Some(n);
                out.push(Action::Persist);
                out.push(Action::PublishState);
                return;
            }
            Some((_, old)) => {
                out.push(Action::CancelDownload {
                    kind: n.kind.clone(),
                    release: old,
                });
                rec.job = None;
            }
            None => {}
        }
        self.begin(now_ms, n, out);
        out.push(Action::Persist);
        out.push(Action::PublishState);
    }

    /// Acts on an accepted notice for a kind with no job: done already, or a new job.
    fn begin(&mut self, now_ms: u64, n: ReleaseNotice, out: &mut Vec<Action>) {
        let already = self.ledger.kinds.get(&n.kind).is_some_and(|rec| {
            rec.installed
                .as_ref()
                .is_some_and(|i| i.version == n.version && i.artifact == Some(n.artifact.id))
        });
        if already {
            out.push(Action::Report(
                StatusReport::new(&n, Phase::Installed).detail("already installed"),
            ));
        } else {
            self.start_job(now_ms, n, out);
        }
    }

    fn start_job(&mut self, now_ms: u64, n: ReleaseNotice, out: &mut Vec<Action>) {
        let rec = self.ledger.kinds.entry(n.kind.clone()).or_default();
        out.push(Action::Report(StatusReport::new(&n, Phase::Notified)));
        let in_previous = n.rollback
            && rec
                .previous
                .as_ref()
                .is_some_and(|p| p.artifact == Some(n.artifact.id) && p.version == n.version);
        if in_previous {
            rec.job = Some(Job {
                notice: n,
                step: Step::Deferred,
                activated: false,
                from_previous: true,
            });
            let kind = rec.job.as_ref().expect("just set").notice.kind.clone();
            self.after_download(now_ms, &kind, Some("rollback slot holds this version"), out);
        } else {
            out.push(Action::StartDownload {
                kind: n.kind.clone(),
                notice: n.clone(),
            });
            rec.job = Some(Job {
                notice: n,
                step: Step::Downloading,
                activated: false,
                from_previous: false,
            });
        }
    }

    /// The artifact is on disk (or in the rollback slot): install now or wait for the policy.
    fn after_download(
        &mut self,
        now_ms: u64,
        kind: &Kind,
        note: Option<&str>,
        out: &mut Vec<Action>,
    ) {
        let Some(job) = self.ledger.kinds.get_mut(kind).and_then(|r| r.job.as_mut()) else {
            return;
        };
        let mut downloaded = StatusReport::new(&job.notice, Phase::Downloaded);
        downloaded.detail = note.map(str::to_owned);
        out.push(Action::Report(downloaded));
        job.step = Step::Deferred;
        if self.may_install(now_ms, kind) {
            self.start_install(kind, out);
        } else if let Some(job) = self.job(kind) {
            let detail = match &job.notice.policy {
                InstallPolicy::Window { start, end, .. } => {
                    format!("waiting for window {start}-{end}")
                }
                InstallPolicy::Idle => "waiting for idle".to_owned(),
                InstallPolicy::DownloadOnly => "waiting for activate".to_owned(),
                InstallPolicy::Immediate => "waiting".to_owned(),
            };
            out.push(Action::Report(
                StatusReport::new(&job.notice, Phase::Deferred).detail(detail),
            ));
        }
    }

    fn job(&self, kind: &Kind) -> Option<&Job> {
        self.ledger.kinds.get(kind).and_then(|r| r.job.as_ref())
    }

    fn may_install(&self, now_ms: u64, kind: &Kind) -> bool {
        self.job(kind).is_some_and(|j| {
            j.activated
                || j.notice
                    .policy
                    .allows_install_now(now_ms, self.utc_offset_minutes, self.busy)
        })
    }

    fn start_install(&mut self, kind: &Kind, out: &mut Vec<Action>) {
        let Some(job) = self.ledger.kinds.get_mut(kind).and_then(|r| r.job.as_mut()) else {
            return;
        };
        job.step = Step::Installing;
        out.push(Action::Report(StatusReport::new(
            &job.notice,
            Phase::Installing,
        )));
        out.push(Action::StartInstall {
            kind: kind.clone(),
            notice: job.notice.clone(),
            from_previous: job.from_previous,
        });
        out.push(Action::Persist);
        out.push(Action::PublishState);
    }

    fn check_deferred(&mut self, now_ms: u64, out: &mut Vec<Action>) {
        let waiting: Vec<Kind> = self
            .ledger
            .kinds
            .iter()
            .filter(|(_, r)| r.job.as_ref().is_some_and(|j| j.step == Step::Deferred))
            .map(|(k, _)| k.clone())
            .collect();
        for kind in waiting {
            if self.may_install(now_ms, &kind) {
                self.start_install(&kind, out);
            }
        }
    }

    fn resume(&mut self, out: &mut Vec<Action>) {
        for (kind, rec) in &self.ledger.kinds {
            let Some(job) = &rec.job else { continue };
            match job.step {
                Step::Downloading => out.push(Action::StartDownload {
                    kind: kind.clone(),
                    notice: job.notice.clone(),
                }),
                // Installers are idempotent: re-run the interrupted install.
                Step::Installing => out.push(Action::StartInstall {
                    kind: kind.clone(),
                    notice: job.notice.clone(),
                    from_previous: job.from_previous,
                }),
                Step::Deferred => {}
            }
        }
        out.push(Action::PublishState);
    }

    fn on_command(&mut self, now_ms: u64, cmd: Command, out: &mut Vec<Action>) {
        if cmd.machine != self.me {
            tracing::warn!(machine = %cmd.machine, "command for another machine refused");
            return;
        }
        if cmd.seq <= self.ledger.last_command_seq {
            tracing::warn!(
                seq = cmd.seq,
                last = self.ledger.last_command_seq,
                "stale or replayed command refused"
            );
            return;
        }
        self.ledger.last_command_seq = cmd.seq;
        out.push(Action::Persist);
        match cmd.action {
            CommandAction::Report => {
                out.push(Action::PublishState);
                for rec in self.ledger.kinds.values() {
                    if let Some(last) = &rec.last {
                        out.push(Action::Report(last.clone()));
                    }
                }
            }
            CommandAction::Groups { groups } => {
                let joined: Vec<GroupId> = groups
                    .iter()
                    .filter(|g| !self.groups.contains(g))
                    .cloned()
                    .collect();
                let left: Vec<GroupId> = self
                    .groups
                    .iter()
                    .filter(|g| !groups.contains(g))
                    .cloned()
                    .collect();
                tracing::info!(machine = %self.me, groups = ?groups, joined = joined.len(), left = left.len(),
                    "the platform names this machine's groups");
                self.ledger.groups = Some(groups.clone());
                self.groups = groups;
                if !joined.is_empty() || !left.is_empty() {
                    out.push(Action::FollowGroups { joined, left });
                    out.push(Action::PublishState);
                }
            }
            CommandAction::Activate { release } => {
                let Some(kind) = self.kind_of_job(&release) else {
                    tracing::warn!(%release, "activate for a release with no job here; ignored");
                    return;
                };
                let step = self.job(&kind).map(|j| j.step);
                match step {
                    Some(Step::Deferred) => {
                        if let Some(j) = self
                            .ledger
                            .kinds
                            .get_mut(&kind)
                            .and_then(|r| r.job.as_mut())
                        {
                            j.activated = true;
                        }
                        self.start_install(&kind, out);
                    }
                    Some(Step::Downloading) => {
                        if let Some(j) = self
                            .ledger
                            .kinds
                            .get_mut(&kind)
                            .and_then(|r| r.job.as_mut())
                        {
                            j.activated = true;
                        }
                    }
                    Some(Step::Installing) | None => {
                        tracing::info!(%release, "activate: already installing");
                    }
                }
            }
            CommandAction::Cancel { release } => {
                let Some(kind) = self.kind_of_job(&release) else {
                    if let Some(rec) = self
                        .ledger
                        .kinds
                        .values_mut()
                        .find(|r| r.queued.as_ref().is_some_and(|q| q.release == release))
                    {
                        let q = rec.queued.take().expect("found");
                        out.push(Action::Report(StatusReport::new(&q, Phase::Cancelled)));
                        out.push(Action::PublishState);
                    } else {
                        tracing::warn!(%release, "cancel for a release with no job here; ignored");
                    }
                    return;
                };
                let rec = self.ledger.kinds.get_mut(&kind).expect("kind of a job");
                let job = rec.job.as_ref().expect("kind of a job");
                match job.step {
                    Step::Installing => {
                        tracing::warn!(%release, "cancel refused: the install is already running");
                    }
                    Step::Downloading | Step::Deferred => {
                        if job.step == Step::Downloading {
                            out.push(Action::CancelDownload {
                                kind: kind.clone(),
                                release: release.clone(),
                            });
                        }
                        out.push(Action::Report(StatusReport::new(
                            &job.notice,
                            Phase::Cancelled,
                        )));
                        rec.job = None;
                        out.push(Action::PublishState);
                    }
                }
            }
        }
        let _ = now_ms;
    }

    fn kind_of_job(&self, release: &ReleaseId) -> Option<Kind> {
        self.ledger
            .kinds
            .iter()
            .find(|(_, r)| r.job.as_ref().is_some_and(|j| &j.notice.release == release))
            .map(|(k, _)| k.clone())
    }

    /// Download and install results for the current job of a kind: `match (step, event)`.
    fn on_job_event(&mut self, now_ms: u64, input: Input, out: &mut Vec<Action>) {
        let kind = match &input {
            Input::DownloadProgress { kind, .. }
            | Input::DownloadFinished { kind, .. }
            | Input::DownloadFailed { kind, .. }
            | Input::InstallFinished { kind, .. } => kind.clone(),
            other => {
                tracing::error!(?other, "not a job event");
                return;
            }
        };
        let Some(rec) = self.ledger.kinds.get_mut(&kind) else {
            return;
        };
        let Some(job) = rec.job.as_mut() else { return };
        match (job.step, input) {
            (
                Step::Downloading,
                Input::DownloadProgress {
                    progress, attempt, ..
                },
            ) => {
                let mut r = StatusReport::new(&job.notice, Phase::Downloading);
                r.progress = Some(progress);
                r.attempt = attempt;
                out.push(Action::Report(r));
            }
            (Step::Downloading, Input::DownloadFinished { .. }) => {
                self.after_download(now_ms, &kind, None, out);
                out.push(Action::Persist);
                out.push(Action::PublishState);
            }
            (
                Step::Downloading,
                Input::DownloadFailed {
                    error, attempts, ..
                },
            ) => {
                let mut r = StatusReport::new(&job.notice, Phase::DownloadFailed).error(error);
                r.attempt = attempts;
                out.push(Action::Report(r));
                rec.job = None;
                out.push(Action::Persist);
                out.push(Action::PublishState);
            }
            (Step::Installing, Input::InstallFinished { outcome, .. }) => {
                let notice = job.notice.clone();
                let new = Installed {
                    version: notice.version.clone(),
                    artifact: Some(notice.artifact.id),
                };
                match outcome {
                    InstallOutcome::Installed => {
                        rec.previous = rec.installed.replace(new);
                        out.push(Action::Report(StatusReport::new(&notice, Phase::Installed)));
                    }
                    InstallOutcome::Failed(e) => {
                        out.push(Action::Report(
                            StatusReport::new(&notice, Phase::InstallFailed).error(e),
                        ));
                    }
                    InstallOutcome::RolledBack(e) => {
                        // The inactive slot now holds the version that failed its health check.
                        rec.previous = Some(new);
                        out.push(Action::Report(
                            StatusReport::new(&notice, Phase::RolledBack).error(e),
                        ));
                    }
                }
                rec.job = None;
                if let Some(next) = rec.queued.take() {
                    self.begin(now_ms, next, out);
                }
                out.push(Action::Persist);
                out.push(Action::PublishState);
            }
            (step, event) => {
                tracing::warn!(%kind, ?step, ?event, "event not allowed in this step; ignored");
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use fleetcast_proto::release::ArtifactRef;

    const NOON: u64 = 12 * 3600 * 1000;

    fn me() -> MachineId {
        MachineId::new("vm-001").unwrap()
    }
    fn app() -> Kind {
        Kind::new("app").unwrap()
    }
    fn group() -> GroupId {
        GroupId::new("g").unwrap()
    }

    fn notice(release: &str, seq: u64, version: &str) -> ReleaseNotice {
        ReleaseNotice {
            release: ReleaseId::new(release).unwrap(),
            seq,
            target: Target::Machine(me()),
            kind: app(),
            version: version.into(),
            artifact: ArtifactRef {
                id: ArtifactId::of(version.as_bytes()),
                size: 100_000,
                chunk_size: 65536,
                name: "app.bin".into(),
            },
            policy: InstallPolicy::Immediate,
            rollback: false,
            issued_at_ms: 0,
        }
    }

    fn updater() -> Updater {
        let initial = BTreeMap::from([(app(), "1.0.0".to_owned())]);
        Updater::new(me(), vec![group()], 0, Ledger::default(), &initial)
    }

    fn phases(actions: &[Action]) -> Vec<Phase> {
        actions
            .iter()
            .filter_map(|a| match a {
                Action::Report(r) => Some(r.phase),
                _ => None,
            })
            .collect()
    }

    fn rid(s: &str) -> ReleaseId {
        ReleaseId::new(s).unwrap()
    }

    fn finish_install(u: &mut Updater, release: &str, outcome: InstallOutcome) -> Vec<Action> {
        u.handle(
            NOON,
            Input::InstallFinished {
                kind: app(),
                release: rid(release),
                outcome,
            },
        )
    }

    fn finish_download(u: &mut Updater, release: &str) -> Vec<Action> {
        u.handle(
            NOON,
            Input::DownloadFinished {
                kind: app(),
                release: rid(release),
            },
        )
    }

    fn installed(u: &Updater) -> String {
        u.ledger.kinds[&app()]
            .installed
            .as_ref()
            .unwrap()
            .version
            .clone()
    }

    #[test]
    fn an_immediate_notice_downloads_then_installs() {
        let mut u = updater();
        let a = u.handle(NOON, Input::Notice(notice("r-1", 1, "1.1.0")));
        assert_eq!(phases(&a), vec![Phase::Notified]);
        assert!(a.iter().any(|a| matches!(a, Action::StartDownload { .. })));
        assert!(a.contains(&Action::Persist));
        let a = finish_download(&mut u, "r-1");
        assert_eq!(phases(&a), vec![Phase::Downloaded, Phase::Installing]);
        assert!(a.iter().any(|a| matches!(
            a,
            Action::StartInstall {
                from_previous: false,
                ..
            }
        )));
        let a = finish_install(&mut u, "r-1", InstallOutcome::Installed);
        assert_eq!(phases(&a), vec![Phase::Installed]);
        assert_eq!(installed(&u), "1.1.0");
        assert_eq!(
            u.ledger.kinds[&app()].previous.as_ref().unwrap().version,
            "1.0.0"
        );
        assert_eq!(u.kind_states()[&app()].phase, Some(Phase::Installed));
    }

    #[test]
    fn a_notice_not_newer_than_the_accepted_seq_is_ignored() {
        let mut u = updater();
        u.handle(NOON, Input::Notice(notice("r-2", 5, "1.2.0")));
        assert!(u
            .handle(NOON, Input::Notice(notice("r-2", 5, "1.2.0")))
            .is_empty());
        assert!(u
            .handle(NOON, Input::Notice(notice("r-1", 4, "1.3.0")))
            .is_empty());
        assert_eq!(u.ledger.kinds[&app()].accepted_seq, 5);
    }

    #[test]
    fn a_newer_machine_notice_beats_an_older_group_notice_whichever_arrives_first() {
        let mut group_notice = notice("r-g", 3, "1.1.0");
        group_notice.target = Target::Group(group());
        let machine_notice = notice("r-m", 4, "1.0.5");
        let mut u = updater();
        u.handle(NOON, Input::Notice(machine_notice.clone()));
        assert!(
            u.handle(NOON, Input::Notice(group_notice.clone()))
                .is_empty(),
            "older group notice ignored"
        );
        let mut u = updater();
        u.handle(NOON, Input::Notice(group_notice));
        let a = u.handle(NOON, Input::Notice(machine_notice));
        assert!(a.contains(&Action::CancelDownload {
            kind: app(),
            release: rid("r-g")
        }));
        assert_eq!(
            u.ledger.kinds[&app()].job.as_ref().unwrap().notice.release,
            rid("r-m")
        );
    }

    #[test]
    fn a_notice_for_another_machine_or_group_is_rejected() {
        let mut u = updater();
        let mut n = notice("r-1", 1, "2.0");
        n.target = Target::Machine(MachineId::new("vm-002").unwrap());
        assert_eq!(
            phases(&u.handle(NOON, Input::Notice(n.clone()))),
            vec![Phase::Rejected]
        );
        n.target = Target::Group(GroupId::new("other").unwrap());
        n.seq = 2; // every notice the platform signs has its own seq
        assert_eq!(
            phases(&u.handle(NOON, Input::Notice(n))),
            vec![Phase::Rejected]
        );
        assert_eq!(u.ledger.kinds[&app()].accepted_seq, 0);
    }

    #[test]
    fn a_downgrade_is_rejected_but_a_rollback_may_go_down() {
        let mut u = updater();
        let a = u.handle(NOON, Input::Notice(notice("r-1", 1, "0.9.0")));
        assert_eq!(phases(&a), vec![Phase::Rejected]);
        let Action::Report(r) = &a[0] else { panic!() };
        assert!(r.error.as_deref().unwrap().contains("downgrade"), "{r:?}");
        let mut n = notice("r-2", 2, "0.9.0");
        n.rollback = true;
        assert_eq!(
            phases(&u.handle(NOON, Input::Notice(n))),
            vec![Phase::Notified]
        );
    }

    #[test]
    fn a_rejected_notice_delivered_again_is_not_reported_again() {
        let mut u = updater();
        let downgrade = notice("r-1", 1, "0.9.0");
        let a = u.handle(NOON, Input::Notice(downgrade.clone()));
        assert_eq!(phases(&a), vec![Phase::Rejected]);
        let ledger = u.ledger.clone();
        assert!(u.handle(NOON, Input::Notice(downgrade.clone())).is_empty());
        // Also after a restart (the retained notice comes back after every reconnect).
        let mut restarted = Updater::new(me(), vec![group()], 0, ledger, &BTreeMap::new());
        assert!(restarted.handle(NOON, Input::Notice(downgrade)).is_empty());
        // A newer notice is judged on its own.
        assert_eq!(
            phases(&restarted.handle(NOON, Input::Notice(notice("r-2", 2, "1.1.0")))),
            vec![Phase::Notified]
        );
    }

    fn unverified(topic: &str, payload: &[u8], claimed: Option<&str>) -> Input {
        Input::Unverified(UnverifiedNotice {
            topic: topic.into(),
            kind: app(),
            digest: *blake3::hash(payload).as_bytes(),
            error: "notice refused: bad signature".into(),
            claimed: claimed.map(rid),
        })
    }

    fn reports(actions: &[Action]) -> Vec<&StatusReport> {
        actions
            .iter()
            .filter_map(|a| match a {
                Action::Report(r) => Some(r),
                _ => None,
            })
            .collect()
    }

    const TOPIC: &str = "fleet/machines/vm-001/release/app";

    #[test]
    fn an_unverified_notice_is_rejected_without_the_release_it_claims() {
        let mut u = updater();
        let a = u.handle(NOON, unverified(TOPIC, b"forged", Some("r-1")));
        let r = reports(&a);
        assert_eq!(r.len(), 1, "{a:?}");
        assert_eq!(r[0].phase, Phase::Rejected);
        assert_eq!(r[0].release, None);
        assert_eq!(r[0].kind, app());
        assert_eq!(r[0].version, "");
        assert!(r[0].error.as_deref().unwrap().contains("signature"));
        let detail = r[0].detail.as_deref().unwrap();
        assert!(
            detail.contains(TOPIC) && detail.contains("r-1 (unverified)"),
            "{detail}"
        );
        assert!(
            a.contains(&Action::Persist),
            "the digest is remembered on disk"
        );
        assert_eq!(u.ledger.kinds[&app()].rejected_seq, 0);
        assert_eq!(u.ledger.kinds[&app()].last, None);
    }

    #[test]
    fn an_unverified_notice_does_not_suppress_a_genuine_one_with_the_same_seq() {
        let mut u = updater();
        u.handle(NOON, unverified(TOPIC, b"forged r-1 seq 1", Some("r-1")));
        let a = u.handle(NOON, Input::Notice(notice("r-1", 1, "1.1.0")));
        assert_eq!(phases(&a), vec![Phase::Notified]);
    }

    #[test]
    fn the_same_unverified_bytes_are_reported_once_even_after_a_restart() {
        let mut u = updater();
        assert_eq!(
            phases(&u.handle(NOON, unverified(TOPIC, b"x", None))).len(),
            1
        );
        let later = NOON + 10 * UNVERIFIED_WINDOW_MS;
        assert!(u.handle(later, unverified(TOPIC, b"x", None)).is_empty());
        let mut restarted =
            Updater::new(me(), vec![group()], 0, u.ledger.clone(), &BTreeMap::new());
        assert!(restarted
            .handle(later, unverified(TOPIC, b"x", None))
            .is_empty());
        assert_eq!(
            phases(&restarted.handle(later, unverified(TOPIC, b"y", None))),
            vec![Phase::Rejected],
            "other bytes are judged on their own"
        );
    }

    #[test]
    fn unverified_notices_are_reported_once_per_topic_and_a_few_in_all_per_window() {
        let mut u = updater();
        let flood = |u: &mut Updater, now: u64, topics: usize, per_topic: usize| -> usize {
            let mut n = 0;
            for t in 0..topics {
                for i in 0..per_topic {
                    let payload = format!("junk {now} {t} {i}");
                    let topic = format!("fleet/groups/g/release/k{t}");
                    n += phases(&u.handle(now, unverified(&topic, payload.as_bytes(), None))).len();
                }
            }
            n
        };
        assert_eq!(flood(&mut u, NOON, 1, 50), 1, "one per topic per window");
        assert_eq!(
            flood(&mut u, NOON + 1000, 50, 2),
            UNVERIFIED_PER_WINDOW - 1,
            "a few per window over all topics"
        );
        let next = NOON + UNVERIFIED_WINDOW_MS + 1000;
        assert_eq!(flood(&mut u, next, 50, 2), UNVERIFIED_PER_WINDOW);
        assert!(u.ledger.unverified_seen.len() <= UNVERIFIED_SEEN_MAX);
        // A clock that jumps back does not silence reports until it catches up.
        assert_eq!(flood(&mut u, NOON - 3_600_000, 1, 1), 1);
    }

    #[test]
    fn the_remembered_digests_are_bounded() {
        let mut u = updater();
        for i in 0..(3 * UNVERIFIED_SEEN_MAX as u64) {
            let now = NOON + i * UNVERIFIED_WINDOW_MS;
            u.handle(now, unverified(TOPIC, &i.to_be_bytes(), None));
        }
        assert_eq!(u.ledger.unverified_seen.len(), UNVERIFIED_SEEN_MAX);
    }

    #[test]
    fn an_invalid_artifact_layout_is_rejected() {
        let mut u = updater();
        let mut n = notice("r-1", 1, "2.0");
        n.artifact.chunk_size = 1000;
        assert_eq!(
            phases(&u.handle(NOON, Input::Notice(n))),
            vec![Phase::Rejected]
        );
    }

    /// A verified notice whose version breaks §1 is reported `rejected` with `version: ""`
    /// (protocol.md §3.1): the platform refuses an event with such a version, so the report of
    /// the refusal itself was never recorded. Its release and kind are kept.
    #[test]
    fn a_notice_with_a_bad_version_is_rejected_with_the_version_left_out() {
        let mut u = updater();
        let a = u.handle(NOON, Input::Notice(notice("r-1", 1, "2.0 beta")));
        assert_eq!(phases(&a), vec![Phase::Rejected]);
        let Action::Report(r) = &a[0] else { panic!() };
        assert_eq!(
            (r.version.as_str(), r.release.is_some()),
            ("", true),
            "{r:?}"
        );
        // A downgrade's version is a valid one: reported as it is.
        let a = u.handle(NOON, Input::Notice(notice("r-2", 2, "0.9.0")));
        let Action::Report(r) = &a[0] else { panic!() };
        assert_eq!(r.version, "0.9.0");
    }

    #[test]
    fn a_notice_for_what_is_already_installed_reports_installed_at_once() {
        let mut u = updater();
        u.handle(NOON, Input::Notice(notice("r-1", 1, "1.1.0")));
        finish_download(&mut u, "r-1");
        finish_install(&mut u, "r-1", InstallOutcome::Installed);
        let a = u.handle(NOON, Input::Notice(notice("r-1b", 2, "1.1.0")));
        assert_eq!(phases(&a), vec![Phase::Installed]);
        assert!(u.ledger.kinds[&app()].job.is_none());
    }

    #[test]
    fn a_rollback_to_the_previous_slot_switches_back_without_downloading() {
        let mut u = updater();
        u.handle(NOON, Input::Notice(notice("r-1", 1, "1.1.0")));
        finish_download(&mut u, "r-1");
        finish_install(&mut u, "r-1", InstallOutcome::Installed);
        u.handle(NOON, Input::Notice(notice("r-2", 2, "1.2.0")));
        finish_download(&mut u, "r-2");
        finish_install(&mut u, "r-2", InstallOutcome::Installed);
        let mut back = notice("r-3", 3, "1.1.0");
        back.rollback = true;
        let a = u.handle(NOON, Input::Notice(back));
        assert_eq!(
            phases(&a),
            vec![Phase::Notified, Phase::Downloaded, Phase::Installing]
        );
        assert!(!a.iter().any(|a| matches!(a, Action::StartDownload { .. })));
        assert!(a.iter().any(|a| matches!(
            a,
            Action::StartInstall {
                from_previous: true,
                ..
            }
        )));
        finish_install(&mut u, "r-3", InstallOutcome::Installed);
        assert_eq!(installed(&u), "1.1.0");
    }

    #[test]
    fn a_window_policy_defers_until_the_window_opens() {
        let mut u = updater();
        let mut n = notice("r-1", 1, "1.1.0");
        n.policy = "window:02:00-04:00".parse().unwrap();
        u.handle(NOON, Input::Notice(n));
        let a = finish_download(&mut u, "r-1");
        assert_eq!(phases(&a), vec![Phase::Downloaded, Phase::Deferred]);
        let Action::Report(r) = &a[1] else { panic!() };
        assert_eq!(r.detail.as_deref(), Some("waiting for window 02:00-04:00"));
        assert!(u.handle(NOON + 1000, Input::Tick).is_empty());
        let a = u.handle(3 * 3600 * 1000, Input::Tick);
        assert_eq!(phases(&a), vec![Phase::Installing]);
    }

    #[test]
    fn an_idle_policy_waits_until_the_machine_is_not_busy() {
        let mut u = updater();
        u.handle(NOON, Input::Busy(true));
        let mut n = notice("r-1", 1, "1.1.0");
        n.policy = InstallPolicy::Idle;
        u.handle(NOON, Input::Notice(n));
        let a = finish_download(&mut u, "r-1");
        assert_eq!(phases(&a), vec![Phase::Downloaded, Phase::Deferred]);
        assert!(u.handle(NOON, Input::Tick).is_empty());
        let a = u.handle(NOON, Input::Busy(false));
        assert_eq!(phases(&a), vec![Phase::Installing]);
    }

    fn cmd(seq: u64, action: CommandAction) -> Input {
        Input::Command(Command {
            machine: me(),
            seq,
            issued_at_ms: 0,
            action,
        })
    }

    #[test]
    fn a_download_only_release_installs_only_after_activate() {
        let mut u = updater();
        let mut n = notice("r-1", 1, "1.1.0");
        n.policy = InstallPolicy::DownloadOnly;
        u.handle(NOON, Input::Notice(n));
        let a = finish_download(&mut u, "r-1");
        assert_eq!(phases(&a), vec![Phase::Downloaded, Phase::Deferred]);
        assert!(u.handle(NOON, Input::Tick).is_empty());
        let a = u.handle(
            NOON,
            cmd(
                5,
                CommandAction::Activate {
                    release: rid("r-1"),
                },
            ),
        );
        assert_eq!(phases(&a), vec![Phase::Installing]);
    }

    #[test]
    fn activate_during_download_installs_right_after_it() {
        let mut u = updater();
        let mut n = notice("r-1", 1, "1.1.0");
        n.policy = InstallPolicy::DownloadOnly;
        u.handle(NOON, Input::Notice(n));
        u.handle(
            NOON,
            cmd(
                5,
                CommandAction::Activate {
                    release: rid("r-1"),
                },
            ),
        );
        assert_eq!(
            phases(&finish_download(&mut u, "r-1")),
            vec![Phase::Downloaded, Phase::Installing]
        );
    }

    #[test]
    fn cancel_stops_a_job_before_installing_but_not_during() {
        let mut u = updater();
        u.handle(NOON, Input::Notice(notice("r-1", 1, "1.1.0")));
        let a = u.handle(
            NOON,
            cmd(
                2,
                CommandAction::Cancel {
                    release: rid("r-1"),
                },
            ),
        );
        assert_eq!(phases(&a), vec![Phase::Cancelled]);
        assert!(a.contains(&Action::CancelDownload {
            kind: app(),
            release: rid("r-1")
        }));
        assert!(u.ledger.kinds[&app()].job.is_none());
        u.handle(NOON, Input::Notice(notice("r-2", 3, "1.2.0")));
        finish_download(&mut u, "r-2");
        let a = u.handle(
            NOON,
            cmd(
                4,
                CommandAction::Cancel {
                    release: rid("r-2"),
                },
            ),
        );
        assert!(phases(&a).is_empty(), "an install cannot be cancelled");
    }

    #[test]
    fn a_groups_command_changes_the_groups_followed_and_outlives_a_restart() {
        let mut u = updater();
        let beijing = GroupId::new("beijing").unwrap();
        let a = u.handle(
            NOON,
            cmd(
                5,
                CommandAction::Groups {
                    groups: vec![beijing.clone()],
                },
            ),
        );
        assert!(a.contains(&Action::FollowGroups {
            joined: vec![beijing.clone()],
            left: vec![group()],
        }));
        assert!(a.contains(&Action::Persist) && a.contains(&Action::PublishState));
        assert_eq!(u.groups(), std::slice::from_ref(&beijing));
        let mut left = notice("r-1", 1, "1.1.0");
        left.target = Target::Group(group());
        assert_eq!(
            phases(&u.handle(NOON, Input::Notice(left))),
            vec![Phase::Rejected],
            "a notice of the group left is no longer for this machine"
        );
        let mut joined = notice("r-2", 2, "1.2.0");
        joined.target = Target::Group(beijing.clone());
        assert_eq!(
            phases(&u.handle(NOON, Input::Notice(joined)))[0],
            Phase::Notified
        );

        // Restarted with the config's groups: the platform's stay.
        let initial = BTreeMap::from([(app(), "1.0.0".to_owned())]);
        let mut again = Updater::new(me(), vec![group()], 0, u.ledger.clone(), &initial);
        assert_eq!(again.groups(), std::slice::from_ref(&beijing));
        // A replay of the command, or an older one naming the old group, changes nothing.
        let old = CommandAction::Groups {
            groups: vec![group()],
        };
        assert!(again.handle(NOON, cmd(5, old.clone())).is_empty());
        assert!(again.handle(NOON, cmd(4, old)).is_empty());
        assert_eq!(again.groups(), std::slice::from_ref(&beijing));
        // The same groups again: recorded, nothing to follow.
        let a = again.handle(
            NOON,
            cmd(
                6,
                CommandAction::Groups {
                    groups: vec![beijing],
                },
            ),
        );
        assert!(!a.iter().any(|a| matches!(a, Action::FollowGroups { .. })));
        // No group at all is a list too.
        let a = again.handle(NOON, cmd(7, CommandAction::Groups { groups: vec![] }));
        assert!(a
            .iter()
            .any(|a| matches!(a, Action::FollowGroups { joined, .. } if joined.is_empty())));
        assert!(again.groups().is_empty());
    }

    #[test]
    fn stale_or_foreign_commands_are_refused() {
        let mut u = updater();
        assert!(!u.handle(NOON, cmd(5, CommandAction::Report)).is_empty());
        assert!(u.handle(NOON, cmd(5, CommandAction::Report)).is_empty());
        assert!(u.handle(NOON, cmd(4, CommandAction::Report)).is_empty());
        let foreign = Input::Command(Command {
            machine: MachineId::new("vm-002").unwrap(),
            seq: 9,
            issued_at_ms: 0,
            action: CommandAction::Report,
        });
        assert!(u.handle(NOON, foreign).is_empty());
    }

    #[test]
    fn a_failed_health_check_keeps_the_old_version() {
        let mut u = updater();
        u.handle(NOON, Input::Notice(notice("r-1", 1, "1.1.0")));
        finish_download(&mut u, "r-1");
        let a = finish_install(
            &mut u,
            "r-1",
            InstallOutcome::RolledBack("health check failed".into()),
        );
        assert_eq!(phases(&a), vec![Phase::RolledBack]);
        assert_eq!(installed(&u), "1.0.0");
        assert!(u
            .handle(NOON, Input::Notice(notice("r-1", 1, "1.1.0")))
            .is_empty());
    }

    #[test]
    fn the_last_failure_is_kept_for_the_technician_until_the_next_one() {
        let mut u = updater();
        assert_eq!(u.ledger.last_error, None);
        u.handle(NOON, Input::Notice(notice("r-1", 1, "1.1.0")));
        finish_download(&mut u, "r-1");
        let a = finish_install(
            &mut u,
            "r-1",
            InstallOutcome::RolledBack("unhealthy".into()),
        );
        assert!(a.contains(&Action::Persist));
        let e = u.ledger.last_error.clone().unwrap();
        assert_eq!(
            (
                e.at_ms,
                e.phase,
                e.release,
                e.version.as_str(),
                e.error.as_str()
            ),
            (
                NOON,
                Phase::RolledBack,
                Some(rid("r-1")),
                "1.1.0",
                "unhealthy"
            )
        );
        // A success does not clear it; the next failure replaces it.
        u.handle(NOON + 1, Input::Notice(notice("r-2", 2, "1.2.0")));
        finish_download(&mut u, "r-2");
        finish_install(&mut u, "r-2", InstallOutcome::Installed);
        assert_eq!(
            u.ledger.last_error.as_ref().unwrap().phase,
            Phase::RolledBack
        );
        u.handle(NOON + 2, Input::Notice(notice("r-3", 3, "1.0.0")));
        let e = u.ledger.last_error.clone().unwrap();
        assert_eq!((e.at_ms, e.phase), (NOON + 2, Phase::Rejected));
        assert!(e.error.contains("downgrade"), "{e:?}");
    }

    #[test]
    fn only_a_downloaded_idle_job_waits_for_idle() {
        let mut u = updater();
        u.handle(NOON, Input::Busy(true));
        let mut n = notice("r-1", 1, "1.1.0");
        n.policy = InstallPolicy::Idle;
        u.handle(NOON, Input::Notice(n));
        assert!(!u.waits_for_idle(), "still downloading");
        finish_download(&mut u, "r-1");
        assert!(u.waits_for_idle());
        u.handle(NOON, Input::Busy(false));
        assert!(!u.waits_for_idle(), "installing");
    }

    #[test]
    fn a_download_failure_ends_the_job() {
        let mut u = updater();
        u.handle(NOON, Input::Notice(notice("r-1", 1, "1.1.0")));
        let a = u.handle(
            NOON,
            Input::DownloadFailed {
                kind: app(),
                release: rid("r-1"),
                error: "timeout".into(),
                attempts: 3,
            },
        );
        assert_eq!(phases(&a), vec![Phase::DownloadFailed]);
        assert!(u.ledger.kinds[&app()].job.is_none());
    }

    #[test]
    fn a_restarted_machine_resumes_each_job_from_its_step() {
        let mut u = updater();
        u.handle(NOON, Input::Notice(notice("r-1", 1, "1.1.0")));
        let ledger: Ledger =
            serde_json::from_str(&serde_json::to_string(&u.ledger).unwrap()).unwrap();
        let mut restarted = Updater::new(me(), vec![group()], 0, ledger.clone(), &BTreeMap::new());
        let a = restarted.handle(NOON, Input::Resume);
        assert!(a.iter().any(|a| matches!(a, Action::StartDownload { .. })));
        finish_download(&mut restarted, "r-1");
        let mut again = Updater::new(
            me(),
            vec![group()],
            0,
            restarted.ledger.clone(),
            &BTreeMap::new(),
        );
        let a = again.handle(NOON, Input::Resume);
        assert!(
            a.iter().any(|a| matches!(a, Action::StartInstall { .. })),
            "an interrupted install re-runs"
        );
    }

    #[test]
    fn a_notice_during_an_install_is_queued_and_started_after_it() {
        let mut u = updater();
        u.handle(NOON, Input::Notice(notice("r-1", 1, "1.1.0")));
        finish_download(&mut u, "r-1");
        let a = u.handle(NOON, Input::Notice(notice("r-2", 2, "1.2.0")));
        assert!(!a.iter().any(|a| matches!(a, Action::CancelDownload { .. })));
        let a = finish_install(&mut u, "r-1", InstallOutcome::Installed);
        assert!(a.iter().any(
            |a| matches!(a, Action::StartDownload { notice, .. } if notice.release == rid("r-2"))
        ));
    }

    #[test]
    fn a_rollback_to_the_installed_version_during_an_install_switches_back_after_it() {
        let mut u = updater();
        u.handle(NOON, Input::Notice(notice("r-1", 1, "1.1.0")));
        finish_download(&mut u, "r-1");
        finish_install(&mut u, "r-1", InstallOutcome::Installed);
        u.handle(NOON, Input::Notice(notice("r-2", 2, "1.2.0")));
        finish_download(&mut u, "r-2");
        // While 1.2.0 installs, the operator rolls back to 1.1.0, which is still installed.
        let mut back = notice("r-3", 3, "1.1.0");
        back.rollback = true;
        let a = u.handle(NOON, Input::Notice(back));
        assert_eq!(phases(&a), vec![Phase::Notified], "the rollback is queued");
        let a = finish_install(&mut u, "r-2", InstallOutcome::Installed);
        assert!(
            a.iter().any(|a| matches!(
                a,
                Action::StartInstall { notice, from_previous: true, .. } if notice.release == rid("r-3")
            )),
            "{a:?}"
        );
        finish_install(&mut u, "r-3", InstallOutcome::Installed);
        assert_eq!(installed(&u), "1.1.0");
    }

    #[test]
    fn results_for_a_superseded_job_are_dropped() {
        let mut u = updater();
        u.handle(NOON, Input::Notice(notice("r-1", 1, "1.1.0")));
        u.handle(NOON, Input::Notice(notice("r-2", 2, "1.2.0")));
        assert!(finish_download(&mut u, "r-1").is_empty());
    }
}
