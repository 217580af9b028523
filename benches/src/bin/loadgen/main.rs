//! `loadgen`: the broker workloads behind `cargo xtask bench`.
//!
//! For every workload it runs the polybus adapter and the raw client underneath it (async-nats,
//! rdkafka, rumqttc) against the same broker, in the same run, alternating which side goes
//! first round by round, and reports medians. Each run is a child process (`loadgen child
//! ...`), so every side starts from a fresh heap and reports its own peak RSS.
//!
//! ```text
//! loadgen [--quick] [--rounds N] [--only ID[,ID...]] [--out DIR]   run and report
//! loadgen list                                                     the workloads
//! loadgen report [--out DIR]                                       redraw from DIR/results.json
//! ```
//!
//! Brokers come from `POLYBUS_NATS_URL`, `POLYBUS_KAFKA_BROKERS`, `POLYBUS_MQTT_HOST` and
//! `POLYBUS_MQTT_PORT` (defaults: the usual local ports). Output: `DIR/results.json`,
//! `DIR/results.md`, `DIR/*.svg` and one log per run in `DIR/logs/`.

mod child;
mod hist;
mod meter;
mod parent;
mod plot;
mod report;
mod spec;
mod work;

use std::process::ExitCode;

fn main() -> ExitCode {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let result = match args.first().map(String::as_str) {
        Some("child") => child::main(&args[1..]),
        Some("list") => {
            spec::list();
            Ok(())
        }
        Some("report") => parent::report_only(&args[1..]),
        Some("-h" | "--help" | "help") => {
            println!("{}", parent::USAGE);
            Ok(())
        }
        _ => parent::main(&args),
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("loadgen: error: {e:#}");
            ExitCode::FAILURE
        }
    }
}
