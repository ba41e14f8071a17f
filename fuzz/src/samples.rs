//! Real messages of every kind, as the platform, machines and CLI make them. Seeds for the
//! corpora; signed and sealed with the fixed test keys of [`crate::family`].

use std::collections::BTreeMap;

use fleetcast_proto::admin::{
    AdminOp, AdminReply, AdminRequest, AdminResponse, ArtifactInfo, MachineInfo,
    ProvisionedMachine, PublishPlan, ReleaseInfo, ReleaseStatus, RolloutProgress, StepResult,
    TargetRecord,
};
use fleetcast_proto::chunk::ChunkRequest;
use fleetcast_proto::command::{Command, CommandAction};
use fleetcast_proto::release::ArtifactRef;
use fleetcast_proto::rollout::{RolloutState, StagedProgress};
use fleetcast_proto::status::{KindState, Progress};
use fleetcast_proto::{
    ArtifactId, GroupId, InstallPolicy, Kind, MachineId, MachineState, Phase, ReleaseId,
    ReleaseNotice, StatusAck, StatusEvent, Target,
};
use serde::Serialize;

use crate::family::{platform_key, secret};

pub fn machine() -> MachineId {
    MachineId::new("vm-001").expect("valid id")
}

pub fn group() -> GroupId {
    GroupId::new("shanghai").expect("valid id")
}

pub fn kind() -> Kind {
    Kind::new("app").expect("valid id")
}

pub fn release() -> ReleaseId {
    ReleaseId::new("r-000042").expect("valid id")
}

pub fn artifact() -> ArtifactId {
    ArtifactId::of(b"fleetcast fuzz artifact")
}

pub fn json<T: Serialize>(msg: &T) -> Vec<u8> {
    serde_json::to_vec(msg).expect("samples serialize")
}

pub fn policies() -> Vec<InstallPolicy> {
    vec![
        InstallPolicy::Immediate,
        InstallPolicy::Idle,
        InstallPolicy::DownloadOnly,
        "window:02:00-04:00".parse().expect("valid policy"),
        "window:22:30-01:15@-05:30".parse().expect("valid policy"),
    ]
}

fn artifact_ref() -> ArtifactRef {
    ArtifactRef {
        id: artifact(),
        size: 5 * 65536 + 17,
        chunk_size: 65536,
        name: "app-2.4.1.bin".into(),
    }
}

pub fn notices() -> Vec<ReleaseNotice> {
    policies()
        .into_iter()
        .enumerate()
        .map(|(i, policy)| ReleaseNotice {
            release: release(),
            seq: 40 + i as u64,
            target: if i % 2 == 0 {
                Target::Machine(machine())
            } else {
                Target::Group(group())
            },
            kind: kind(),
            version: format!("2.{i}.1-rc{i}"),
            artifact: artifact_ref(),
            policy,
            rollback: i == 3,
            issued_at_ms: 1_760_000_000_000,
        })
        .collect()
}

pub fn commands() -> Vec<Command> {
    [
        CommandAction::Activate { release: release() },
        CommandAction::Cancel { release: release() },
        CommandAction::Report,
        CommandAction::Groups {
            groups: vec![GroupId::new("shanghai").unwrap()],
        },
    ]
    .into_iter()
    .enumerate()
    .map(|(i, action)| Command {
        machine: machine(),
        seq: 50 + i as u64,
        issued_at_ms: 1_760_000_000_000,
        action,
    })
    .collect()
}

pub fn status_acks() -> Vec<StatusAck> {
    vec![StatusAck {
        machine: machine(),
        ctr: 10_007,
    }]
}

pub fn status_events() -> Vec<StatusEvent> {
    let base = StatusEvent {
        machine: machine(),
        ctr: 10_001,
        at_ms: 1_760_000_000_000,
        release: Some(release()),
        kind: kind(),
        version: "2.4.1".into(),
        phase: Phase::Downloading,
        progress: Some(Progress {
            bytes: 65536,
            total: 5 * 65536 + 17,
        }),
        attempt: 2,
        error: None,
        detail: None,
    };
    vec![
        base.clone(),
        StatusEvent {
            ctr: 10_005,
            phase: Phase::InstallFailed,
            progress: None,
            error: Some("installer exited with status 3".into()),
            detail: Some("waiting for window 02:00-04:00".into()),
            ..base.clone()
        },
        StatusEvent {
            ctr: 10_006,
            release: None,
            phase: Phase::Rejected,
            attempt: 1,
            progress: None,
            ..base
        },
    ]
}

