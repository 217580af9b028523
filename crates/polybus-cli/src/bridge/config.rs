//! The bridge's config file: parsed and checked completely before anything connects, every
//! error with the file, line and column and the field at fault.

use std::collections::{BTreeMap, HashSet};
use std::net::SocketAddr;
use std::ops::Range;
use std::path::Path;
use std::time::Duration;

use serde::Deserialize;
use toml::Spanned;

use crate::common::{Failure, has_wildcards};

/// The schemes a route may use.
const SCHEMES: [&str; 5] = ["memory", "nats", "jetstream", "kafka", "mqtt"];

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawConfig {
    http: Option<RawHttp>,
    drain_timeout: Option<Spanned<f64>>,
    #[serde(rename = "route", default)]
    routes: Vec<Spanned<RawRoute>>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawHttp {
    listen: Spanned<String>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawRoute {
    name: Spanned<String>,
    from: Spanned<String>,
    topic: Spanned<String>,
    group: Option<String>,
    to: Spanned<String>,
    to_topic: Option<Spanned<String>>,
    key: Option<Spanned<String>>,
    #[serde(default)]
    types: Vec<Spanned<String>>,
    #[serde(default)]
    headers: BTreeMap<String, String>,
    concurrency: Option<Spanned<i64>>,
    attempts: Option<Spanned<i64>>,
    backoff: Option<Spanned<f64>>,
    max_backoff: Option<Spanned<f64>>,
    dead_letter: Option<Spanned<String>>,
    dead_letter_to: Option<Spanned<String>>,
    delivery: Option<Spanned<String>>,
    spool_dir: Option<Spanned<String>>,
    spool_capacity: Option<Spanned<i64>>,
}

/// A checked config.
#[derive(Debug, Clone)]
pub(crate) struct Config {
    pub(crate) listen: Option<SocketAddr>,
    pub(crate) drain_timeout: Duration,
    pub(crate) routes: Vec<RouteConfig>,
}

/// Where a route's dead letters go.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum DeadLetters {
    Off,
    /// A topic on the source backend (a template without placeholders but `{topic}`).
    Source(String),
    /// A topic on the sink backend.
    Sink(String),
}

/// How a route delivers (`delivery = ...`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum Delivery {
    /// `"at-least-once"` (the default): acked at the source after the sink acknowledged.
    AtLeastOnce,
    /// `"spool"`: acked at the source once durably in the route's spool (the composed bus's),
    /// which forwards to the sink (Kafka).
    Spool {
        dir: std::path::PathBuf,
        capacity: u64,
    },
}

/// One checked route.
#[derive(Debug, Clone)]
pub(crate) struct RouteConfig {
    pub(crate) name: String,
    pub(crate) from: String,
    pub(crate) topic: String,
    pub(crate) group: Option<String>,
    pub(crate) to: String,
    pub(crate) to_topic: Template,
    pub(crate) key: Option<Template>,
    pub(crate) types: Vec<String>,
    pub(crate) headers: Vec<(String, String)>,
    pub(crate) concurrency: usize,
    pub(crate) attempts: u32,
    pub(crate) backoff: Duration,
    pub(crate) max_backoff: Duration,
    pub(crate) dead_letters: DeadLetters,
    pub(crate) delivery: Delivery,
}

/// A part of a [`Template`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum Part {
    Lit(String),
    Topic,
    Segment(usize),
    Kind,
    Key,
    Source,
    Id,
    Header(String),
}

/// `text {placeholder} text`: placeholders `{topic}`, `{1}`..`{99}` (segments of the source
/// topic, split on `/` for MQTT and `.` elsewhere), `{type}`, `{key}`, `{source}`, `{id}`,
/// `{header.NAME}`. `{{` and `}}` are literal braces.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct Template {
    pub(crate) parts: Vec<Part>,
    pub(crate) text: String,
}

