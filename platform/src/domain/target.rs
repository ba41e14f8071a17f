//! One machine's record for one release as a pure state machine: what a machine's status
//! event does to its `TargetRecord`. (The release's aggregate over its records is
//! [`super::release::progress`].) No I/O.

use fleetcast_proto::admin::{ReleaseInfo, StepResult, TargetRecord};
use fleetcast_proto::{GroupId, MachineId, Phase, StatusEvent};

/// Why an event does not change a record. The event is still stored as a fleet event.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum NotAllowed {
    #[error("event is for release {event:?} on {machine}, record is {record} on {record_machine}")]
    WrongTarget {
        event: Option<String>,
        machine: MachineId,
        record: String,
        record_machine: MachineId,
    },
    #[error("phase {0} is assigned by the platform only; a machine cannot report it")]
    PlatformOnly(Phase),
    #[error("release was superseded by a newer release of the same kind; only a final phase is still recorded")]
    Superseded,
    #[error("already finished as {from} (attempt {attempts}); only a new attempt (> {attempts}) may report {to}")]
    Finished {
        from: Phase,
        to: Phase,
        attempts: u32,
    },
    #[error("going backwards from {from} to {to} within attempt {attempt}")]
    Backwards {
        from: Phase,
        to: Phase,
        attempt: u32,
    },
}

/// Order of the non-final phases within one attempt; final phases rank highest.
fn rank(p: Phase) -> u8 {
    match p {
        Phase::Pending => 0,
        Phase::Notified => 1,
        Phase::Downloading => 2,
        Phase::Downloaded | Phase::Deferred => 3,
        Phase::Installing => 4,
        Phase::DownloadFailed
        | Phase::Installed
        | Phase::InstallFailed
        | Phase::RolledBack
        | Phase::Rejected
        | Phase::Cancelled
        | Phase::Superseded => 5,
    }
}

/// A new record for a machine a release was just published to.
pub fn new_target(
    release: &ReleaseInfo,
    machine: MachineId,
    via: Option<GroupId>,
    now_ms: u64,
) -> TargetRecord {
    TargetRecord {
        release: release.id.clone(),
        machine,
        kind: release.kind.clone(),
        version: release.version.clone(),
        via,
        phase: Phase::Pending,
        phase_at_ms: now_ms,
        notified_at_ms: None,
        download: None,
        upgrade: None,
        error: None,
        detail: None,
        attempts: 0,
        progress: None,
        updated_at_ms: now_ms,
    }
}

/// Marks a record superseded by a newer release unless it already finished.
pub fn supersede(rec: &mut TargetRecord, now_ms: u64) -> bool {
    if rec.phase.is_final() {
        return false;
    }
    rec.phase = Phase::Superseded;
    rec.phase_at_ms = now_ms;
    rec.updated_at_ms = now_ms;
    true
}