pub fn kind_state() -> KindState {
    KindState {
        version: Some("2.4.1".into()),
        artifact: Some(artifact()),
        release: Some(release()),
        phase: Some(Phase::Installed),
        seq: 41,
    }
}

pub fn machine_states() -> Vec<MachineState> {
    let mut kinds = BTreeMap::new();
    kinds.insert(kind(), kind_state());
    kinds.insert(
        Kind::new("firmware").expect("valid id"),
        KindState::default(),
    );
    vec![MachineState {
        machine: machine(),
        ctr: 10_002,
        at_ms: 1_760_000_000_000,
        agent_version: fleetcast_proto::VERSION.into(),
        groups: vec![group()],
        busy: true,
        kinds,
        key_gen: 1,
    }]
}

pub fn chunk_requests() -> Vec<ChunkRequest> {
    vec![
        ChunkRequest {
            machine: machine(),
            ctr: 10_003,
            artifact: artifact(),
            manifest: true,
            manifest_parts: None,
            chunks: vec![],
        },
        ChunkRequest {
            machine: machine(),
            ctr: 10_004,
            artifact: artifact(),
            manifest: false,
            manifest_parts: None,
            chunks: vec![(0, 2), (4, 6)],
        },
        ChunkRequest {
            machine: machine(),
            ctr: 10_005,
            artifact: artifact(),
            manifest: true,
            manifest_parts: Some((32, 64)),
            chunks: vec![(0, 16)],
        },
    ]
}

pub fn admin_ops() -> Vec<AdminOp> {
    vec![
        AdminOp::UploadBegin {
            kind: kind(),
            version: "2.4.1".into(),
            name: "app-2.4.1.bin".into(),
            size: 5 * 65536 + 17,
            artifact: artifact(),
            chunk_size: 65536,
            notes: Some("fixes the coin counter".into()),
        },
        AdminOp::UploadCommit {
            artifact: artifact(),
        },
        AdminOp::ArtifactList,
        AdminOp::DbCompact,
        AdminOp::ArtifactRemove {
            kind: kind(),
            version: "2.4.0".into(),
        },
        AdminOp::ReleaseRemove {
            releases: vec![release()],
            check: true,
        },
        AdminOp::ReleaseCreate {
            kind: kind(),
            version: "2.4.1".into(),
            policy: policies().remove(4),
            notes: None,
        },
        AdminOp::ReleasePlan {
            release: release(),
            machines: vec![machine()],
            groups: vec![group()],
            allow_empty: false,
            after: None,
            limit: None,
        },
        AdminOp::ReleasePublish {
            release: release(),
            machines: vec![],
            groups: vec![group()],
            allow_empty: true,
            waves: None,
        },
        AdminOp::ReleaseList,
        AdminOp::ReleaseStatus {
            release: release(),
            after: None,
            limit: Some(2),
        },
        AdminOp::Machines,
        AdminOp::MachineProvision {
            machine: machine(),
            groups: vec![group()],
            rotate: true,
        },
        AdminOp::Rollback {
            target: Target::Group(group()),
            kind: kind(),
            to: Some("2.3.0".into()),
            allow_empty: false,
        },
        AdminOp::Activate {
            release: release(),
            machines: vec![machine()],
            groups: vec![group()],
        },
    ]
}

pub fn admin_requests() -> Vec<AdminRequest> {
    admin_ops()
        .into_iter()
        .enumerate()
        .map(|(i, op)| AdminRequest {
            client: "fleetcast-op-alice.1a2b".into(),
            id: i as u64 + 1,
            ctr: 1_760_000_000_000_000 + i as u64,
            at_ms: 1_760_000_000_000,
            op,
        })
        .collect()
}