impl Template {
    pub(crate) fn parse(text: &str) -> Result<Self, String> {
        let mut parts = Vec::new();
        let mut lit = String::new();
        let mut chars = text.chars().peekable();
        while let Some(c) = chars.next() {
            match c {
                '{' if chars.peek() == Some(&'{') => {
                    chars.next();
                    lit.push('{');
                }
                '}' if chars.peek() == Some(&'}') => {
                    chars.next();
                    lit.push('}');
                }
                '}' => return Err("a lone `}` (write `}}` for a brace)".into()),
                '{' => {
                    let mut name = String::new();
                    loop {
                        match chars.next() {
                            Some('}') => break,
                            Some(c) => name.push(c),
                            None => return Err(format!("`{{{name}` is not closed with `}}`")),
                        }
                    }
                    if !lit.is_empty() {
                        parts.push(Part::Lit(std::mem::take(&mut lit)));
                    }
                    parts.push(match name.as_str() {
                        "topic" => Part::Topic,
                        "type" => Part::Kind,
                        "key" => Part::Key,
                        "source" => Part::Source,
                        "id" => Part::Id,
                        n if n.starts_with("header.") && n.len() > 7 => {
                            Part::Header(n[7..].to_owned())
                        }
                        n => match n.parse::<usize>() {
                            Ok(i) if (1..100).contains(&i) => Part::Segment(i),
                            _ => {
                                return Err(format!(
                                    "unknown placeholder `{{{n}}}`: use {{topic}}, {{1}}..{{99}} \
                                     (topic segments), {{type}}, {{key}}, {{source}}, {{id}} or \
                                     {{header.NAME}}"
                                ));
                            }
                        },
                    });
                }
                c => lit.push(c),
            }
        }
        if !lit.is_empty() {
            parts.push(Part::Lit(lit));
        }
        if parts.is_empty() {
            return Err("empty".into());
        }
        Ok(Template {
            parts,
            text: text.to_owned(),
        })
    }

    /// The text for one event; an error names the placeholder that has no value.
    pub(crate) fn render(
        &self,
        topic: &str,
        separator: char,
        event: &polybus::Event,
    ) -> Result<String, String> {
        let mut out = String::new();
        for p in &self.parts {
            match p {
                Part::Lit(s) => out.push_str(s),
                Part::Topic => out.push_str(topic),
                Part::Segment(i) => {
                    let seg = topic.split(separator).nth(i - 1).ok_or_else(|| {
                        format!("{{{i}}}: topic {topic:?} has fewer than {i} segments")
                    })?;
                    out.push_str(seg);
                }
                Part::Kind => out.push_str(event.kind()),
                Part::Source => out.push_str(event.source()),
                Part::Id => out.push_str(event.id()),
                Part::Key => {
                    let k = event.key().ok_or("{key}: the event has no key")?;
                    out.push_str(&String::from_utf8_lossy(k));
                }
                Part::Header(n) => {
                    let v = event
                        .headers()
                        .get(n)
                        .ok_or_else(|| format!("{{header.{n}}}: the event has no header {n}"))?;
                    out.push_str(v);
                }
            }
        }
        Ok(out)
    }
}

/// The separator of topic segments on a backend.
pub(crate) fn separator(url: &str) -> char {
    if url.starts_with("mqtt://") { '/' } else { '.' }
}

/// Line and column (1-based) of a byte offset.
fn line_col(text: &str, offset: usize) -> (usize, usize) {
    let before = &text[..offset.min(text.len())];
    let line = before.matches('\n').count() + 1;
    let col = before.rsplit('\n').next().map_or(0, |l| l.chars().count()) + 1;
    (line, col)
}

struct Checker<'a> {
    path: &'a Path,
    text: &'a str,
}

