//! `flashsale load`: a load generator that drives a running server over gRPC and checks the
//! books afterwards. (Scenarios land here.)

use clap::Args;

/// Options of `flashsale load`.
#[derive(Debug, Clone, Args)]
pub struct LoadArgs {
    /// The server to drive.
    #[arg(
        long,
        env = "FLASHSALE_SERVER",
        default_value = "http://127.0.0.1:50051"
    )]
    pub server: String,
}

/// Runs the chosen scenario and prints its figures.
pub async fn run(args: LoadArgs) -> Result<(), Box<dyn std::error::Error + Send + Sync>> {
    Err(format!("no load scenarios yet (server {})", args.server).into())
}
