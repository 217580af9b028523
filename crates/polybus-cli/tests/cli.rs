//! End-to-end tests of the `polybus` binary, driven as a user would: spawned processes,
//! arguments, stdin, stdout, stderr and exit codes. The broker tests are ignored under plain
//! `cargo test`; `cargo xtask test` starts the brokers and runs them.

use std::io::{BufRead, BufReader, Write};
use std::process::{Child, Command, Output, Stdio};
use std::sync::mpsc;
use std::time::Duration;

mod common;
use common::{env_or, kafka_host, mqtt_host, nats_host, polybus, python, stderr_lines, unique};

/// A running `polybus tail ... --ready`: spawned, and subscribed once `start` returns.
struct Tail {
    child: Child,
    stderr: mpsc::Receiver<String>,
}

impl Tail {
    fn start(args: &[&str]) -> Tail {
        let mut child = polybus()
            .arg("tail")
            .args(args)
            .args(["--ready", "--timeout", "60"])
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .expect("spawn polybus tail");
        let rx = stderr_lines(&mut child);
        // The signal: tail saw its own probe come back, so it is subscribed.
        let mut seen = Vec::new();
        loop {
            match rx.recv_timeout(Duration::from_secs(60)) {
                Ok(line) if line == "polybus: ready" => break,
                Ok(line) => seen.push(line),
                Err(e) => {
                    let _ = child.kill();
                    panic!("tail never became ready ({e}); stderr: {seen:?}");
                }
            }
        }
        Tail { child, stderr: rx }
    }

    /// Waits for tail to exit on its own (`--count`), and returns its stdout.
    fn finish(self) -> String {
        let Tail { child, stderr } = self;
        let out = child.wait_with_output().expect("wait for tail");
        let err: Vec<String> = stderr.try_iter().collect();
        let stdout = String::from_utf8(out.stdout).unwrap();
        assert!(
            out.status.success(),
            "tail exited with {:?}; stdout: {stdout}; stderr: {err:?}",
            out.status
        );
        stdout
    }
}

fn run(cmd: &mut Command, stdin: Option<&[u8]>) -> Output {
    let mut child = cmd
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("spawn");
    let mut input = child.stdin.take().unwrap();
    if let Some(bytes) = stdin {
        input.write_all(bytes).unwrap();
    }
    drop(input);
    child.wait_with_output().unwrap()
}

fn publish(args: &[&str], stdin: Option<&[u8]>) {
    let out = run(polybus().arg("pub").args(args), stdin);
    assert!(
        out.status.success(),
        "pub {args:?} exited with {:?}: {}",
        out.status,
        String::from_utf8_lossy(&out.stderr)
    );
}

fn json_lines(stdout: &str) -> Vec<serde_json::Value> {
    stdout
        .lines()
        .map(|l| serde_json::from_str(l).unwrap_or_else(|e| panic!("not JSON ({e}): {l}")))
        .collect()
}

/// `pub` three ways (literal with --count, --lines from stdin, @file), then
/// `tail --json --count 4` sees the four events with their attributes.
fn round_trip(url: &str, prefix: &str) {
    let topic = unique(prefix);
    let tail = Tail::start(&[url, &topic, "--json", "--count", "4"]);
    publish(
        &[
            url,
            &topic,
            r#"{"n":1}"#,
            "--count",
            "2",
            "--type",
            "com.example.cli",
            "--key",
            "k1",
            "-H",
            "region=eu",
        ],
        None,
    );
    publish(
        &[url, &topic, "--lines", "--type", "com.example.line"],
        Some(b"third\n\n"),
    );
    let dir = tempfile_dir();
    let file = dir.join("event.bin");
    std::fs::write(&file, [0u8, 159, 146, 150]).unwrap();
    publish(
        &[
            url,
            &topic,
            &format!("@{}", file.display()),
            "--content-type",
            "application/octet-stream",
        ],
        None,
    );
    let events = json_lines(&tail.finish());
    assert_eq!(events.len(), 4, "{events:#?}");
    for e in &events[..2] {
        assert_eq!(e["specversion"], "1.0");
        assert_eq!(e["type"], "com.example.cli");
        assert_eq!(e["data"], serde_json::json!({"n": 1}));
        assert_eq!(e["datacontenttype"], "application/json");
        assert_eq!(e["region"], "eu");
        assert_eq!(e["partitionkey"], "k1");
    }
    assert_ne!(
        events[0]["id"], events[1]["id"],
        "--count makes distinct events"
    );
    assert_eq!(events[2]["type"], "com.example.line");
    assert_eq!(events[2]["data"], "third");
    assert_eq!(events[3]["data_base64"], "AJ+Slg==");
    let _ = std::fs::remove_dir_all(dir);
}