impl Checker<'_> {
    fn error(&self, span: Range<usize>, message: impl std::fmt::Display) -> Failure {
        let (line, col) = line_col(self.text, span.start);
        let source_line = self.text.lines().nth(line - 1).unwrap_or("");
        Failure::usage(format!(
            "{}:{line}:{col}: {message}\n  {line:>4} | {source_line}",
            self.path.display()
        ))
    }

    fn url(&self, route: &str, field: &str, url: &Spanned<String>) -> Result<String, Failure> {
        let scheme = url.get_ref().split_once("://").map(|(s, _)| s);
        match scheme {
            Some(s) if SCHEMES.contains(&s) => Ok(url.get_ref().clone()),
            Some(s) => Err(self.error(
                url.span(),
                format!(
                    "route {route:?}, field `{field}`: unknown scheme {s:?} (use {})",
                    SCHEMES.join(", ")
                ),
            )),
            None => Err(self.error(
                url.span(),
                format!(
                    "route {route:?}, field `{field}`: not a URL (scheme://[user:password@]host:port)"
                ),
            )),
        }
    }

    fn template(&self, route: &str, field: &str, t: &Spanned<String>) -> Result<Template, Failure> {
        Template::parse(t.get_ref())
            .map_err(|e| self.error(t.span(), format!("route {route:?}, field `{field}`: {e}")))
    }

    fn seconds(&self, route: &str, field: &str, v: &Spanned<f64>) -> Result<Duration, Failure> {
        let s = *v.get_ref();
        if s.is_finite() && (0.0..=86_400.0).contains(&s) {
            Ok(Duration::from_secs_f64(s))
        } else {
            Err(self.error(
                v.span(),
                format!("route {route:?}, field `{field}`: seconds from 0 to 86400"),
            ))
        }
    }

    fn count(&self, route: &str, field: &str, v: &Spanned<i64>, max: i64) -> Result<i64, Failure> {
        let n = *v.get_ref();
        if (1..=max).contains(&n) {
            Ok(n)
        } else {
            Err(self.error(
                v.span(),
                format!("route {route:?}, field `{field}`: a number from 1 to {max}"),
            ))
        }
    }

    fn route(&self, r: &Spanned<RawRoute>) -> Result<RouteConfig, Failure> {
        let raw = r.get_ref();
        let name = raw.name.get_ref().clone();
        if name.is_empty()
            || !name
                .chars()
                .all(|c| c.is_ascii_alphanumeric() || "-_.".contains(c))
        {
            return Err(self.error(
                raw.name.span(),
                "field `name`: letters, digits, `-`, `_` and `.` only (it labels metrics)",
            ));
        }
        let from = self.url(&name, "from", &raw.from)?;
        let to = self.url(&name, "to", &raw.to)?;
        let topic = raw.topic.get_ref().clone();
        if topic.is_empty() || topic.chars().any(|c| c.is_whitespace() || c.is_control()) {
            return Err(self.error(
                raw.topic.span(),
                format!("route {name:?}, field `topic`: empty or has whitespace"),
            ));
        }
        let to_topic = match &raw.to_topic {
            Some(t) => self.template(&name, "to_topic", t)?,
            None => Template::parse("{topic}").map_err(Failure::usage)?,
        };
        if has_wildcards(&to_topic.text) {
            let span = raw.to_topic.as_ref().map_or(r.span(), Spanned::span);
            return Err(self.error(
                span,
                format!("route {name:?}, field `to_topic`: a sink topic has no wildcards"),
            ));
        }
        let key = raw
            .key
            .as_ref()
            .map(|k| self.template(&name, "key", k))
            .transpose()?;
        let mut types = Vec::new();
        for t in &raw.types {
            let s = t.get_ref();
            if s.is_empty() || s[..s.len() - 1].contains('*') {
                return Err(self.error(
                    t.span(),
                    format!(
                        "route {name:?}, field `types`: a type, or a prefix ending in `*` \
                         (com.example.*)"
                    ),
                ));
            }
            types.push(s.clone());
        }
        let concurrency = match &raw.concurrency {
            Some(c) => self.count(&name, "concurrency", c, 1024)? as usize,
            None => 64,
        };
        let attempts = match &raw.attempts {
            Some(a) => self.count(&name, "attempts", a, 1000)? as u32,
            None => 5,
        };
        let backoff = match &raw.backoff {
            Some(b) => self.seconds(&name, "backoff", b)?,
            None => Duration::from_millis(200),
        };
        let max_backoff = match &raw.max_backoff {
            Some(b) => self.seconds(&name, "max_backoff", b)?,
            None => Duration::from_secs(30),
        };
        let dl_topic = match &raw.dead_letter {
            Some(t) if t.get_ref() == "off" => None,
            Some(t) => {
                let parsed = self.template(&name, "dead_letter", t)?;
                if parsed.parts.iter().any(|p| !matches!(p, Part::Lit(_))) {
                    return Err(self.error(
                        t.span(),
                        format!(
                            "route {name:?}, field `dead_letter`: a fixed topic name or \"off\" \
                             (the default is the source topic plus .dlq)"
                        ),
                    ));
                }
                Some(t.get_ref().clone())
            }
            None => Some(String::new()),
        };
        let dead_letters = match (dl_topic, raw.dead_letter_to.as_ref()) {
            (None, _) => DeadLetters::Off,
            (Some(t), None) => DeadLetters::Source(t),
            (Some(t), Some(to)) => match to.get_ref().as_str() {
                "source" => DeadLetters::Source(t),
                "sink" => DeadLetters::Sink(t),
                _ => {
                    return Err(self.error(
                        to.span(),
                        format!("route {name:?}, field `dead_letter_to`: \"source\" or \"sink\""),
                    ));
                }
            },
        };
        if matches!(&dead_letters, DeadLetters::Sink(t) if t.is_empty()) {
            let span = raw.dead_letter_to.as_ref().map_or(r.span(), Spanned::span);
            return Err(self.error(
                span,
                format!(
                    "route {name:?}, field `dead_letter_to`: dead letters on the sink need a \
                     fixed `dead_letter` topic"
                ),
            ));
        }
        let delivery = self.delivery(&name, raw, &to)?;
        if matches!(delivery, Delivery::Spool { .. }) && dead_letters == DeadLetters::Off {
            let span = raw.dead_letter.as_ref().map_or(r.span(), Spanned::span);
            return Err(self.error(
                span,
                format!(
                    "route {name:?}, field `dead_letter`: a spool route cannot turn dead letters \
                     off (the spool writes an event it cannot forward after `attempts` to the \
                     sink's dead-letter topic); give a topic or leave the field out"
                ),
            ));
        }
        Ok(RouteConfig {
            name,
            from,
            topic,
            group: raw.group.clone(),
            to,
            to_topic,
            key,
            types,
            headers: raw
                .headers
                .iter()
                .map(|(k, v)| (k.clone(), v.clone()))
                .collect(),
            concurrency,
            attempts,
            backoff,
            max_backoff,
            dead_letters,
            delivery,
        })
    }

    fn delivery(&self, name: &str, raw: &RawRoute, to: &str) -> Result<Delivery, Failure> {
        let spool = match &raw.delivery {
            None => false,
            Some(d) => match d.get_ref().as_str() {
                "at-least-once" => false,
                "spool" => true,
                _ => {
                    return Err(self.error(
                        d.span(),
                        format!(
                            "route {name:?}, field `delivery`: \"at-least-once\" (the default) or \
                             \"spool\""
                        ),
                    ));
                }
            },
        };
        if !spool {
            let stray = [
                raw.spool_dir.as_ref().map(|d| ("spool_dir", d.span())),
                raw.spool_capacity
                    .as_ref()
                    .map(|c| ("spool_capacity", c.span())),
            ];
            if let Some((field, span)) = stray.into_iter().flatten().next() {
                return Err(self.error(
                    span,
                    format!(
                        "route {name:?}, field `{field}`: only for delivery = \"spool\" (this \
                         route is at-least-once)"
                    ),
                ));
            }
            return Ok(Delivery::AtLeastOnce);
        }
        let delivery_span = raw.delivery.as_ref().map_or(0..0, Spanned::span);
        if !to.starts_with("kafka://") {
            let scheme = to.split_once("://").map_or(to, |(s, _)| s);
            return Err(self.error(
                delivery_span,
                format!(
                    "route {name:?}, field `delivery`: \"spool\" forwards to Kafka only (the \
                     composed bus's spool is the durable edge in front of Kafka), and `to` is \
                     {scheme}://; use delivery = \"at-least-once\" for this sink"
                ),
            ));
        }
        let Some(dir) = &raw.spool_dir else {
            return Err(self.error(
                delivery_span,
                format!(
                    "route {name:?}, field `delivery`: \"spool\" needs `spool_dir`, a directory \
                     of this route's own that survives restarts"
                ),
            ));
        };
        if dir.get_ref().trim().is_empty() {
            return Err(self.error(
                dir.span(),
                format!("route {name:?}, field `spool_dir`: empty"),
            ));
        }
        let capacity = match &raw.spool_capacity {
            Some(c) => self.count(name, "spool_capacity", c, 1_000_000_000)? as u64,
            None => 1_000_000,
        };
        Ok(Delivery::Spool {
            dir: std::path::PathBuf::from(dir.get_ref()),
            capacity,
        })
    }
}

