//! Log set-up: klog's `--v` levels mapped onto tracing's.

use tracing::Level;

/// `--log-format`.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, clap::ValueEnum)]
pub enum LogFormat {
    #[default]
    Text,
    Json,
}

pub fn level_for_verbosity(verbosity: u8) -> Level {
    match verbosity {
        0 | 1 => Level::INFO,
        2 | 3 => Level::DEBUG,
        _ => Level::TRACE,
    }
}

pub fn init(verbosity: u8, format: LogFormat) {
    let builder = tracing_subscriber::fmt()
        .with_max_level(level_for_verbosity(verbosity))
        .with_target(false)
        .with_writer(std::io::stderr)
        .with_ansi(false);
    match format {
        LogFormat::Text => builder.init(),
        LogFormat::Json => builder.json().flatten_event(true).init(),
    }
}
