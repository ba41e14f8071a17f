//! Fuzz targets for fleetcast's decoders: everything that parses bytes from the network, the
//! disk or an operator. See `docs/fuzzing.md` for how they run and how to add one.
//!
//! Layout:
//! - [`targets`]: one module per target (`run` and `seeds`) and the list of all of them.
//! - [`family`]: the shared checks for signed and MAC'd message families: the body parsed
//!   directly and through the real verify/open path after signing or sealing it.
//! - [`samples`]: real messages of every kind, made with the fixed test keys; the seeds.
//!
//! A target never decides what is a bug by itself returning an error: it panics (assert) when a
//! decoder breaks a property, and libFuzzer records the input as a crash.

pub mod family;
pub mod samples;
pub mod targets;

/// What a target made of one input.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Verdict {
    /// The decoder accepted the input as a valid message (and every property held).
    Accepted,
    /// The decoder refused it, without panicking.
    Rejected,
}

impl Verdict {
    pub fn from_ok(ok: bool) -> Self {
        if ok {
            Verdict::Accepted
        } else {
            Verdict::Rejected
        }
    }

    /// Accepted when any of the checks accepted.
    pub fn or(self, other: Verdict) -> Verdict {
        Verdict::from_ok(self == Verdict::Accepted || other == Verdict::Accepted)
    }
}

/// One fuzz target.
pub struct Target {
    /// The corpus directory under `fuzz/corpus/` and the name `scripts/fuzz.sh` takes.
    pub name: &'static str,
    /// Feeds one input to the decoder and checks its properties; panics on a violation.
    pub run: fn(&[u8]) -> Verdict,
    /// Valid inputs made by the code; each must be [`Verdict::Accepted`].
    pub seeds: fn() -> Vec<Vec<u8>>,
}

/// The target called `name`.
pub fn find(name: &str) -> Option<&'static Target> {
    targets::ALL.iter().find(|t| t.name == name)
}