/// Parses and checks a config file's text.
pub(crate) fn parse(path: &Path, text: &str) -> Result<Config, Failure> {
    let checker = Checker { path, text };
    let raw: RawConfig = toml::from_str(text).map_err(|e| {
        let span = e.span().unwrap_or(0..0);
        checker.error(span, e.message().trim_end())
    })?;
    if raw.routes.is_empty() {
        return Err(Failure::usage(format!(
            "{}: no [[route]]: a bridge needs at least one",
            path.display()
        )));
    }
    let listen = match &raw.http {
        Some(h) => Some(h.listen.get_ref().parse::<SocketAddr>().map_err(|e| {
            checker.error(
                h.listen.span(),
                format!("[http] field `listen`: {e} (host:port, e.g. 127.0.0.1:9464)"),
            )
        })?),
        None => None,
    };
    let drain_timeout = match &raw.drain_timeout {
        Some(d) => checker.seconds("(top level)", "drain_timeout", d)?,
        None => Duration::from_secs(10),
    };
    let mut names = HashSet::new();
    let mut spools = HashSet::new();
    let mut routes = Vec::new();
    for r in &raw.routes {
        let route = checker.route(r)?;
        if !names.insert(route.name.clone()) {
            return Err(checker.error(
                r.get_ref().name.span(),
                format!("field `name`: a second route named {:?}", route.name),
            ));
        }
        if let (Delivery::Spool { dir, .. }, Some(span)) = (
            &route.delivery,
            r.get_ref().spool_dir.as_ref().map(Spanned::span),
        ) && !spools.insert(dir.clone())
        {
            return Err(checker.error(
                span,
                format!(
                    "route {:?}, field `spool_dir`: another route's spool is there already (a \
                     spool belongs to one route)",
                    route.name
                ),
            ));
        }
        routes.push(route);
    }
    Ok(Config {
        listen,
        drain_timeout,
        routes,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn err(text: &str) -> String {
        parse(Path::new("b.toml"), text).unwrap_err().message
    }

    const OK: &str = r#"
drain_timeout = 5
[http]
listen = "127.0.0.1:0"

[[route]]
name = "sensors"
from = "mqtt://127.0.0.1:1883?client_id=b1&session_expiry=600"
topic = "sensors/+/temp"
to = "kafka://127.0.0.1:9092"
to_topic = "sensors-{2}"
key = "{2}"
types = ["com.example.*"]
headers = { region = "eu" }
dead_letter = "sensors.dead"
"#;

    #[test]
    fn a_good_config_parses() {
        let c = parse(Path::new("b.toml"), OK).unwrap();
        assert_eq!(c.routes.len(), 1);
        let r = &c.routes[0];
        assert_eq!(
            r.to_topic.parts,
            [Part::Lit("sensors-".into()), Part::Segment(2)]
        );
        assert_eq!(r.dead_letters, DeadLetters::Source("sensors.dead".into()));
        assert_eq!(c.drain_timeout, Duration::from_secs(5));
        assert_eq!(r.concurrency, 64);
    }

    #[test]
    fn errors_name_the_line_and_the_field() {
        let bad = OK.replace("kafka://", "kafak://");
        let e = err(&bad);
        assert!(
            e.starts_with("b.toml:10:6: route \"sensors\", field `to`"),
            "{e}"
        );
        assert!(e.contains("unknown scheme \"kafak\""), "{e}");
        let e = err(&OK.replace("sensors-{2}", "sensors-{seg}"));
        assert!(
            e.starts_with("b.toml:11:12:") && e.contains("`to_topic`"),
            "{e}"
        );
        let e = err(&OK.replace("to_topic", "to_topik"));
        assert!(
            e.starts_with("b.toml:11:1:") && e.contains("to_topik"),
            "{e}"
        );
        let e = err(&OK.replace("127.0.0.1:0", "localhost"));
        assert!(
            e.starts_with("b.toml:4:10:") && e.contains("`listen`"),
            "{e}"
        );
        let e = err(&OK.replace("types = [", "types = [\"a*b\", "));
        assert!(e.starts_with("b.toml:13:10:"), "{e}");
        let e = err("[[route]]\nname = \"x\"\n");
        assert!(e.contains("missing field `from`"), "{e}");
        let e = err(&format!("{OK}\n{}", &OK[OK.find("[[route]]").unwrap()..]));
        assert!(e.contains("a second route named"), "{e}");
    }

    const SPOOL: &str = r#"
[[route]]
name = "s"
from = "mqtt://127.0.0.1:1883?client_id=b2&session_expiry=600"
topic = "a/+"
to = "kafka://127.0.0.1:9092"
to_topic = "a-{2}"
delivery = "spool"
spool_dir = "/var/lib/polybus/s"
"#;

    #[test]
    fn a_spool_route_parses_and_its_mistakes_name_line_and_field() {
        let c = parse(Path::new("b.toml"), SPOOL).unwrap();
        assert_eq!(
            c.routes[0].delivery,
            Delivery::Spool {
                dir: "/var/lib/polybus/s".into(),
                capacity: 1_000_000
            }
        );
        let c = parse(
            Path::new("b.toml"),
            &format!("{SPOOL}spool_capacity = 50\n"),
        )
        .unwrap();
        assert!(matches!(
            c.routes[0].delivery,
            Delivery::Spool { capacity: 50, .. }
        ));
        assert_eq!(
            parse(Path::new("b.toml"), OK).unwrap().routes[0].delivery,
            Delivery::AtLeastOnce
        );

        let e = err(&SPOOL.replace("kafka://", "mqtt://"));
        assert!(
            e.starts_with("b.toml:8:12: route \"s\", field `delivery`")
                && e.contains("Kafka only")
                && e.contains("mqtt://"),
            "{e}"
        );
        let e = err(&SPOOL.replace("spool_dir = \"/var/lib/polybus/s\"\n", ""));
        assert!(
            e.starts_with("b.toml:8:12:") && e.contains("needs `spool_dir`"),
            "{e}"
        );
        let e = err(&SPOOL.replace("\"spool\"", "\"spoool\""));
        assert!(
            e.starts_with("b.toml:8:12:") && e.contains("\"at-least-once\""),
            "{e}"
        );
        let e = err(&SPOOL.replace("delivery = \"spool\"\n", ""));
        assert!(
            e.starts_with("b.toml:8:13: route \"s\", field `spool_dir`")
                && e.contains("only for delivery = \"spool\""),
            "{e}"
        );
        let e = err(&format!("{SPOOL}dead_letter = \"off\"\n"));
        assert!(
            e.starts_with("b.toml:10:15:") && e.contains("cannot turn dead letters"),
            "{e}"
        );
        let e = err(&format!("{SPOOL}spool_capacity = 0\n"));
        assert!(e.starts_with("b.toml:10:18:"), "{e}");
        let second = SPOOL.replace("name = \"s\"", "name = \"t\"");
        let e = err(&format!("{SPOOL}{second}"));
        assert!(
            e.starts_with("b.toml:18:13: route \"t\", field `spool_dir`")
                && e.contains("another route's spool"),
            "{e}"
        );
    }

    #[test]
    fn templates_render_segments_headers_and_fail_on_missing_values() {
        let t = Template::parse("{1}-{3}.{header.region}{{x}}").unwrap();
        let ev = polybus::Event::builder()
            .header("region", "eu")
            .build()
            .unwrap();
        assert_eq!(t.render("a/b/c", '/', &ev).unwrap(), "a-c.eu{x}");
        assert!(
            t.render("a/b", '/', &ev)
                .unwrap_err()
                .contains("fewer than 3")
        );
        assert!(Template::parse("{key").is_err());
        assert!(Template::parse("}").is_err());
        let k = Template::parse("{key}").unwrap();
        assert!(k.render("t", '.', &ev).is_err());
    }
}