fn release_info() -> ReleaseInfo {
    ReleaseInfo {
        id: release(),
        kind: kind(),
        version: "2.4.1".into(),
        artifact: artifact_ref(),
        policy: policies().remove(3),
        rollback: false,
        notes: Some("fixes the coin counter".into()),
        created_at_ms: 1_760_000_000_000,
        published_at_ms: Some(1_760_000_001_000),
        seq: 41,
        machines: vec![machine()],
        groups: vec![group()],
    }
}

pub fn admin_responses() -> Vec<AdminResponse> {
    let artifact_info = ArtifactInfo {
        id: artifact(),
        kind: kind(),
        version: "2.4.1".into(),
        name: "app-2.4.1.bin".into(),
        size: 5 * 65536 + 17,
        chunk_size: 65536,
        notes: None,
        uploaded_at_ms: 1_760_000_000_000,
        removed_at_ms: None,
    };
    let plan = PublishPlan {
        release: release_info(),
        topics: vec!["fleet/groups/shanghai/release/app".into()],
        targets: vec![(machine(), Some(group())), (machine(), None)],
        rollout: None,
    };
    let record = TargetRecord {
        release: release(),
        machine: machine(),
        kind: kind(),
        version: "2.4.1".into(),
        via: Some(group()),
        phase: Phase::Installed,
        phase_at_ms: 1_760_000_002_000,
        notified_at_ms: Some(1_760_000_001_500),
        download: Some(StepResult {
            phase: Phase::Downloaded,
            ok: true,
            at_ms: 1_760_000_001_800,
            error: None,
        }),
        upgrade: Some(StepResult {
            phase: Phase::InstallFailed,
            ok: false,
            at_ms: 1_760_000_001_900,
            error: Some("health check failed".into()),
        }),
        error: None,
        detail: None,
        attempts: 2,
        progress: Some(Progress {
            bytes: 17,
            total: 17,
        }),
        updated_at_ms: 1_760_000_002_100,
    };
    let mut phases = BTreeMap::new();
    phases.insert(Phase::Installed, 1);
    phases.insert(Phase::Downloading, 2);
    let mut info = MachineInfo::new(machine(), 1_760_000_000_000);
    info.kinds.insert(kind(), kind_state());
    info.last_seen_ms = Some(1_760_000_003_000);
    info.agent_version = Some("0.1.0".into());
    let replies = vec![
        AdminReply::UploadReady {
            parts: 6,
            part_size: 65536,
        },
        AdminReply::UploadMissing {
            parts: vec![(0, 2), (5, 6)],
        },
        AdminReply::Artifact {
            artifact: artifact_info.clone(),
        },
        AdminReply::Artifacts {
            artifacts: vec![artifact_info],
        },
        AdminReply::Release {
            release: release_info(),
        },
        AdminReply::Releases {
            releases: vec![release_info()],
        },
        AdminReply::Plan { plan: plan.into() },
        AdminReply::ReleaseStatus {
            status: ReleaseStatus {
                release: release_info(),
                targets: vec![record],
                progress: RolloutProgress {
                    release: release(),
                    kind: kind(),
                    version: "2.4.1".into(),
                    total: 3,
                    phases,
                    finished: 1,
                    succeeded: 1,
                    failed: 0,
                    updated_at_ms: 1_760_000_002_100,
                },
                next: Some(machine()),
                more: true,
                bytes_done: 3072,
                bytes_total: 6144,
                staged: Some(StagedProgress {
                    state: RolloutState::Paused {
                        reason: "paused by ops".into(),
                    },
                    wave: 1,
                    waves: 4,
                    notified: 20,
                    skipped: 2,
                    machines: 200,
                }),
            },
        },
        AdminReply::Machines {
            machines: vec![info],
        },
        AdminReply::Provisioned {
            machine: ProvisionedMachine {
                machine: machine(),
                groups: vec![group()],
                secret: secret().clone(),
                platform_key: platform_key().public(),
                platform_key_gen: 0,
                topic_prefix: "fleet".into(),
            },
        },
        AdminReply::Done {
            message: "activated on 1 machine".into(),
        },
    ];
    let mut out: Vec<AdminResponse> = replies
        .into_iter()
        .enumerate()
        .map(|(i, r)| AdminResponse::ok(i as u64 + 1, 1000 + i as u64, r))
        .collect();
    out.push(AdminResponse::error(99, 1099, "unknown release r-9"));
    out
}
