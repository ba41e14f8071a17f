//! What the agent reads back from its data dir at start: `agent.json` (ledger and message
//! counter) when the first byte is even, `outbox.json` (unacknowledged status events) when odd.
//! A damaged file must be refused or loaded, never crash the agent or repeat a counter.

use std::path::PathBuf;

use fleetcast_device::machine::{Installed, Job, KindRecord, Ledger, Step};
use fleetcast_device::store::{Outbox, OutboxEntry, Store};
use fleetcast_proto::auth::Purpose;

use crate::family::secret;
use crate::samples::{kind, notices, status_events};
use crate::Verdict;

/// Where nothing can be written (a file is not a directory): a save fails at once, and the
/// fuzzer never touches the disk.
fn nowhere(file: &str) -> PathBuf {
    PathBuf::from("/dev/null").join(file)
}

pub fn run(data: &[u8]) -> Verdict {
    let Some((which, bytes)) = data.split_first() else {
        return Verdict::Rejected;
    };
    if which % 2 == 0 {
        let Ok(store) = Store::decode(nowhere("agent.json"), Some(bytes)) else {
            return Verdict::Rejected;
        };
        let _ = store.ledger().artifacts_in_use();
        // The reservation cannot be saved here, so no counter may be handed out.
        assert!(store.next_ctr().is_err());
    } else {
        let Ok(mut outbox) = Outbox::decode(nowhere("outbox.json"), Some(bytes)) else {
            return Verdict::Rejected;
        };
        let head = outbox.head().map(|e| e.ctr);
        if let Some(ctr) = head {
            let _ = outbox.ack(ctr);
        }
    }
    Verdict::Accepted
}

pub fn seeds() -> Vec<Vec<u8>> {
    let notice = notices().remove(3);
    let mut ledger = Ledger {
        last_command_seq: 52,
        ..Ledger::default()
    };
    ledger.kinds.insert(
        kind(),
        KindRecord {
            accepted_seq: notice.seq,
            rejected_seq: 12,
            installed: Some(Installed {
                version: "2.3.0".into(),
                artifact: None,
            }),
            previous: Some(Installed {
                version: "2.2.0".into(),
                artifact: Some(notice.artifact.id),
            }),
            job: Some(Job {
                notice: notice.clone(),
                step: Step::Deferred,
                activated: false,
                from_previous: false,
            }),
            queued: Some(notices().remove(0)),
            last: None,
        },
    );
    // Written by the real store into a scratch dir, then read back as bytes.
    let dir = std::env::temp_dir().join(format!("fleetcast-fuzz-seeds-{}", std::process::id()));
    std::fs::create_dir_all(&dir).expect("scratch dir");
    let store = Store::open(&dir).expect("empty store opens");
    store.save_ledger(&ledger).expect("ledger saves");
    store.next_ctr().expect("counter reserves");
    let mut outbox = Outbox::open(&dir).expect("empty outbox opens");
    for event in status_events() {
        outbox
            .push(OutboxEntry {
                ctr: event.ctr,
                payload: String::from_utf8(secret().seal(Purpose::Status, &event))
                    .expect("envelopes are UTF-8"),
            })
            .expect("outbox saves");
    }
    let read = |name: &str| std::fs::read(dir.join(name)).expect("file written");
    let out = vec![
        [vec![0u8], read("agent.json")].concat(),
        [vec![1u8], read("outbox.json")].concat(),
    ];
    let _ = std::fs::remove_dir_all(&dir);
    out
}
