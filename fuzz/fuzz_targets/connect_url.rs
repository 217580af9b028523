//! `polybus::connect` URLs: errors are typed, and nothing shown (the redacted URL, `Debug`,
//! credential and connect errors) depends on the password: the same URL with the password
//! replaced shows exactly the same text. `connect` itself runs too (no backend features: only
//! `memory://` connects, everything else is a typed error).
#![no_main]
use std::sync::OnceLock;

use libfuzzer_sys::fuzz_target;
use polybus::ErrorKind;
use polybus::fuzzing::parse_url;

fn runtime() -> &'static tokio::runtime::Runtime {
    static RT: OnceLock<tokio::runtime::Runtime> = OnceLock::new();
    RT.get_or_init(|| {
        tokio::runtime::Builder::new_current_thread()
            .build()
            .expect("a current-thread runtime")
    })
}

/// Where the password sits in `url`: `scheme://user:PASSWORD@host?query` (the authority ends at
/// the first `?`, trailing `/` dropped; the user part ends at its last `@`, the user at the
/// first `:`).
fn password_span(url: &str) -> Option<std::ops::Range<usize>> {
    let start = url.find("://")? + 3;
    let rest = &url[start..];
    let authority = rest.split_once('?').map_or(rest, |(a, _)| a);
    let authority = authority.trim_end_matches('/');
    let at = authority.rfind('@')?;
    let colon = authority[..at].find(':')?;
    Some(start + colon + 1..start + at)
}

/// Everything shown about `url`.
fn shown(url: &str) -> Vec<String> {
    let mut out = Vec::new();
    match parse_url(url) {
        Ok(u) => {
            out.push(u.redacted.clone());
            out.push(u.debug.clone());
            out.push(match &u.credentials {
                Ok(c) => format!("credentials: user {:?}", c.as_ref().map(|(user, _)| user)),
                Err(e) => e.clone(),
            });
        }
        Err(e) => {
            assert_eq!(e.kind(), ErrorKind::Connect, "{e:?}");
            out.push(e.to_string());
        }
    }
    if url.len() <= 512 {
        match runtime().block_on(polybus::connect(url)) {
            Ok(_) => assert!(url.starts_with("memory://"), "connected to {url:?}"),
            Err(e) => {
                assert!(
                    matches!(e.kind(), ErrorKind::Connect | ErrorKind::Unsupported),
                    "{e:?}"
                );
                out.push(format!("{e} {e:?}"));
            }
        }
    }
    out
}

fuzz_target!(|data: &[u8]| {
    let Ok(url) = std::str::from_utf8(data) else {
        return;
    };
    let a = shown(url);
    let Some(span) = password_span(url) else {
        return;
    };
    if let Ok(u) = parse_url(url) {
        assert!(u.authority.contains(&url[span.clone()]));
    }
    let other = format!(
        "{}{}{}",
        &url[..span.start],
        "Q".repeat(span.len().min(4) + 1),
        &url[span.end..]
    );
    let b = shown(&other);
    // A password with bad percent-encoding gives an error where `Q`s do not: compare what both show.
    let n = a.len().min(b.len());
    for (x, y) in a.iter().zip(&b).take(n) {
        if x.starts_with("bad percent-encoding") || y.starts_with("bad percent-encoding") {
            continue;
        }
        if x.starts_with("credentials:") != y.starts_with("credentials:") {
            continue;
        }
        assert_eq!(x, y, "what is shown depends on the password of {url:?}");
    }
});