fn tempfile_dir() -> std::path::PathBuf {
    let dir = std::env::temp_dir().join(unique("polybus-cli-"));
    std::fs::create_dir_all(&dir).unwrap();
    dir
}

#[test]
#[ignore = "needs brokers: cargo xtask test"]
fn pub_then_tail_round_trip_over_nats() {
    round_trip(&format!("nats://{}", nats_host()), "cli.nats.");
}

#[test]
#[ignore = "needs brokers: cargo xtask test"]
fn pub_then_tail_round_trip_over_jetstream() {
    round_trip(&format!("jetstream://{}", nats_host()), "cli_js_");
}

#[test]
#[ignore = "needs brokers: cargo xtask test"]
fn pub_then_tail_round_trip_over_kafka() {
    round_trip(&format!("kafka://{}", kafka_host()), "cli-kafka-");
}

#[test]
#[ignore = "needs brokers: cargo xtask test"]
fn pub_then_tail_round_trip_over_mqtt() {
    round_trip(&format!("mqtt://{}", mqtt_host()), "cli/mqtt/");
}

#[test]
#[ignore = "needs brokers: cargo xtask test"]
fn tail_prints_what_mosquitto_pub_wrote_as_readable_blocks() {
    let topic = unique("cli/foreign/");
    let url = format!("mqtt://{}", mqtt_host());
    let tail = Tail::start(&[&url, &topic, "--count", "2"]);
    let host = env_or("POLYBUS_MQTT_HOST", "127.0.0.1");
    let port = env_or("POLYBUS_MQTT_PORT", "1883");
    for message in [r#"{"temp":21.5,"unit":"C"}"#, "plain text"] {
        let out = run(
            Command::new("mosquitto_pub").args([
                "-h", &host, "-p", &port, "-q", "1", "-t", &topic, "-m", message,
            ]),
            None,
        );
        assert!(out.status.success(), "mosquitto_pub: {out:?}");
    }
    let text = tail.finish();
    assert_eq!(text.matches(&topic).count(), 2, "{text}");
    assert!(text.contains("  type    "), "{text}");
    assert!(text.contains("  id      "), "{text}");
    assert!(
        text.contains("    {\n      \"temp\": 21.5,\n      \"unit\": \"C\"\n    }"),
        "{text}"
    );
    assert!(text.contains("    plain text\n"), "{text}");
}

