//! `cargo xtask mutations [MUTATION...]`: proves that the conformance suite checks every
//! declared capability. For each mutation (one `Capabilities` field changed, see
//! `crates/polybus-testkit/src/mutation.rs`) it runs every backend's conformance scenarios with
//! `POLYBUS_CAPS_MUTATION` set and prints which scenarios failed per backend. A cell that says
//! NOTHING FAILED is a field the suite does not hold the backend to: the command then fails.

use std::collections::BTreeMap;
use std::fmt::Write as _;

use anyhow::{Context as _, Result, bail};
use xshell::{Shell, cmd};

use crate::{
    broker, cargo,
    config::{Broker, Paths, test_env},
};

/// Where the mutation list lives (one source of truth: the testkit's `MUTATIONS`).
const MUTATION_RS: &str = "crates/polybus-testkit/src/mutation.rs";
/// The testkit's message for a mutation that changes nothing on a backend (`SAME_VALUE`).
const SAME_VALUE: &str = "is already the declaration of";
/// The conformance test binaries and how a test path names its backend.
const BACKENDS: &[(&str, &str, &str)] = &[
    // (nextest binary id, test-name prefix, backend)
    ("polybus-testkit::memory", "", "memory"),
    ("polybus-nats::it", "conformance::", "nats"),
    ("polybus-jetstream::it", "conformance::", "jetstream"),
    ("polybus-kafka::it", "conformance::", "kafka"),
    ("polybus-mqtt::it", "conformance::v5::", "mqtt-5"),
    ("polybus-mqtt::it", "conformance::v311::", "mqtt-3.1.1"),
];
/// Scenarios that do not read the (mutated) declaration.
const UNMUTATED: &[&str] = &["capabilities_match_the_backend"];

pub(crate) fn run(sh: &Shell, args: &[String]) -> Result<()> {
    let all = mutations(sh)?;
    let chosen: Vec<String> = if args.is_empty() {
        all.clone()
    } else {
        for a in args {
            if !all.contains(a) {
                bail!("unknown mutation `{a}`; known: {}", all.join(", "));
            }
        }
        args.to_vec()
    };
    let paths = Paths::from_env()?;
    println!("mutations: starting the brokers (cargo xtask broker up all)");
    let mut started = Vec::new();
    broker::up(sh, &paths, &Broker::ALL, &mut started)?;
    let env = test_env(&paths)?;
    let cargo = cargo();
    let filter = "binary(memory) | test(/^conformance::/)";
    println!("mutations: building the test binaries");
    cmd!(
        sh,
        "{cargo} nextest run --workspace --all-features --run-ignored all --no-run"
    )
    .run()?;

    let mut table: Vec<(String, BTreeMap<&str, Cell>)> = Vec::new();
    for m in &chosen {
        println!("mutations: POLYBUS_CAPS_MUTATION={m}");
        let out = cmd!(
            sh,
            "{cargo} nextest run --workspace --all-features --run-ignored all --no-fail-fast
             -E {filter} --status-level fail --final-status-level fail --failure-output final
             --color never"
        )
        .envs(env.iter().map(|(k, v)| (k, v)))
        .env("POLYBUS_CAPS_MUTATION", m)
        .ignore_status()
        .quiet()
        .output()?;
        let text = String::from_utf8_lossy(&out.stdout).into_owned()
            + &String::from_utf8_lossy(&out.stderr);
        let row = cells(&text);
        for (backend, cell) in &row {
            println!("    {backend:<11} {}", cell.show());
        }
        table.push((m.clone(), row));
    }
    let md = markdown(&table);
    let path = paths.cache().join("mutations.md");
    std::fs::write(&path, &md).with_context(|| format!("writing {}", path.display()))?;
    println!("\n{md}\nmutations: table written to {}", path.display());
    let uncaught: Vec<String> = table
        .iter()
        .flat_map(|(m, row)| {
            row.iter()
                .filter(|(_, c)| matches!(c, Cell::Failed(v) if v.is_empty()))
                .map(move |(b, _)| format!("{m} on {b}"))
        })
        .collect();
    if !uncaught.is_empty() {
        bail!("no scenario failed for: {}", uncaught.join(", "));
    }
    Ok(())
}

