//! What runs: the workloads, their sizes in the full and the `--quick` mode, and the sides.

use serde::{Deserialize, Serialize};

/// Who does the work in one run.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub(crate) enum Side {
    /// The polybus adapter through its public API.
    Polybus,
    /// The raw client underneath, sending the same CloudEvents headers.
    Raw,
    /// The cheapest raw program carrying the CloudEvents binding: the raw client cloning one
    /// prebuilt map of every header (id and time included) per message and writing a fresh
    /// id and time into the clone (the bar for polybus' full mode, issue 16).
    Template,
    /// The raw client sending the payload without any header (shows what the CloudEvents
    /// headers cost; the bar for polybus' lean wire format).
    Bare,
    /// polybus with the lean wire format (`WireFormat::Lean`: the payload and what the caller
    /// set, no CloudEvents envelope).
    Lean,
    /// The peer: RustStream (`ruststream` + `ruststream-nats`), which writes the payload only.
    #[serde(rename = "ruststream")]
    RustStream,
}

impl Side {
    pub(crate) fn name(self) -> &'static str {
        match self {
            Side::Polybus => "polybus",
            Side::Raw => "raw",
            Side::Template => "template",
            Side::Bare => "bare",
            Side::Lean => "lean",
            Side::RustStream => "ruststream",
        }
    }

    /// Every side, in the order of the tables and plots.
    pub(crate) const ALL: [Side; 6] = [
        Side::Polybus,
        Side::Raw,
        Side::Template,
        Side::Lean,
        Side::Bare,
        Side::RustStream,
    ];
}

/// The kind of work a step does; `child` dispatches on it.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub(crate) enum Kind {
    /// Core NATS publish, no subscriber: publish N, then flush.
    NatsPublish,
    /// Core NATS publish-to-receive: a raw publisher (same for both sides) and the subscriber
    /// under test; the publisher stays at most a window ahead of the subscriber.
    NatsSubscribe,
    /// Core NATS publish-to-handler: the side's publisher and subscriber, the handler decoding
    /// the JSON payload; the publisher stays at most a window ahead of the handler.
    NatsHandler,
    /// Core NATS request-reply round trips, one at a time.
    NatsRequestReply,
    /// JetStream publish, each publish awaiting the stream's ack, `window` in flight.
    JsPublish,
    /// JetStream pull consume of what `JsPublish` stored, ack each.
    JsConsume,
    /// Kafka produce, each record awaiting its delivery report, `window` in flight.
    KafkaProduce,
    /// Kafka consumer-group consume of what `KafkaProduce` wrote, ack (store offset) each.
    KafkaConsume,
    /// MQTT 5 publish-to-receive at QoS 0 (publisher and subscriber on the side under test).
    MqttQos0,
    /// MQTT 5 publish-to-receive at QoS 1, acked by the subscriber.
    MqttQos1,
    /// The composed bus: `Bus::publish` (JetStream + spool, forwarded to Kafka) against the
    /// raw Kafka producer, `window` in flight.
    ComposePublish,
    /// JetStream `publish_batch` of `window` events at a time (polybus side) against single
    /// publishes of the same publisher with `window` in flight (raw side).
    JsBatch,
    /// Kafka `publish_batch` of `window` events at a time (polybus side) against single
    /// publishes of the same producer with `window` in flight (raw side).
    KafkaBatch,
    /// polybus-runtime on JetStream: the `App` at concurrency 1 (polybus side) against a
    /// hand-written consume loop on the same polybus consumer (raw side), decoding each event.
    RuntimeLoop,
    /// polybus-runtime on JetStream, a handler that waits 1 ms: the `App` at concurrency 8
    /// (polybus side) against the same `App` at concurrency 1 (raw side), per-key order
    /// checked (a violation fails the run).
    RuntimeConcurrent,
}

impl Kind {
    /// Whether the step records a latency histogram (publish-to-ack or round trip).
    pub(crate) fn has_latency(self) -> bool {
        matches!(
            self,
            Kind::NatsRequestReply
                | Kind::JsPublish
                | Kind::KafkaProduce
                | Kind::MqttQos0
                | Kind::MqttQos1
                | Kind::ComposePublish
        )
    }

    /// What the latency of this step is.
    pub(crate) fn latency_label(self) -> &'static str {
        match self {
            Kind::NatsRequestReply => "round trip",
            Kind::MqttQos0 | Kind::MqttQos1 => "publish-to-receive",
            _ => "publish-to-ack",
        }
    }
}

