//! The `polybus` command: publish, tail, bridge, dead letters and benchmarks for CloudEvents
//! on NATS, JetStream, Kafka and MQTT with one tool and one URL syntax (the one
//! [`polybus::connect`] takes).
//!
//! * `polybus pub URL TOPIC [DATA|@file|-]`: publishes events (`--lines` for one per line,
//!   `--count`/`--rate` for load, with a progress bar on a terminal).
//! * `polybus tail URL TOPIC` (alias `sub`): prints each event as a readable block, or one
//!   structured-mode CloudEvent JSON per line with `--json`; reads messages other programs
//!   wrote too (no CloudEvents headers).
//! * `polybus bridge --config bridge.toml`: moves events between backends, route by route.
//! * `polybus dlq list|show|redrive URL TOPIC`: dead letters.
//! * `polybus bench URL`: publish/consume rate and latency.
//! * `polybus completions SHELL`.
//!
//! Exit codes: see [`EXIT_CODES`]; docs/CLI.md has the whole manual.

mod bench;
mod bridge;
mod common;
mod dlq;
mod publish;
mod tail;

use std::process::ExitCode;

use clap::{CommandFactory as _, Parser, Subcommand};

use crate::common::Failure;

/// The exit codes, as `--help` shows them.
const EXIT_CODES: &str = "\
Exit codes:
  0  success (tail: --count events printed, or stopped with Ctrl-C; bridge: drained)
  1  the broker failed an operation (publish rejected, payload too large, ...)
  2  usage: bad arguments, bad config file, unknown URL scheme, invalid topic or header,
     something the backend cannot do (tail --from earliest on core NATS or MQTT, ...)
  3  the broker could not be reached (connection refused, DNS, timeout)
  4  the broker refused the credentials or a permission
  5  tail --timeout expired before --count events arrived

Credentials go in the URL (scheme://user:password@host:port) or in POLYBUS_USER and
POLYBUS_PASSWORD; they are never printed (errors show user:***@host). TLS: --tls-ca,
--tls-cert, --tls-key (or POLYBUS_TLS_CA, POLYBUS_TLS_CERT, POLYBUS_TLS_KEY) on nats,
jetstream, kafka and mqtt (kafka: SSL, or SASL_SSL with credentials).";

const COMPLETIONS_EXAMPLES: &str = "\
Examples:
  polybus completions bash > ~/.local/share/bash-completion/completions/polybus
  polybus completions zsh > ~/.zfunc/_polybus
  polybus completions fish > ~/.config/fish/completions/polybus.fish";

#[derive(Debug, Parser)]
#[command(
    name = "polybus",
    version,
    about = "Publish, tail, bridge and benchmark CloudEvents on NATS, JetStream, Kafka and MQTT",
    long_about = "Publish, tail, bridge and benchmark CloudEvents on NATS, JetStream, Kafka and MQTT.\n\n\
                  URLs: memory://, nats://host:4222, jetstream://host:4222, \
                  kafka://host:9092, mqtt://host:1883, with ?group=..., \
                  ?offset=earliest|latest (Kafka), ?client_id=... and ?session_expiry=SECS \
                  (MQTT persistent session), ?ack_wait=SECS (JetStream), as polybus::connect \
                  takes them.",
    after_help = EXIT_CODES
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
    /// CA certificate (PEM) to verify the broker with; turns TLS on (nats, jetstream, kafka,
    /// mqtt).
    #[arg(long, global = true, env = "POLYBUS_TLS_CA", value_name = "FILE")]
    tls_ca: Option<std::path::PathBuf>,
    /// Client certificate (PEM) for mutual TLS, with --tls-key.
    #[arg(long, global = true, env = "POLYBUS_TLS_CERT", value_name = "FILE")]
    tls_cert: Option<std::path::PathBuf>,
    /// The client certificate's private key (PEM).
    #[arg(long, global = true, env = "POLYBUS_TLS_KEY", value_name = "FILE")]
    tls_key: Option<std::path::PathBuf>,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Publish events: DATA as given, @file, or stdin (`-` or nothing).
    #[command(after_help = publish::EXAMPLES)]
    Pub(publish::PubArgs),
    /// Follow a topic (wildcards allowed) and print each event.
    #[command(visible_alias = "sub", after_help = tail::EXAMPLES)]
    Tail(tail::TailArgs),
    /// Move events between backends, route by route, from a config file (a daemon).
    #[command(after_help = bridge::EXAMPLES)]
    Bridge(bridge::BridgeArgs),
    /// Dead letters: list, show one, move them back (redrive).
    #[command(subcommand)]
    Dlq(dlq::DlqCommand),
    /// Publish and consume through a broker and report rates and latency.
    #[command(after_help = bench::EXAMPLES)]
    Bench(bench::BenchArgs),
    /// Print a shell completion script.
    #[command(after_help = COMPLETIONS_EXAMPLES)]
    Completions {
        /// The shell.
        shell: clap_complete::Shell,
    },
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    if let Command::Completions { shell } = cli.command {
        clap_complete::generate(
            shell,
            &mut Cli::command(),
            "polybus",
            &mut std::io::stdout(),
        );
        return ExitCode::SUCCESS;
    }
    let tls = common::Tls {
        ca: cli.tls_ca,
        cert: cli.tls_cert,
        key: cli.tls_key,
    };
    if let Err(f) = tls.install() {
        eprintln!("polybus: {}", f.message);
        return ExitCode::from(f.code);
    }
    let runtime = match tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("polybus: cannot start the async runtime: {e}");
            return ExitCode::from(1);
        }
    };
    let result: Result<(), Failure> = runtime.block_on(async {
        match cli.command {
            Command::Pub(args) => publish::run(args).await,
            Command::Tail(args) => tail::run(args).await,
            Command::Bridge(args) => bridge::run(args).await,
            Command::Dlq(args) => dlq::run(args).await,
            Command::Bench(args) => bench::run(args).await,
            Command::Completions { .. } => Ok(()),
        }
    });
    // Background tasks (broker connections) must not hold the process after the answer.
    runtime.shutdown_timeout(std::time::Duration::from_secs(1));
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(f) => {
            eprintln!("polybus: {}", f.message);
            ExitCode::from(f.code)
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_command_line_parses() {
        Cli::command().debug_assert();
        let cli = Cli::try_parse_from([
            "polybus", "pub", "nats://h", "t", "x", "-H", "a=b", "--header", "c=d",
        ])
        .unwrap();
        let Command::Pub(p) = cli.command else {
            panic!()
        };
        assert_eq!(p.headers, ["a=b", "c=d"]);
        assert!(matches!(
            Cli::try_parse_from(["polybus", "sub", "nats://h", "t"])
                .unwrap()
                .command,
            Command::Tail(_)
        ));
    }
}
