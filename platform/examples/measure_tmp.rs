use fleetcast_broker::mosquitto::{mosquitto_files, BrokerIdentity};
use fleetcast_proto::acl::Principal;
use fleetcast_proto::admin::*;
use fleetcast_proto::auth::Secret;
use fleetcast_proto::status::KindState;
use fleetcast_proto::*;

fn j<T: serde::Serialize>(v: &T) -> usize {
    serde_json::to_vec(v).unwrap().len()
}
fn sealed(json: usize) -> usize {
    (json + 40).div_ceil(3) * 4 + 64
}

fn main() {
    for (label, idlen, glen) in [("short", 8usize, 2usize), ("long", 64, 64)] {
        let id =
            |i: usize| MachineId::new(format!("{:0>w$}", format!("vm-{i:05}"), w = idlen)).unwrap();
        let g = GroupId::new("g".repeat(glen)).unwrap();
        println!("== {label} ids ({idlen} chars), one group ({glen} chars)");
        // machines
        let mut mi = MachineInfo::new(id(1), 1_795_608_000_000);
        mi.groups = vec![g.clone()];
        mi.online = true;
        mi.last_seen_ms = Some(1_795_608_000_000);
        mi.agent_version = Some("0.1.0".into());
        mi.kinds.insert(
            Kind::new("app").unwrap(),
            KindState {
                version: Some("2.4.1".into()),
                artifact: Some(ArtifactId::of(b"x")),
                release: Some(ReleaseId::new("r-000012").unwrap()),
                phase: Some(Phase::Installed),
                seq: 1234,
            },
        );
        println!("MachineInfo: {} B", j(&mi) + 1);
        // mosquitto
        let topics = Topics::default();
        let header = mosquitto_files(&topics, &[]).unwrap().acl;
        let one = mosquitto_files(
            &topics,
            &[BrokerIdentity {
                principal: Principal::Machine {
                    id: id(1),
                    groups: vec![g.clone()],
                },
                password: Secret::from_bytes([1; 32]).mqtt_password(),
            }],
        )
        .unwrap();
        let block = one.acl.strip_prefix(&header).unwrap();
        let esc = |s: &str| s.len() + s.matches('\n').count();
        println!(
            "mosquitto per machine: passwd {} + acl {} = {} B (JSON)",
            esc(&one.passwd),
            esc(block),
            esc(&one.passwd) + esc(block)
        );
        // plan
        let target = (id(1), Some(g.clone()));
        println!("plan target entry: {} B", j(&target) + 1);
        let topic = format!("fleet/machines/{}/release/app", id(1));
        println!("plan machine topic: {} B", j(&topic) + 1);
        println!("rollout order entry: {} B", j(&id(1)) + 1);
        println!("release named machine: {} B", j(&id(1)) + 1);
        println!("activate name: {} B", id(1).as_str().len() + 2);
    }
    let r = ReleaseInfo {
        id: ReleaseId::new("r-000012").unwrap(),
        kind: Kind::new("app").unwrap(),
        version: "2026.11.25-build.1234".into(),
        artifact: release::ArtifactRef {
            id: ArtifactId::of(b"x"),
            size: 1 << 26,
            chunk_size: 65536,
            name: "app-2026.11.25.bin".into(),
        },
        policy: InstallPolicy::Immediate,
        rollback: false,
        notes: Some("fixes the coin counter".into()),
        created_at_ms: 1_795_608_000_000,
        published_at_ms: Some(1_795_608_000_000),
        seq: 123456,
        machines: vec![],
        groups: vec![GroupId::new("shanghai").unwrap()],
    };
    println!("ReleaseInfo (no named machines): {} B", j(&r) + 1);
    let a = ArtifactInfo {
        id: ArtifactId::of(b"x"),
        kind: Kind::new("app").unwrap(),
        version: "2026.11.25-build.1234".into(),
        name: "app-2026.11.25.bin".into(),
        size: 1 << 26,
        chunk_size: 65536,
        notes: Some("fixes the coin counter".into()),
        uploaded_at_ms: 1_795_608_000_000,
    };
    println!("ArtifactInfo: {} B", j(&a) + 1);
    let o = OperatorInfo {
        name: "alice-from-ops".into(),
        role: fleetcast_proto::acl::Role::Operator,
        created_at_ms: 1_795_608_000_000,
        created_by: "admin".into(),
    };
    println!("OperatorInfo: {} B", j(&o) + 1);
    let specs: Vec<MachineSpec> = (0..1000)
        .map(|i| MachineSpec {
            machine: MachineId::new(format!("vm-{i:05}")).unwrap(),
            groups: vec![GroupId::new("shanghai").unwrap()],
        })
        .collect();
    let req = serde_json::to_value(AdminOp::MachineProvisionBatch {
        machines: specs,
        rotate: false,
    })
    .unwrap();
    let e = AuditEntry {
        id: 1,
        at_ms: 1,
        operator: "admin".into(),
        client: "fleetcast-op-admin.1a2b3c4d".into(),
        action: "machine_provision_batch".into(),
        request: req,
        result: "ok".into(),
    };
    println!(
        "AuditEntry of a 1,000-machine provision batch: {} B",
        j(&e) + 1
    );
    let ev = FleetEvent {
        id: 123456,
        recorded_at_ms: 1_795_608_000_000,
        machine: MachineId::new("vm-00001").unwrap(),
        release: Some(ReleaseId::new("r-000012").unwrap()),
        kind: Kind::new("app").unwrap(),
        version: "2.4.1".into(),
        phase: Phase::InstallFailed,
        at_ms: 1_795_608_000_000,
        attempt: 1,
        progress: None,
        error: Some("install script exited with status 1".into()),
        detail: None,
    };
    println!("FleetEvent: {} B", j(&ev) + 1);
    println!("sealed(1 MiB JSON) = {}", sealed(1 << 20));
}