/// Applies one status event to the record of its (release, machine). On `Err` the record is
/// unchanged.
pub fn apply(rec: &mut TargetRecord, ev: &StatusEvent, now_ms: u64) -> Result<(), NotAllowed> {
    if ev.release.as_ref() != Some(&rec.release) || ev.machine != rec.machine {
        return Err(NotAllowed::WrongTarget {
            event: ev.release.as_ref().map(|r| r.to_string()),
            machine: ev.machine.clone(),
            record: rec.release.to_string(),
            record_machine: rec.machine.clone(),
        });
    }
    let (from, to) = (rec.phase, ev.phase);
    let new_attempt = ev.attempt > rec.attempts;
    match (from, to) {
        (_, Phase::Pending | Phase::Superseded) => return Err(NotAllowed::PlatformOnly(to)),
        // Superseded is the platform's guess when it publishes a newer release; a final phase
        // from the machine is a fact (the newer notice was rejected, or came during this
        // install) and replaces the guess. Progress after it would leave the record hanging.
        (Phase::Superseded, t) if t.is_final() => {}
        (Phase::Superseded, _) => return Err(NotAllowed::Superseded),
        (f, _) if f.is_final() && !new_attempt => {
            return Err(NotAllowed::Finished {
                from,
                to,
                attempts: rec.attempts,
            })
        }
        // A download_only release waits deferred, then `activate` may start the download.
        (Phase::Deferred, Phase::Downloading) => {}
        (f, t) if rank(t) < rank(f) && !new_attempt => {
            return Err(NotAllowed::Backwards {
                from,
                to,
                attempt: ev.attempt,
            })
        }
        (
            Phase::Pending
            | Phase::Notified
            | Phase::Deferred
            | Phase::Downloading
            | Phase::Downloaded
            | Phase::Installing
            | Phase::DownloadFailed
            | Phase::Installed
            | Phase::InstallFailed
            | Phase::RolledBack
            | Phase::Rejected
            | Phase::Cancelled,
            Phase::Notified
            | Phase::Deferred
            | Phase::Downloading
            | Phase::Downloaded
            | Phase::DownloadFailed
            | Phase::Installing
            | Phase::Installed
            | Phase::InstallFailed
            | Phase::RolledBack
            | Phase::Rejected
            | Phase::Cancelled,
        ) => {}
    }
    let at = ev.at_ms;
    let step = |ok: bool| StepResult {
        phase: to,
        ok,
        at_ms: at,
        error: ev.error.clone(),
    };
    rec.phase = to;
    rec.phase_at_ms = at;
    rec.attempts = rec.attempts.max(ev.attempt);
    rec.updated_at_ms = now_ms;
    if let Some(e) = &ev.error {
        rec.error = Some(e.clone());
    }
    rec.detail = ev.detail.clone();
    match to {
        Phase::Notified => {
            rec.notified_at_ms.get_or_insert(at);
        }
        Phase::Downloading => {
            if ev.progress.is_some() {
                rec.progress = ev.progress;
            }
        }
        Phase::Downloaded => {
            rec.download = Some(step(true));
            if let Some(p) = ev.progress {
                rec.progress = Some(p);
            } else if let Some(p) = rec.progress.as_mut() {
                p.bytes = p.total;
            }
        }
        Phase::DownloadFailed => rec.download = Some(step(false)),
        Phase::Installed => {
            rec.upgrade = Some(step(true));
            rec.error = None;
        }
        Phase::InstallFailed | Phase::RolledBack => rec.upgrade = Some(step(false)),
        Phase::Deferred
        | Phase::Installing
        | Phase::Rejected
        | Phase::Cancelled
        | Phase::Pending
        | Phase::Superseded => {}
    }
    if rec.notified_at_ms.is_none() && to != Phase::Rejected {
        // Events can overtake each other between sessions; a later phase implies notified.
        rec.notified_at_ms = Some(at);
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use fleetcast_proto::status::Progress;
    use fleetcast_proto::{Kind, ReleaseId};

    fn release() -> ReleaseInfo {
        ReleaseInfo {
            seq: 1,
            ..crate::fixtures::release("r-000001", "2.4.1")
        }
    }

    fn rec() -> TargetRecord {
        new_target(&release(), MachineId::new("vm-1").unwrap(), None, 10)
    }

    fn ev(phase: Phase, at: u64) -> StatusEvent {
        StatusEvent {
            machine: MachineId::new("vm-1").unwrap(),
            ctr: at,
            at_ms: at,
            release: Some(ReleaseId::new("r-000001").unwrap()),
            kind: Kind::new("app").unwrap(),
            version: "2.4.1".into(),
            phase,
            progress: None,
            attempt: 1,
            error: None,
            detail: None,
        }
    }

    #[test]
    fn a_full_successful_rollout_records_download_and_upgrade_times() {
        let mut r = rec();
        apply(&mut r, &ev(Phase::Notified, 100), 1).unwrap();
        let mut d = ev(Phase::Downloading, 110);
        d.progress = Some(Progress {
            bytes: 5,
            total: 10,
        });
        apply(&mut r, &d, 2).unwrap();
        apply(&mut r, &ev(Phase::Downloaded, 120), 3).unwrap();
        apply(&mut r, &ev(Phase::Installing, 130), 4).unwrap();
        apply(&mut r, &ev(Phase::Installed, 140), 5).unwrap();
        assert_eq!(r.phase, Phase::Installed);
        assert_eq!(r.notified_at_ms, Some(100));
        let dl = r.download.clone().unwrap();
        assert!(dl.ok && dl.at_ms == 120);
        let up = r.upgrade.clone().unwrap();
        assert!(up.ok && up.at_ms == 140);
        assert_eq!(
            r.progress,
            Some(Progress {
                bytes: 10,
                total: 10
            })
        );
        assert_eq!((r.attempts, r.phase_at_ms, r.updated_at_ms), (1, 140, 5));
    }

    /// Why a deferred install waits is the machine's to say (its window, a sale): the record
    /// keeps the latest report's detail, so `release status` can show it, and the next report
    /// replaces it.
    #[test]
    fn a_deferred_install_keeps_why_it_waits_until_the_next_report() {
        let mut r = rec();
        apply(&mut r, &ev(Phase::Downloaded, 50), 1).unwrap();
        let mut d = ev(Phase::Deferred, 60);
        d.detail = Some("waiting for window 02:00-04:00".into());
        apply(&mut r, &d, 2).unwrap();
        assert_eq!(r.detail.as_deref(), Some("waiting for window 02:00-04:00"));
        apply(&mut r, &ev(Phase::Installing, 70), 3).unwrap();
        assert_eq!(r.detail, None);
    }

    #[test]
    fn a_failed_download_records_the_error_and_a_retry_may_start_over() {
        let mut r = rec();
        let mut f = ev(Phase::DownloadFailed, 50);
        f.error = Some("timeout".into());
        apply(&mut r, &f, 1).unwrap();
        assert_eq!(r.download.as_ref().map(|d| d.ok), Some(false));
        assert_eq!(r.error.as_deref(), Some("timeout"));
        let err = apply(&mut r, &ev(Phase::Downloading, 60), 2).unwrap_err();
        assert!(matches!(err, NotAllowed::Finished { .. }), "{err}");
        let mut retry = ev(Phase::Downloading, 70);
        retry.attempt = 2;
        apply(&mut r, &retry, 3).unwrap();
        assert_eq!((r.phase, r.attempts), (Phase::Downloading, 2));
    }

    #[test]
    fn a_rolled_back_install_is_an_upgrade_failure() {
        let mut r = rec();
        let mut e = ev(Phase::RolledBack, 9);
        e.error = Some("health check failed".into());
        apply(&mut r, &e, 1).unwrap();
        let up = r.upgrade.unwrap();
        assert!(!up.ok);
        assert_eq!(up.phase, Phase::RolledBack);
        assert_eq!(up.error.as_deref(), Some("health check failed"));
    }

    #[test]
    fn an_event_for_another_release_or_machine_is_not_allowed() {
        let mut r = rec();
        let mut e = ev(Phase::Notified, 1);
        e.release = Some(ReleaseId::new("r-000002").unwrap());
        assert!(matches!(
            apply(&mut r, &e, 1),
            Err(NotAllowed::WrongTarget { .. })
        ));
        let mut e = ev(Phase::Notified, 1);
        e.machine = MachineId::new("vm-2").unwrap();
        assert!(matches!(
            apply(&mut r, &e, 1),
            Err(NotAllowed::WrongTarget { .. })
        ));
        assert_eq!(r, rec());
    }

    #[test]
    fn machines_cannot_report_platform_only_phases() {
        let mut r = rec();
        for p in [Phase::Pending, Phase::Superseded] {
            assert_eq!(
                apply(&mut r, &ev(p, 1), 1),
                Err(NotAllowed::PlatformOnly(p))
            );
        }
    }

    #[test]
    fn going_backwards_within_one_attempt_is_refused_and_explained() {
        let mut r = rec();
        apply(&mut r, &ev(Phase::Installing, 5), 1).unwrap();
        let err = apply(&mut r, &ev(Phase::Downloading, 6), 2).unwrap_err();
        assert_eq!(
            err.to_string(),
            "going backwards from installing to downloading within attempt 1"
        );
        assert_eq!(r.phase, Phase::Installing);
    }

    #[test]
    fn a_deferred_download_only_release_may_start_downloading_on_activate() {
        let mut r = rec();
        apply(&mut r, &ev(Phase::Downloaded, 1), 1).unwrap();
        apply(&mut r, &ev(Phase::Deferred, 2), 2).unwrap();
        apply(&mut r, &ev(Phase::Installing, 3), 3).unwrap();
        let mut r = rec();
        apply(&mut r, &ev(Phase::Deferred, 1), 1).unwrap();
        apply(&mut r, &ev(Phase::Downloading, 2), 2).unwrap();
    }

    #[test]
    fn a_superseded_record_takes_no_more_progress_and_finished_ones_are_not_superseded() {
        let mut r = rec();
        apply(&mut r, &ev(Phase::Downloading, 2), 2).unwrap();
        assert!(supersede(&mut r, 3));
        for p in [
            Phase::Notified,
            Phase::Downloading,
            Phase::Downloaded,
            Phase::Installing,
        ] {
            assert_eq!(
                apply(&mut r, &ev(p, 4), 4),
                Err(NotAllowed::Superseded),
                "{p}"
            );
        }
        assert_eq!(r.phase, Phase::Superseded);
        let mut done = rec();
        apply(&mut done, &ev(Phase::Installed, 1), 1).unwrap();
        assert!(!supersede(&mut done, 2));
        assert_eq!(done.phase, Phase::Installed);
    }

    #[test]
    fn a_superseded_release_the_machine_still_finished_records_that_result() {
        // The newer notice was rejected, or reached the machine while this install ran: the
        // machine finished this release, and the record must say so.
        for end in [Phase::Installed, Phase::InstallFailed, Phase::RolledBack] {
            let mut r = rec();
            apply(&mut r, &ev(Phase::Installing, 2), 2).unwrap();
            assert!(supersede(&mut r, 3));
            apply(&mut r, &ev(end, 4), 4).unwrap();
            assert_eq!(r.phase, end);
            assert_eq!(
                r.upgrade.as_ref().map(|u| u.ok),
                Some(end == Phase::Installed)
            );
        }
        let mut r = rec();
        assert!(supersede(&mut r, 3));
        apply(&mut r, &ev(Phase::DownloadFailed, 4), 4).unwrap();
        assert_eq!(r.download.as_ref().map(|d| d.ok), Some(false));
    }

    #[test]
    fn every_sequence_a_machine_reports_is_applied_to_the_end() {
        let download = |at| {
            let mut d = ev(Phase::Downloading, at);
            d.progress = Some(Progress {
                bytes: 4,
                total: 10,
            });
            d
        };
        let retry = |mut e: StatusEvent, attempt| {
            e.attempt = attempt;
            e
        };
        let sequences: Vec<(&str, Vec<StatusEvent>, Phase)> = vec![
            (
                "immediate",
                vec![
                    ev(Phase::Notified, 1),
                    download(2),
                    ev(Phase::Downloaded, 3),
                    ev(Phase::Installing, 4),
                    ev(Phase::Installed, 5),
                ],
                Phase::Installed,
            ),
            (
                "window",
                vec![
                    ev(Phase::Notified, 1),
                    download(2),
                    ev(Phase::Downloaded, 3),
                    ev(Phase::Deferred, 4),
                    ev(Phase::Installing, 5),
                    ev(Phase::Installed, 6),
                ],
                Phase::Installed,
            ),
            (
                "rollback slot",
                vec![
                    ev(Phase::Notified, 1),
                    ev(Phase::Downloaded, 2),
                    ev(Phase::Installing, 3),
                    ev(Phase::Installed, 4),
                ],
                Phase::Installed,
            ),
            // Download retries count up, then the later phases come with attempt 1 again.
            (
                "retried download",
                vec![
                    ev(Phase::Notified, 1),
                    download(2),
                    retry(download(3), 2),
                    retry(download(4), 3),
                    ev(Phase::Downloaded, 5),
                    ev(Phase::Installing, 6),
                    ev(Phase::Installed, 7),
                ],
                Phase::Installed,
            ),
            (
                "failed download",
                vec![
                    ev(Phase::Notified, 1),
                    download(2),
                    retry(download(3), 2),
                    retry(ev(Phase::DownloadFailed, 4), 2),
                ],
                Phase::DownloadFailed,
            ),
            (
                "already installed",
                vec![ev(Phase::Installed, 1)],
                Phase::Installed,
            ),
            (
                "queued behind an install",
                vec![
                    ev(Phase::Notified, 1),
                    ev(Phase::Notified, 2),
                    download(3),
                    ev(Phase::Downloaded, 4),
                    ev(Phase::Installing, 5),
                    ev(Phase::Installed, 6),
                ],
                Phase::Installed,
            ),
            (
                "cancelled while downloading",
                vec![ev(Phase::Notified, 1), download(2), ev(Phase::Cancelled, 3)],
                Phase::Cancelled,
            ),
            (
                "cancelled while deferred",
                vec![
                    ev(Phase::Notified, 1),
                    ev(Phase::Downloaded, 2),
                    ev(Phase::Deferred, 3),
                    ev(Phase::Cancelled, 4),
                ],
                Phase::Cancelled,
            ),
            (
                "activate before the download",
                vec![
                    ev(Phase::Notified, 1),
                    ev(Phase::Deferred, 2),
                    download(3),
                    ev(Phase::Downloaded, 4),
                    ev(Phase::Installing, 5),
                    ev(Phase::Installed, 6),
                ],
                Phase::Installed,
            ),
            ("rejected", vec![ev(Phase::Rejected, 1)], Phase::Rejected),
            (
                "unhealthy",
                vec![
                    ev(Phase::Notified, 1),
                    download(2),
                    ev(Phase::Downloaded, 3),
                    ev(Phase::Installing, 4),
                    ev(Phase::RolledBack, 5),
                ],
                Phase::RolledBack,
            ),
        ];
        for (name, events, end) in sequences {
            let mut r = rec();
            for e in &events {
                apply(&mut r, e, e.at_ms)
                    .unwrap_or_else(|why| panic!("{name}: {} refused: {why}", e.phase));
            }
            assert_eq!(r.phase, end, "{name}");
        }
    }
}
