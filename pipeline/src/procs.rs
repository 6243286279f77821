//! Starting the other binaries as child processes and waiting for them.

use std::fs::File;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};
use fedimdb::outcome::Outcome;

/// Where the sibling binaries (copier, trainer, aggregator) are: `$FEDIMDB_BIN_DIR`, else
/// the folder of this executable (where `cargo build` and the images put them).
pub fn bin_dir() -> Result<PathBuf> {
    if let Some(d) = std::env::var_os("FEDIMDB_BIN_DIR") {
        return Ok(PathBuf::from(d));
    }
    let exe = std::env::current_exe().context("cannot locate the pipeline executable")?;
    Ok(exe
        .parent()
        .context("the pipeline executable has no folder")?
        .to_path_buf())
}

/// A command for sibling binary `name`, checked to exist.
pub fn command(name: &str) -> Result<Command> {
    let path = bin_dir()?.join(name);
    if !path.is_file() {
        bail!(
            "cannot find the `{name}` binary at {}: build the workspace (`cargo build --release`) or set FEDIMDB_BIN_DIR",
            path.display()
        );
    }
    let mut cmd = Command::new(path);
    // A step writes its outcome record only where its caller asks (see `run_recorded`).
    cmd.env_remove(fedimdb::outcome::ENV);
    Ok(cmd)
}

/// Runs one step that leaves its outcome record (`fedimdb::outcome`) in `record`, and
/// returns the record; a step that ends well without one is an error naming it.
pub fn run_recorded(mut step: Step, record: PathBuf) -> Result<Outcome> {
    match std::fs::remove_file(&record) {
        Err(e) if e.kind() != std::io::ErrorKind::NotFound => {
            return Err(e).with_context(|| format!("cannot remove the old {}", record.display()));
        }
        _ => {}
    }
    step.command.env(fedimdb::outcome::ENV, &record);
    let name = step.name.clone();
    run_one(step)?;
    let text = std::fs::read_to_string(&record).with_context(|| {
        format!(
            "{name} ended without writing its outcome record {}",
            record.display()
        )
    })?;
    Outcome::parse(&text)
}

/// One step of the workflow: a command whose stderr goes to a log file.
pub struct Step {
    pub name: String,
    pub command: Command,
    pub log: PathBuf,
}

struct Running {
    name: String,
    child: Child,
    log: PathBuf,
}

/// The last `n` lines of a log, for error messages.
pub fn tail(path: &Path, n: usize) -> String {
    let text = std::fs::read_to_string(path).unwrap_or_default();
    let lines: Vec<&str> = text.lines().collect();
    lines[lines.len().saturating_sub(n)..].join("\n")
}

fn spawn(mut step: Step) -> Result<Running> {
    if let Some(dir) = step.log.parent() {
        std::fs::create_dir_all(dir).with_context(|| format!("cannot create {}", dir.display()))?;
    }
    let log = File::create(&step.log)
        .with_context(|| format!("cannot create log {}", step.log.display()))?;
    let child = step
        .command
        .env(
            "RUST_LOG",
            std::env::var("RUST_LOG").unwrap_or_else(|_| "info".into()),
        )
        .stdin(Stdio::null())
        .stdout(log.try_clone()?)
        .stderr(log)
        .spawn()
        .with_context(|| format!("cannot start {}", step.name))?;
    Ok(Running {
        name: step.name,
        child,
        log: step.log,
    })
}

/// Runs the steps with at most `jobs` at once. On the first failure the others are
/// stopped and the error shows the failed step's last log lines.
pub fn run_all(steps: Vec<Step>, jobs: usize) -> Result<()> {
    run_tolerating(steps, jobs, 0).map(|_| ())
}

/// [`run_all`], going on through up to `tolerate` failed steps (a quorum of trainers is
/// enough). Returns the failures it tolerated, each with its step's last log lines; one
/// more failure stops the others and is the error.
pub fn run_tolerating(steps: Vec<Step>, jobs: usize, tolerate: usize) -> Result<Vec<String>> {
    let mut pending = steps.into_iter();
    let mut running: Vec<Running> = Vec::new();
    let mut failures: Vec<String> = Vec::new();
    let too_many = |f: &Vec<String>| f.len() > tolerate;
    loop {
        while !too_many(&failures) && running.len() < jobs.max(1) {
            match pending.next() {
                Some(step) => running.push(spawn(step)?),
                None => break,
            }
        }
        if running.is_empty() {
            break;
        }
        let start = Instant::now();
        let mut i = 0;
        while i < running.len() {
            match running[i].child.try_wait()? {
                Some(status) => {
                    let r = running.swap_remove(i);
                    if !status.success() && !too_many(&failures) {
                        failures.push(format!(
                            "{} failed ({status}); last lines of {}:\n{}",
                            r.name,
                            r.log.display(),
                            tail(&r.log, 12)
                        ));
                        if too_many(&failures) {
                            for other in &mut running {
                                let _ = other.child.kill();
                            }
                        }
                    }
                }
                None => i += 1,
            }
        }
        if start.elapsed() < Duration::from_millis(5) {
            std::thread::sleep(Duration::from_millis(5));
        }
    }
    if too_many(&failures) {
        bail!(failures.pop().expect("one failure too many"));
    }
    Ok(failures)
}

/// Runs one step to completion.
pub fn run_one(step: Step) -> Result<()> {
    run_all(vec![step], 1)
}
