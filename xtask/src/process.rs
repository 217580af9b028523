//! Pid files and stopping exactly the processes we started.
//!
//! A pid is only trusted while `/proc/<pid>/cmdline` still names the broker binary: a stale pid
//! file (broker gone, pid reused by something else) is removed, never acted on. Nothing here
//! kills by name.

use std::{
    fs,
    path::{Path, PathBuf},
    process::Command,
    thread,
    time::{Duration, Instant},
};

use anyhow::{Context, Result, bail};

/// What a pid file says, after checking it against `/proc`.
#[derive(Debug, PartialEq, Eq)]
pub(crate) enum PidState {
    /// No pid file.
    Missing,
    /// A pid file whose process is gone or is no longer the broker binary.
    Stale {
        /// The recorded pid.
        pid: u32,
        /// Why it is stale, for the user.
        reason: String,
    },
    /// The recorded process is alive and runs the broker binary.
    Running(u32),
}

/// Parses a pid file's contents: one positive decimal number, surrounding whitespace allowed.
pub(crate) fn parse_pid(contents: &str) -> Option<u32> {
    contents.trim().parse::<u32>().ok().filter(|&pid| pid > 1)
}

/// Whether a raw `/proc/<pid>/cmdline` (NUL-separated argv) runs `bin`: `argv[0]` is `bin` itself
/// or has the same file name (a process may have been started through a symlink or PATH).
pub(crate) fn cmdline_matches(cmdline: &[u8], bin: &Path) -> bool {
    let Some(argv0) = cmdline.split(|&b| b == 0).next().filter(|a| !a.is_empty()) else {
        return false; // zombies and kernel threads have an empty cmdline
    };
    let Ok(argv0) = std::str::from_utf8(argv0) else {
        return false;
    };
    let argv0 = Path::new(argv0);
    argv0 == bin || (argv0.file_name().is_some() && argv0.file_name() == bin.file_name())
}

/// The state letter from a `/proc/<pid>/stat` line (`pid (comm) S ...`; comm may contain
/// spaces and parentheses, so look after the last `)`).
pub(crate) fn stat_state(stat: &str) -> Option<char> {
    stat.rsplit_once(')')?.1.trim_start().chars().next()
}

/// Whether `pid` exists and is not a zombie.
pub(crate) fn is_alive(pid: u32) -> bool {
    match fs::read_to_string(format!("/proc/{pid}/stat")) {
        Ok(stat) => !matches!(stat_state(&stat), Some('Z' | 'X') | None),
        Err(_) => false,
    }
}

/// Checks a pid file against `/proc`.
pub(crate) fn check(pid_file: &Path, bin: &Path) -> Result<PidState> {
    let contents = match fs::read_to_string(pid_file) {
        Ok(c) => c,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(PidState::Missing),
        Err(e) => return Err(e).with_context(|| format!("reading {}", pid_file.display())),
    };
    let Some(pid) = parse_pid(&contents) else {
        return Ok(PidState::Stale {
            pid: 0,
            reason: format!("{} does not hold a pid: {contents:?}", pid_file.display()),
        });
    };
    Ok(classify(
        pid,
        is_alive(pid),
        fs::read(format!("/proc/{pid}/cmdline")).ok(),
        bin,
    ))
}

/// The decision behind [`check`], separated from `/proc` so it can be tested.
fn classify(pid: u32, alive: bool, cmdline: Option<Vec<u8>>, bin: &Path) -> PidState {
    if !alive {
        return PidState::Stale {
            pid,
            reason: format!("pid {pid} is no longer running"),
        };
    }
    match cmdline {
        Some(c) if cmdline_matches(&c, bin) => PidState::Running(pid),
        Some(c) => PidState::Stale {
            pid,
            reason: format!(
                "pid {pid} now runs `{}`, not {}",
                String::from_utf8_lossy(&c).replace('\0', " ").trim(),
                bin.display()
            ),
        },
        None => PidState::Stale {
            pid,
            reason: format!("pid {pid} is no longer running"),
        },
    }
}

/// Writes a pid file (and its directory).
pub(crate) fn write_pid_file(pid_file: &Path, pid: u32) -> Result<()> {
    if let Some(dir) = pid_file.parent() {
        fs::create_dir_all(dir)?;
    }
    fs::write(pid_file, format!("{pid}\n"))
        .with_context(|| format!("writing {}", pid_file.display()))
}

/// Removes files, ignoring the ones already gone.
pub(crate) fn remove_files(files: &[PathBuf]) -> Result<()> {
    for file in files {
        match fs::remove_file(file) {
            Err(e) if e.kind() != std::io::ErrorKind::NotFound => {
                return Err(e).with_context(|| format!("removing {}", file.display()));
            }
            _ => {}
        }
    }
    Ok(())
}

/// Stops `pid`, which must still run `bin`: SIGTERM, wait up to `grace`, then SIGKILL.
pub(crate) fn terminate(pid: u32, bin: &Path, grace: Duration) -> Result<()> {
    let cmdline = fs::read(format!("/proc/{pid}/cmdline")).unwrap_or_default();
    if !is_alive(pid) {
        return Ok(());
    }
    if !cmdline_matches(&cmdline, bin) {
        bail!(
            "refusing to signal pid {pid}: it does not run {}",
            bin.display()
        );
    }
    signal(pid, "TERM")?;
    if wait_gone(pid, grace) {
        return Ok(());
    }
    println!(
        "    pid {pid} still running after {}s, sending SIGKILL",
        grace.as_secs()
    );
    signal(pid, "KILL")?;
    if wait_gone(pid, Duration::from_secs(5)) {
        return Ok(());
    }
    bail!("pid {pid} ({}) survived SIGKILL", bin.display())
}

