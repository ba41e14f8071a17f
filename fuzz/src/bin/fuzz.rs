//! One libFuzzer binary for every target: `FLEETCAST_FUZZ_TARGET=<name>` picks the target,
//! `FLEETCAST_FUZZ_TARGET=list` prints the names and exits. Built and run by `scripts/fuzz.sh`.
#![no_main]

use std::sync::OnceLock;

use fleetcast_fuzz::Target;

static TARGET: OnceLock<&'static Target> = OnceLock::new();

fn select() -> &'static Target {
    let name = std::env::var("FLEETCAST_FUZZ_TARGET").unwrap_or_default();
    if name == "list" {
        for t in fleetcast_fuzz::targets::ALL {
            println!("{}", t.name);
        }
        std::process::exit(0);
    }
    fleetcast_fuzz::find(&name).unwrap_or_else(|| {
        let names: Vec<&str> = fleetcast_fuzz::targets::ALL
            .iter()
            .map(|t| t.name)
            .collect();
        eprintln!(
            "set FLEETCAST_FUZZ_TARGET to one of: {} (or list)",
            names.join(" ")
        );
        std::process::exit(2);
    })
}

libfuzzer_sys::fuzz_target!(
    init: {
        TARGET.get_or_init(select);
    },
    |data: &[u8]| {
        let target = TARGET.get_or_init(select);
        // Rejected inputs are kept too: the paths that refuse input are code to cover.
        let _ = (target.run)(data);
    }
);
