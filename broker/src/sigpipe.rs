//! Commands whose output goes to a pipe that closes early (`fleetcast machines | head`).
//!
//! Rust ignores SIGPIPE, so a write to a closed pipe is an error, and `println!` panics on it
//! ("failed printing to stdout: Broken pipe" and a backtrace). A command-line tool should end as
//! `ls` or `grep` do: quietly, killed by SIGPIPE (status 141 in a shell). Servers keep ignoring
//! it: a peer that hangs up must be an error on that one socket, never the end of the process.

/// Restores the default action for SIGPIPE: a write to a closed pipe ends this process
/// quietly. Call it first thing in a command that only prints and exits, never in one that
/// serves connections (`fleetcast serve`, the agent, the simulator).
pub fn end_on_closed_pipe() {
    #[cfg(unix)]
    // SAFETY: this only sets the disposition to SIG_DFL (no handler of ours runs). Sockets do
    // not depend on SIGPIPE being ignored: std, and so tokio, send with MSG_NOSIGNAL.
    unsafe {
        libc::signal(libc::SIGPIPE, libc::SIG_DFL);
    }
}
