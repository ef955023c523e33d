//! `ip-masq-agent`: parse the flags, run the command (the agent by default).

use std::process::ExitCode;

use ip_masq_agent::cli::{self, Cli};
use ip_masq_agent::commands;

fn main() -> ExitCode {
    match run(cli::parse()) {
        Ok(code) => code,
        // The reader of our output went away (`status | head -2`): end quietly.
        Err(err) if err.chain().any(|e| e.is::<commands::StdoutClosed>()) => {
            ExitCode::from(commands::STDOUT_CLOSED_STATUS)
        }
        Err(err) => {
            commands::err_line(format_args!("ip-masq-agent: {err:#}"));
            ExitCode::FAILURE
        }
    }
}

fn run(parsed: Result<Cli, clap::Error>) -> anyhow::Result<ExitCode> {
    match parsed {
        Ok(cli) => commands::run(cli),
        Err(usage) => {
            // --help and --version print and succeed; a bad flag is exit status 2.
            let _ = usage.print();
            Ok(ExitCode::from(u8::try_from(usage.exit_code()).unwrap_or(2)))
        }
    }
}