#[test]
#[ignore = "needs brokers: cargo xtask test"]
fn tail_reads_what_nats_py_wrote() {
    let topic = unique("cli.natspy.");
    let url = format!("nats://{}", nats_host());
    let tail = Tail::start(&[&url, &topic, "--json", "--count", "1"]);
    let script = format!(
        "import asyncio, nats\n\
         async def main():\n    \
             nc = await nats.connect({url:?})\n    \
             await nc.publish({topic:?}, b'{{\"from\": \"nats-py\"}}', headers={{'x-app': 'py'}})\n    \
             await nc.drain()\n\
         asyncio.run(main())\n"
    );
    let out = run(Command::new(python()).args(["-c", &script]), None);
    assert!(
        out.status.success(),
        "nats-py: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let events = json_lines(&tail.finish());
    assert_eq!(events.len(), 1);
    assert_eq!(events[0]["data"], serde_json::json!({"from": "nats-py"}));
}

#[test]
#[ignore = "needs brokers: cargo xtask test"]
fn tail_reads_what_kafka_python_wrote() {
    let topic = unique("cli-kafkapy-");
    let brokers = kafka_host();
    // kafka-python does not create topics: a polybus pub does (and is read back too).
    let url = format!("kafka://{brokers}?offset=earliest");
    publish(&[&url, &topic, "from polybus"], None);
    // Kafka keeps the messages: write first, tail reads from the earliest offset.
    let script = format!(
        "from kafka import KafkaProducer\n\
         p = KafkaProducer(bootstrap_servers={brokers:?})\n\
         p.send({topic:?}, key=b'k7', value=b'hello from kafka-python').get(timeout=30)\n\
         p.flush()\n"
    );
    let out = run(Command::new(python()).args(["-c", &script]), None);
    assert!(
        out.status.success(),
        "kafka-python: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let out = run(
        polybus().args([
            "tail",
            &url,
            &topic,
            "--group",
            &topic,
            "--json",
            "--count",
            "2",
            "--timeout",
            "60",
        ]),
        None,
    );
    assert!(out.status.success(), "tail: {out:?}");
    let events = json_lines(&String::from_utf8(out.stdout).unwrap());
    assert_eq!(events.len(), 2, "{events:#?}");
    let e = events
        .iter()
        .find(|e| e["partitionkey"] == "k7")
        .unwrap_or_else(|| panic!("no event with kafka-python's key: {events:#?}"));
    assert_eq!(e["data"], "hello from kafka-python");
}

#[test]
fn an_unreachable_broker_exits_3_and_names_the_url_without_the_password() {
    for url in ["nats://127.0.0.1:1", "mqtt://svc:hunter2@127.0.0.1:1"] {
        for sub in ["pub", "tail"] {
            let args: &[&str] = if sub == "pub" {
                &[sub, url, "t", "x"]
            } else {
                &[sub, url, "t"]
            };
            let out = run(polybus().args(args), None);
            let err = String::from_utf8_lossy(&out.stderr);
            assert_eq!(out.status.code(), Some(3), "{sub} {url}: {err}");
            assert!(err.contains("cannot reach the broker at"), "{err}");
            assert!(err.contains("127.0.0.1:1"), "{err}");
            assert!(err.contains("hint:"), "{err}");
            assert!(!err.contains("hunter2"), "{err}");
        }
    }
    let out = run(
        polybus()
            .env("POLYBUS_USER", "svc")
            .env("POLYBUS_PASSWORD", "hunter2")
            .args(["pub", "mqtt://127.0.0.1:1", "t", "x"]),
        None,
    );
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(3), "{err}");
    assert!(
        err.contains("mqtt://svc:***@127.0.0.1:1") && !err.contains("hunter2"),
        "{err}"
    );
}

#[tokio::test]
#[ignore = "needs brokers: cargo xtask test"]
async fn wrong_credentials_exit_4_and_name_the_backend_that_refused() {
    let broker = polybus_testkit::brokers::BrokerProcess::nats(
        "authorization { user: app, password: right }",
    )
    .await
    .expect("nats-server with a password");
    let host = broker.url().trim_start_matches("nats://").to_owned();
    for scheme in ["nats", "jetstream"] {
        let url = format!("{scheme}://app:hunter2@{host}");
        for sub in [&["pub", &url, "t", "x"][..], &["tail", &url, "t"]] {
            let out = run(polybus().args(sub), None);
            let err = String::from_utf8_lossy(&out.stderr);
            assert_eq!(out.status.code(), Some(4), "{sub:?}: {err}");
            assert!(
                err.contains(&format!("{scheme} refused the credentials")),
                "{err}"
            );
            assert!(err.contains(&format!("{scheme}://app:***@{host}")), "{err}");
            assert!(err.contains("hint:") && !err.contains("hunter2"), "{err}");
        }
    }
    // The right password from the environment, not the URL.
    let out = run(
        polybus()
            .env("POLYBUS_USER", "app")
            .env("POLYBUS_PASSWORD", "right")
            .args(["pub", &format!("nats://{host}"), "t", "x"]),
        None,
    );
    assert!(out.status.success(), "{out:?}");
}

