//! The `fleetcast` command line.
