//! `fleetcast`: the platform service and the operator CLI. Exit statuses: docs/cli.md.

use clap::Parser;

#[tokio::main]
async fn main() -> std::process::ExitCode {
    fleetcast_platform::logs::init();
    let cli = fleetcast_platform::cli::Cli::parse();
    if !matches!(cli.command, fleetcast_platform::cli::Command::Serve(_)) {
        fleetcast_broker::sigpipe::end_on_closed_pipe();
    }
    match fleetcast_platform::cli::run(cli).await {
        Ok(()) => std::process::ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("error: {e:#}");
            std::process::ExitCode::from(fleetcast_platform::cli::exit_code(&e))
        }
    }
}