#[test]
fn usage_errors_exit_2() {
    for args in [
        &[
            "pub",
            "nats://127.0.0.1:1",
            "t",
            "x",
            "--header",
            "no-equals",
        ][..],
        &["pub", "not-a-url", "t", "x"],
        &["pub", "carrier-pigeon://coop", "t", "x"],
        &["pub", "memory://", "t", "@/nonexistent/file"],
        &["tail", "nats://127.0.0.1:1", "a.*", "--ready"],
        &["tail"],
        &["frobnicate"],
    ] {
        let out = run(polybus().args(args), None);
        assert_eq!(
            out.status.code(),
            Some(2),
            "{args:?}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
    }
}

#[test]
fn help_shows_examples_and_exit_codes() {
    let out = run(polybus().arg("--help"), None);
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success());
    assert!(
        text.contains("Exit codes:") && text.contains("tail"),
        "{text}"
    );
    for sub in ["pub", "tail", "sub"] {
        let out = run(polybus().args(["help", sub]), None);
        let text = String::from_utf8_lossy(&out.stdout);
        assert!(
            text.contains("Examples:") && text.contains("polybus "),
            "{sub}: {text}"
        );
    }
}

#[test]
fn tail_times_out_with_exit_5_on_memory() {
    // memory:// is a fresh broker per process: nothing ever arrives.
    let out = run(
        polybus().args(["tail", "memory://", "t", "--count", "1", "--timeout", "0.2"]),
        None,
    );
    assert_eq!(out.status.code(), Some(5), "{out:?}");
    assert!(String::from_utf8_lossy(&out.stderr).contains("0 of 1 events"));
}

#[test]
fn every_subcommand_has_examples_and_completions_print() {
    for sub in [
        &["pub"][..],
        &["tail"],
        &["bridge"],
        &["dlq", "list"],
        &["dlq", "show"],
        &["dlq", "redrive"],
        &["bench"],
        &["completions"],
    ] {
        let out = run(polybus().args(sub).arg("--help"), None);
        let text = String::from_utf8_lossy(&out.stdout);
        assert!(
            out.status.success() && text.contains("Examples:") && text.contains("polybus "),
            "{sub:?}: {text}"
        );
    }
    for shell in ["bash", "zsh", "fish"] {
        let out = run(polybus().args(["completions", shell]), None);
        let text = String::from_utf8_lossy(&out.stdout);
        assert!(out.status.success(), "{shell}");
        assert!(
            text.contains("polybus") && text.contains("redrive"),
            "{shell}: {text}"
        );
    }
    assert_eq!(
        run(polybus().args(["completions", "cmd.exe"]), None)
            .status
            .code(),
        Some(2)
    );
}

#[test]
fn tail_from_where_the_backend_cannot_exits_2_before_connecting() {
    // Port 1: were it to connect first, the exit code would be 3.
    for (url, from, says) in [
        ("nats://127.0.0.1:1", "earliest", "nats keeps no history"),
        (
            "mqtt://127.0.0.1:1",
            "2026-12-04T09:00:00Z",
            "mqtt keeps no history",
        ),
        (
            "jetstream://127.0.0.1:1",
            "yesterday",
            "earliest, latest, an RFC 3339 time",
        ),
    ] {
        let out = run(polybus().args(["tail", url, "t", "--from", from]), None);
        let err = String::from_utf8_lossy(&out.stderr);
        assert_eq!(out.status.code(), Some(2), "{url} {from}: {err}");
        assert!(err.contains(says), "{url} {from}: {err}");
    }
}

#[test]
fn pub_rate_paces_the_publishes() {
    let started = std::time::Instant::now();
    let out = run(
        polybus().args([
            "pub",
            "memory://",
            "t",
            "x",
            "--count",
            "21",
            "--rate",
            "100",
        ]),
        None,
    );
    assert!(out.status.success(), "{out:?}");
    let took = started.elapsed();
    // 21 publishes at 100/s: the last goes out 200 ms after the first.
    assert!(took >= Duration::from_millis(200), "{took:?}");
    assert!(String::from_utf8_lossy(&out.stderr).contains("published 21 events"));
    // Not a terminal: no progress bar on stdout.
    assert!(out.stdout.is_empty(), "{out:?}");
    assert_eq!(
        run(
            polybus().args(["pub", "memory://", "t", "x", "--rate", "0"]),
            None
        )
        .status
        .code(),
        Some(2)
    );
}