fn signal(pid: u32, signal: &str) -> Result<()> {
    // `kill(1)` rather than libc: this crate forbids unsafe code and adds no dependencies.
    let status = Command::new("kill")
        .args(["-s", signal, &pid.to_string()])
        .status()
        .context("running kill(1)")?;
    if !status.success() && is_alive(pid) {
        bail!("kill -s {signal} {pid} failed ({status})");
    }
    Ok(())
}

fn wait_gone(pid: u32, timeout: Duration) -> bool {
    let deadline = Instant::now() + timeout;
    while Instant::now() < deadline {
        if !is_alive(pid) {
            return true;
        }
        thread::sleep(Duration::from_millis(100));
    }
    !is_alive(pid)
}

#[cfg(test)]
mod tests {
    use super::*;

    const TANSU: &str = "/home/u/.cache/polybus/tansu/bin/tansu";

    #[test]
    fn pid_file_contents() {
        assert_eq!(parse_pid("1234\n"), Some(1234));
        assert_eq!(parse_pid("  42 "), Some(42));
        assert_eq!(parse_pid(""), None);
        assert_eq!(parse_pid("1"), None, "never signal init");
        assert_eq!(parse_pid("0"), None);
        assert_eq!(parse_pid("-5"), None);
        assert_eq!(parse_pid("12 34"), None);
        assert_eq!(parse_pid("nats"), None);
    }

    #[test]
    fn cmdline() {
        let bin = Path::new(TANSU);
        assert!(cmdline_matches(
            b"/home/u/.cache/polybus/tansu/bin/tansu\0broker\0--listener-url\0tcp://127.0.0.1:9092\0",
            bin
        ));
        assert!(cmdline_matches(b"tansu\0broker\0", bin), "same file name");
        assert!(!cmdline_matches(b"", bin), "zombie");
        assert!(!cmdline_matches(b"\0", bin));
        assert!(
            !cmdline_matches(b"/usr/bin/python3\0tansu\0", bin),
            "only argv[0] counts"
        );
        assert!(!cmdline_matches(b"/usr/sbin/mosquitto\0-c\0x.conf\0", bin));
        assert!(!cmdline_matches(b"/opt/tansu-old/bin/tansu2\0", bin));
        assert!(cmdline_matches(
            b"/usr/sbin/mosquitto\0-c\0/c/run/mqtt/mosquitto.conf\0",
            Path::new("/usr/sbin/mosquitto")
        ));
    }

    #[test]
    fn stat_line() {
        assert_eq!(stat_state("123 (nats-server) S 1 123 ..."), Some('S'));
        assert_eq!(stat_state("123 (we ird) (name)) Z 1 ..."), Some('Z'));
        assert_eq!(stat_state("garbage"), None);
    }

    #[test]
    fn classification() {
        let bin = Path::new(TANSU);
        assert_eq!(
            classify(10, true, Some(b"tansu\0broker\0".to_vec()), bin),
            PidState::Running(10)
        );
        assert!(matches!(
            classify(10, false, Some(b"tansu\0".to_vec()), bin),
            PidState::Stale { pid: 10, .. }
        ));
        assert!(matches!(
            classify(10, true, None, bin),
            PidState::Stale { pid: 10, .. }
        ));
        match classify(10, true, Some(b"/bin/sleep\x00100\x00".to_vec()), bin) {
            PidState::Stale { reason, .. } => {
                assert!(reason.contains("/bin/sleep 100"), "{reason}")
            }
            other => panic!("{other:?}"),
        }
    }

    #[test]
    fn pid_files_on_disk() {
        let dir = std::env::temp_dir().join(format!("xtask-pid-test-{}", std::process::id()));
        let pid_file = dir.join("pid");
        let bin = Path::new(TANSU);
        assert_eq!(check(&pid_file, bin).unwrap(), PidState::Missing);

        // Our own pid is alive but is not tansu: stale, and nothing gets signalled.
        write_pid_file(&pid_file, std::process::id()).unwrap();
        assert!(matches!(
            check(&pid_file, bin).unwrap(),
            PidState::Stale { .. }
        ));
        assert!(terminate(std::process::id(), bin, Duration::from_millis(10)).is_err());

        // Our own pid checked against our own binary: running.
        let me = std::env::current_exe().unwrap();
        assert_eq!(
            check(&pid_file, &me).unwrap(),
            PidState::Running(std::process::id())
        );

        fs::write(&pid_file, "not a pid").unwrap();
        assert!(matches!(
            check(&pid_file, bin).unwrap(),
            PidState::Stale { pid: 0, .. }
        ));

        remove_files(&[pid_file.clone(), dir.join("never-existed")]).unwrap();
        assert_eq!(check(&pid_file, bin).unwrap(), PidState::Missing);
        fs::remove_dir(&dir).unwrap();
    }

    #[test]
    fn terminate_a_child() {
        let mut child = Command::new("sleep").arg("30").spawn().unwrap();
        let pid = child.id();
        let sleep = Path::new("/bin/sleep");
        // Right after fork the child still shows the test binary's cmdline until it execs.
        let deadline = Instant::now() + Duration::from_secs(10);
        let state = loop {
            let cmdline = fs::read(format!("/proc/{pid}/cmdline")).ok();
            let state = classify(pid, is_alive(pid), cmdline, sleep);
            if state == PidState::Running(pid) || Instant::now() > deadline {
                break state;
            }
            thread::sleep(Duration::from_millis(10));
        };
        if state != PidState::Running(pid) {
            let _ = child.kill();
            let _ = child.wait();
            panic!("{state:?}");
        }
        terminate(pid, sleep, Duration::from_secs(5)).unwrap(); // a zombie until waited on
        assert!(!is_alive(pid));
        child.wait().unwrap();
    }
}