/// One measured step: one child process per side and round.
#[derive(Clone, Debug)]
pub(crate) struct Step {
    pub(crate) id: &'static str,
    pub(crate) title: &'static str,
    pub(crate) kind: Kind,
    pub(crate) messages: u64,
    pub(crate) size: usize,
    /// Publishes (or requests) in flight at once; 1 = one at a time.
    pub(crate) window: usize,
    /// Throughput target: polybus >= this x raw.
    pub(crate) throughput_target: f64,
    /// Sides of the group that skip this step (a peer without the operation).
    pub(crate) skip: &'static [Side],
}

impl Step {
    /// Whether `side` runs this step.
    pub(crate) fn runs(&self, side: Side) -> bool {
        !self.skip.contains(&side)
    }
}

/// Steps that run back to back for one side (a consume reads what the publish before it
/// stored), with the sides alternating round by round.
#[derive(Clone, Debug)]
pub(crate) struct Group {
    pub(crate) id: &'static str,
    pub(crate) sides: &'static [Side],
    pub(crate) steps: Vec<Step>,
}

const AB: &[Side] = &[Side::Polybus, Side::Raw];
/// polybus in both wire formats, the raw client with the same headers and payload only, and
/// the peer.
const ALL: &[Side] = &[
    Side::Polybus,
    Side::Raw,
    Side::Lean,
    Side::Bare,
    Side::RustStream,
];
/// polybus in both wire formats, the raw client with the same headers and payload only, and
/// the peer (RustStream's Kafka transport): [`ALL`].
const KAFKA: &[Side] = ALL;
/// [`ALL`] and the raw client cloning a prebuilt map of every header (core NATS).
const NATS_ALL: &[Side] = &Side::ALL;
/// The sides a JetStream consume step skips: RustStream's pull consumer is not measured yet.
const NO_PEER: &[Side] = &[Side::RustStream];

/// Rounds per workload: full and quick.
pub(crate) const ROUNDS: (usize, usize) = (3, 2);