#[test]
#[ignore = "needs brokers: cargo xtask test"]
fn tail_from_a_time_and_from_latest() {
    let topic = unique("cli_from_");
    let js = format!("jetstream://{}", nats_host());
    publish(
        &[&js, &topic, "before", "--type", "com.example.before"],
        None,
    );
    std::thread::sleep(Duration::from_millis(50));
    let since = polybus::time::format_rfc3339(std::time::SystemTime::now());
    std::thread::sleep(Duration::from_millis(50));
    publish(&[&js, &topic, "after", "--type", "com.example.after"], None);
    let read = |from: &str| {
        let out = run(
            polybus().args([
                "tail",
                &js,
                &topic,
                "--from",
                from,
                "--json",
                "--count",
                "1",
                "--timeout",
                "30",
            ]),
            None,
        );
        assert!(out.status.success(), "{out:?}");
        json_lines(&String::from_utf8(out.stdout).unwrap())
    };
    assert_eq!(read(&since)[0]["type"], "com.example.after");
    assert_eq!(read("earliest")[0]["type"], "com.example.before");
    // Kafka: latest skips what is there; the event published after the tail started arrives.
    let kafka = format!("kafka://{}", kafka_host());
    let ktopic = unique("cli-from-");
    publish(&[&kafka, &ktopic, "old", "--type", "com.example.old"], None);
    let tail = Tail::start(&[
        &kafka, &ktopic, "--from", "latest", "--json", "--count", "1",
    ]);
    publish(&[&kafka, &ktopic, "new", "--type", "com.example.new"], None);
    let events = json_lines(&tail.finish());
    assert_eq!(events[0]["type"], "com.example.new");
}

/// `tail --from <time>` on Kafka: partitions start at the first record at or after the time
/// (ListOffsets by timestamp); a span back from now (`1d`) takes everything younger.
#[test]
#[ignore = "needs brokers: cargo xtask test"]
fn tail_from_a_time_on_kafka() {
    let kafka = format!("kafka://{}", kafka_host());
    let topic = unique("cli-from-time-");
    publish(
        &[
            &kafka,
            &topic,
            "before",
            "--type",
            "com.example.before",
            "--count",
            "2",
        ],
        None,
    );
    std::thread::sleep(Duration::from_millis(1100));
    let since = polybus::time::format_rfc3339(std::time::SystemTime::now());
    std::thread::sleep(Duration::from_millis(1100));
    publish(
        &[
            &kafka,
            &topic,
            "after",
            "--type",
            "com.example.after",
            "--count",
            "3",
        ],
        None,
    );
    // `tail --from <from> --json --count <count> --timeout <timeout>`: its exit code and events.
    let read = |from: &str, count: &str, timeout: &str| {
        let out = run(
            polybus().args([
                "tail",
                &kafka,
                &topic,
                "--from",
                from,
                "--json",
                "--count",
                count,
                "--timeout",
                timeout,
            ]),
            None,
        );
        let events = json_lines(&String::from_utf8(out.stdout).unwrap());
        (out.status.code(), events)
    };
    let types = |events: Vec<serde_json::Value>| {
        let mut t: Vec<String> = events
            .iter()
            .map(|e| e["type"].as_str().unwrap_or_default().to_owned())
            .collect();
        t.sort();
        t
    };
    // Asking for one more than there are: the three later events, then --timeout (exit 5),
    // so an earlier event delivered last would be seen too.
    let (code, events) = read(&since, "4", "4");
    assert_eq!(code, Some(5), "--from {since}");
    assert_eq!(types(events), ["com.example.after"; 3], "--from {since}");
    let mut all = vec!["com.example.after"; 3];
    all.extend(["com.example.before"; 2]);
    let (code, events) = read("1d", "5", "30");
    assert_eq!(code, Some(0), "--from 1d");
    assert_eq!(types(events), all);
}

/// Runs `command` in a pseudo-terminal (util-linux `script`), so the binary sees a terminal
/// on stdout; returns the child with the terminal's output on its stdout.
fn in_terminal(command: &str) -> Child {
    Command::new("script")
        .args(["-qefc", command, "/dev/null"])
        .env_remove("POLYBUS_USER")
        .env_remove("POLYBUS_PASSWORD")
        .env("TERM", "xterm-256color")
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("script (util-linux) to run a command in a pseudo-terminal")
}

