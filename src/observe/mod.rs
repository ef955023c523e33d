//! Telling the truth about the agent: metrics and health state (`telemetry`), the HTTP
//! endpoint that serves them (`http`), and log set-up (`logging`). Nothing here knows
//! the agent; the agent reports into it.

pub mod http;
pub mod logging;
pub mod telemetry;