/// The workloads. `quick` divides message counts (by 5 to 10).
pub(crate) fn groups(quick: bool) -> Vec<Group> {
    let n = |full: u64, quick_n: u64| if quick { quick_n } else { full };
    let step = |id, title, kind, messages, size, window| Step {
        id,
        title,
        kind,
        messages,
        size,
        window,
        throughput_target: crate::report::THROUGHPUT_TARGET,
        skip: &[],
    };
    vec![
        Group {
            id: "nats.pub.64",
            sides: NATS_ALL,
            steps: vec![step(
                "nats.pub.64",
                "NATS publish 64 B",
                Kind::NatsPublish,
                n(1_000_000, 200_000),
                64,
                1,
            )],
        },
        Group {
            id: "nats.pub.1k",
            sides: NATS_ALL,
            steps: vec![step(
                "nats.pub.1k",
                "NATS publish 1 KiB",
                Kind::NatsPublish,
                n(1_000_000, 200_000),
                1024,
                1,
            )],
        },
        Group {
            id: "nats.sub.64",
            sides: AB,
            steps: vec![step(
                "nats.sub.64",
                "NATS subscribe 64 B",
                Kind::NatsSubscribe,
                n(1_000_000, 200_000),
                64,
                32_768,
            )],
        },
        Group {
            id: "nats.sub.1k",
            sides: AB,
            steps: vec![step(
                "nats.sub.1k",
                "NATS subscribe 1 KiB",
                Kind::NatsSubscribe,
                n(1_000_000, 200_000),
                1024,
                32_768,
            )],
        },
        Group {
            id: "nats.handler",
            sides: NATS_ALL,
            steps: vec![step(
                "nats.handler",
                "NATS publish -> handler (JSON) 64 B",
                Kind::NatsHandler,
                n(1_000_000, 100_000),
                64,
                32_768,
            )],
        },
        Group {
            id: "nats.reqrep",
            sides: AB,
            steps: vec![step(
                "nats.reqrep",
                "NATS request-reply 64 B",
                Kind::NatsRequestReply,
                n(20_000, 5_000),
                64,
                1,
            )],
        },
        Group {
            id: "jetstream",
            sides: ALL,
            steps: vec![
                step(
                    "js.publish",
                    "JetStream publish-with-ack 64 B",
                    Kind::JsPublish,
                    n(200_000, 40_000),
                    64,
                    256,
                ),
                Step {
                    skip: NO_PEER,
                    ..step(
                        "js.consume",
                        "JetStream pull-consume-with-ack 64 B",
                        Kind::JsConsume,
                        n(200_000, 40_000),
                        64,
                        1,
                    )
                },
            ],
        },
        Group {
            id: "kafka",
            sides: KAFKA,
            steps: vec![
                step(
                    "kafka.produce",
                    "Kafka produce 64 B",
                    Kind::KafkaProduce,
                    n(1_000_000, 100_000),
                    64,
                    10_000,
                ),
                step(
                    "kafka.consume",
                    "Kafka group consume 64 B",
                    Kind::KafkaConsume,
                    n(1_000_000, 100_000),
                    64,
                    1,
                ),
            ],
        },
        Group {
            id: "mqtt.qos0",
            sides: AB,
            steps: vec![step(
                "mqtt.qos0",
                "MQTT QoS 0 publish-to-receive 64 B",
                Kind::MqttQos0,
                n(200_000, 40_000),
                64,
                1024,
            )],
        },
        Group {
            id: "mqtt.qos1",
            sides: AB,
            steps: vec![step(
                "mqtt.qos1",
                "MQTT QoS 1 publish-to-receive 64 B",
                Kind::MqttQos1,
                n(200_000, 40_000),
                64,
                1024,
            )],
        },
        Group {
            id: "compose",
            sides: AB,
            steps: vec![Step {
                throughput_target: COMPOSE_TARGET,
                ..step(
                    "compose.publish",
                    "Bus publish 64 B (raw: Kafka producer)",
                    Kind::ComposePublish,
                    n(1_000_000, 30_000),
                    64,
                    256,
                )
            }],
        },
        Group {
            id: "js.batch",
            sides: AB,
            steps: vec![Step {
                throughput_target: 1.0,
                ..step(
                    "js.batch",
                    "JetStream publish_batch 64 B (raw: single publishes, same window)",
                    Kind::JsBatch,
                    n(200_000, 40_000),
                    64,
                    256,
                )
            }],
        },
        Group {
            id: "kafka.batch",
            sides: AB,
            steps: vec![Step {
                throughput_target: 1.0,
                ..step(
                    "kafka.batch",
                    "Kafka publish_batch 64 B (raw: single publishes, same window)",
                    Kind::KafkaBatch,
                    n(1_000_000, 100_000),
                    64,
                    10_000,
                )
            }],
        },
        Group {
            id: "runtime.c1",
            sides: AB,
            steps: vec![step(
                "runtime.c1",
                "JetStream runtime App c1 (raw: hand-written loop)",
                Kind::RuntimeLoop,
                n(200_000, 40_000),
                32,
                1,
            )],
        },
        Group {
            id: "runtime.c1.b256",
            sides: AB,
            steps: vec![step(
                "runtime.c1.b256",
                "JetStream runtime App c1 buffer 256 (raw: hand-written loop)",
                Kind::RuntimeLoop,
                n(200_000, 40_000),
                32,
                256,
            )],
        },
        Group {
            id: "runtime.c8",
            sides: AB,
            steps: vec![Step {
                throughput_target: RUNTIME_CONCURRENCY_TARGET,
                ..step(
                    "runtime.c8",
                    "JetStream runtime 1 ms handler c8 (raw: App c1)",
                    Kind::RuntimeConcurrent,
                    n(10_000, 3_000),
                    32,
                    8,
                )
            }],
        },
    ]
}

/// The runtime at concurrency 8 against itself at concurrency 1, 1 ms handler: >= 6 x
/// (issue 15).
pub(crate) const RUNTIME_CONCURRENCY_TARGET: f64 = 6.0;

/// The composed bus against the raw Kafka producer: >= 0.8 x (DESIGN.md).
pub(crate) const COMPOSE_TARGET: f64 = 0.8;

/// Prints the workloads (`loadgen list`).
pub(crate) fn list() {
    for (mode, quick) in [("full", false), ("quick", true)] {
        let rounds = if quick { ROUNDS.1 } else { ROUNDS.0 };
        println!("{mode} ({rounds} rounds):");
        for g in groups(quick) {
            let sides: Vec<_> = g.sides.iter().map(|s| s.name()).collect();
            println!("  {} [{}]", g.id, sides.join(", "));
            for s in &g.steps {
                let skip: Vec<_> = s.skip.iter().map(|s| s.name()).collect();
                if !skip.is_empty() {
                    println!("    (not for {})", skip.join(", "));
                }
                println!(
                    "    {:<14} {:>9} x {:>5} B, window {:>6}  {}",
                    s.id, s.messages, s.size, s.window, s.title
                );
            }
        }
    }
}