#[test]
#[ignore = "needs brokers: cargo xtask test"]
fn a_terminal_session_shows_the_progress_bar_and_readable_blocks() {
    let bin = env!("CARGO_BIN_EXE_polybus");
    let url = format!("mqtt://{}", mqtt_host());
    let topic = unique("cli/terminal/");
    // Human tail on a terminal: bold topic lines, pretty-printed JSON.
    let mut tail = in_terminal(&format!(
        "{bin} tail {url} {topic} --count 2 --ready --timeout 60"
    ));
    let stdout = tail.stdout.take().unwrap();
    let (tx, rx) = mpsc::channel();
    std::thread::spawn(move || {
        for line in BufReader::new(stdout).lines().map_while(Result::ok) {
            if tx.send(line).is_err() {
                break;
            }
        }
    });
    let mut screen = Vec::new();
    while !screen.iter().any(|l: &String| l.contains("polybus: ready")) {
        match rx.recv_timeout(Duration::from_secs(60)) {
            Ok(l) => screen.push(l),
            Err(e) => panic!("tail in a terminal never became ready ({e}): {screen:?}"),
        }
    }
    publish(
        &[
            &url,
            &topic,
            r#"{"temp":21.5,"unit":"C"}"#,
            "--type",
            "com.example.reading",
            "-H",
            "site=lab",
        ],
        None,
    );
    publish(&[&url, &topic, "plain text"], None);
    let status = tail.wait().unwrap();
    screen.extend(rx.try_iter());
    let text = screen.join("\n");
    assert!(status.success(), "{text}");
    assert!(
        text.contains(&format!("\x1b[1m{topic}\x1b[0m")),
        "no bold topic: {text:?}"
    );
    assert!(text.contains("  type    com.example.reading"), "{text}");
    assert!(text.contains("  header  site: lab"), "{text}");
    assert!(text.contains("      \"temp\": 21.5,"), "{text}");
    assert!(text.contains("    plain text"), "{text}");

    // pub --count --rate on a terminal draws a progress bar on stdout.
    let pubbed = in_terminal(&format!(
        "{bin} pub {url} {topic}/load x --count 300 --rate 600"
    ))
    .wait_with_output()
    .unwrap();
    let text = String::from_utf8_lossy(&pubbed.stdout);
    assert!(pubbed.status.success(), "{text}");
    assert!(
        text.contains("300/300") && text.contains("[====="),
        "no progress bar: {text:?}"
    );
    assert!(text.contains("published 300 events"), "{text:?}");
}

#[tokio::test]
#[ignore = "needs brokers: cargo xtask test"]
async fn tls_flags_reach_a_nats_server_that_requires_tls() {
    let pki = polybus_testkit::tls::TestPki::generate().expect("test PKI");
    let conf = format!(
        "tls {{\n  cert_file: \"{}\"\n  key_file: \"{}\"\n}}\n",
        pki.server_cert().display(),
        pki.server_key().display()
    );
    let broker = polybus_testkit::brokers::BrokerProcess::nats(&conf)
        .await
        .expect("nats-server with TLS");
    let url = broker.url();
    let topic = unique("cli.tls.");
    let ca = pki.ca().display().to_string();
    // Trusting the test CA (flag, then environment): a round trip.
    let tail = Tail::start(&[&url, &topic, "--json", "--count", "2", "--tls-ca", &ca]);
    publish(&[&url, &topic, "over tls", "--tls-ca", &ca], None);
    let out = run(
        polybus()
            .env("POLYBUS_TLS_CA", &ca)
            .args(["pub", &url, &topic, "over tls too"]),
        None,
    );
    assert!(out.status.success(), "{out:?}");
    let events = json_lines(&tail.finish());
    assert_eq!(events[0]["data"], "over tls");
    assert_eq!(events[1]["data"], "over tls too");
    // Another CA: the server is not trusted, the broker is unreachable (exit 3).
    let other = pki.other_ca().display().to_string();
    let out = run(
        polybus().args(["pub", &url, &topic, "x", "--tls-ca", &other]),
        None,
    );
    assert_eq!(out.status.code(), Some(3), "{out:?}");
    // A missing file or half a client certificate is a usage error.
    let out = run(
        polybus().args(["pub", &url, &topic, "x", "--tls-ca", "/nonexistent.pem"]),
        None,
    );
    assert_eq!(out.status.code(), Some(2), "{out:?}");
    let out = run(
        polybus().args(["pub", &url, &topic, "x", "--tls-cert", &ca]),
        None,
    );
    assert_eq!(out.status.code(), Some(2), "{out:?}");
}