/// The mutation names from the testkit's `MUTATIONS` constant.
fn mutations(sh: &Shell) -> Result<Vec<String>> {
    let src = sh.read_file(MUTATION_RS)?;
    let start = src
        .find("pub const MUTATIONS: &[&str] = &[")
        .context("MUTATIONS not found in the testkit")?;
    let end = start + src[start..].find("];").context("unterminated MUTATIONS")?;
    Ok(src[start..end]
        .lines()
        .skip(1)
        .filter_map(|l| l.trim().strip_prefix('"')?.strip_suffix("\","))
        .map(str::to_owned)
        .collect())
}

enum Cell {
    /// The mutation changes nothing on this backend (the field already has that value).
    Same,
    /// The scenarios that failed.
    Failed(Vec<String>),
}

impl Cell {
    fn show(&self) -> String {
        match self {
            Cell::Same => "(already the declared value)".to_owned(),
            Cell::Failed(v) if v.is_empty() => "NOTHING FAILED".to_owned(),
            Cell::Failed(v) => v.join(", "),
        }
    }
}

/// Reads nextest's output: `FAIL [ 1.2s] polybus-nats::it conformance::headers_roundtrip`
/// lines, and the testkit's same-value message.
fn cells(text: &str) -> BTreeMap<&'static str, Cell> {
    let mut row: BTreeMap<&str, Cell> = BTreeMap::new();
    for &(_, _, backend) in BACKENDS {
        if text.contains(&format!("{SAME_VALUE} {backend}\n"))
            || text.contains(&format!("{SAME_VALUE} {backend}\""))
            || text
                .lines()
                .any(|l| l.trim_end().ends_with(&format!("{SAME_VALUE} {backend}")))
        {
            row.insert(backend, Cell::Same);
        } else {
            row.insert(backend, Cell::Failed(Vec::new()));
        }
    }
    for line in text.lines() {
        let line = line.trim();
        if !line.starts_with("FAIL [") {
            continue;
        }
        let Some(rest) = line.split_once("] ").map(|(_, r)| r) else {
            continue;
        };
        // "(12/116) polybus-nats::it conformance::x" or "polybus-nats::it conformance::x"
        let rest = rest.trim_start_matches(|c: char| {
            c == '(' || c.is_ascii_digit() || c == '/' || c == ')' || c == ' '
        });
        let Some((binary, test)) = rest.split_once(' ') else {
            continue;
        };
        let Some(&(_, prefix, backend)) = BACKENDS
            .iter()
            .filter(|(b, p, _)| *b == binary && test.starts_with(p))
            .max_by_key(|(_, p, _)| p.len())
        else {
            continue;
        };
        let scenario = test[prefix.len()..].to_owned();
        if UNMUTATED.contains(&scenario.as_str()) {
            continue;
        }
        if let Some(Cell::Failed(v)) = row.get_mut(backend)
            && !v.contains(&scenario)
        {
            v.push(scenario);
        }
    }
    row
}

fn markdown(table: &[(String, BTreeMap<&str, Cell>)]) -> String {
    let mut md = String::from("| mutation |");
    for &(_, _, b) in BACKENDS {
        let _ = write!(md, " {b} |");
    }
    md.push_str("\n|---|");
    for _ in BACKENDS {
        md.push_str("---|");
    }
    md.push('\n');
    for (m, row) in table {
        let _ = write!(md, "| `{m}` |");
        for &(_, _, b) in BACKENDS {
            let cell = row.get(b).map_or_else(String::new, Cell::show);
            let _ = write!(md, " {cell} |");
        }
        md.push('\n');
    }
    md
}
