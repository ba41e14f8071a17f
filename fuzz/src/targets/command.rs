//! `Command` bodies: parsed directly and through `sign` + `verify`.

use fleetcast_proto::auth::Purpose;
use fleetcast_proto::command::Command;
use fleetcast_proto::{Route, Topics};

use crate::family::signed;
use crate::samples::{commands, json};
use crate::Verdict;

pub fn run(data: &[u8]) -> Verdict {
    signed(Purpose::Command, data, |c: &Command| {
        let topics = Topics::default();
        assert_eq!(
            topics.parse(&topics.command(&c.machine)),
            Some(Route::Command(c.machine.clone()))
        );
    })
}

pub fn seeds() -> Vec<Vec<u8>> {
    commands().iter().map(json).collect()
}
