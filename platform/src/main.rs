//! `fleetcast`: the platform service and the operator CLI.

use clap::Parser;

#[tokio::main]
async fn main() -> std::process::ExitCode {
    fleetcast_platform::logs::init();
    let cli = fleetcast_platform::cli::Cli::parse();
    match fleetcast_platform::cli::run(cli).await {
        Ok(()) => std::process::ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("error: {e:#}");
            std::process::ExitCode::FAILURE
        }
    }
}
