//! `make k8s-sim`: the whole default workflow (5 workers, the default rounds and training)
//! through `pipeline k8s` against the simulated cluster of `tests/sim/`, on the shared
//! archive; then the same run with `pipeline local`, whose published model must be byte
//! for byte the same. Ends with the line `pipeline local` ends with (`done: test accuracy
//! …`), for the run on the simulated cluster.
//!
//! `cargo run --release -p system-tests --example k8s-sim [-- PIPELINE FLAGS]`; the
//! binaries must be built first (the Makefile target does it). Flags after `--` go to both
//! runs (e.g. `--workers 3 --rounds 2`). The volumes are kept under `runs/k8s-sim/`
//! (`FEDIMDB_SIM_DIR`): `vol/` of the simulated cluster, `local/` of `pipeline local`.

#[path = "common/mod.rs"]
mod common;
#[path = "sim/mod.rs"]
mod sim;

use std::process::ExitCode;
use std::time::Instant;

use sim::fixtures::{
    final_line, last_accuracy, model_sha, pipeline_k8s, pipeline_local, sim, volume_with,
};

fn main() -> ExitCode {
    let Some(archive) = common::shared_archive() else {
        eprintln!(
            "k8s-sim: the shared archive ../shared/data/aclImdb-labeled.tar.gz is absent \
             (or set FEDIMDB_ARCHIVE); nothing run"
        );
        return ExitCode::FAILURE;
    };
    let extra: Vec<String> = std::env::args().skip(1).collect();
    let flags: Vec<&str> = extra.iter().map(String::as_str).collect();
    // Kept after the run (the volume with the model, `local/` with pipeline local's), as
    // `make run` keeps runs/local; replaced by the next run.
    let dir = std::path::PathBuf::from(
        std::env::var("FEDIMDB_SIM_DIR").unwrap_or_else(|_| "runs/k8s-sim".into()),
    );
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).unwrap();
    let dir = dir.canonicalize().unwrap();
    let vol = volume_with(&dir, &archive);
    let s = sim(&vol, &archive, None);
    println!(
        "k8s-sim: simulated API server at http://{}; volume {}",
        s.addr,
        vol.display()
    );

    let t0 = Instant::now();
    let status = pipeline_k8s(&s, &flags).status().expect("pipeline starts");
    let seconds = t0.elapsed().as_secs_f64();
    if !status.success() {
        eprintln!("k8s-sim: pipeline k8s failed ({status})");
        return ExitCode::FAILURE;
    }
    let unserved = s.unserved();
    if !unserved.is_empty() {
        eprintln!(
            "k8s-sim: the simulator was asked for what it does not serve:\n{}",
            unserved.join("\n")
        );
        return ExitCode::FAILURE;
    }
    let k8s_sha = model_sha(&vol);
    let Some(accuracy) = last_accuracy(&s) else {
        eprintln!("k8s-sim: the last aggregator left no test accuracy in its termination message");
        return ExitCode::FAILURE;
    };
    drop(s);

    println!("k8s-sim: the same run with pipeline local, to compare the models");
    let root = dir.join("local");
    let out = pipeline_local(&archive, &root, &flags)
        .stderr(std::process::Stdio::inherit())
        .output()
        .expect("pipeline starts");
    let stdout = String::from_utf8_lossy(&out.stdout);
    if !out.status.success() {
        eprintln!("k8s-sim: pipeline local failed ({}):\n{stdout}", out.status);
        return ExitCode::FAILURE;
    }
    let local_sha = model_sha(&root);
    println!(
        "  pipeline local: {}",
        final_line(&stdout).unwrap_or("(no final line)")
    );
    if local_sha != k8s_sha {
        eprintln!(
            "k8s-sim: the models differ: pipeline k8s published {k8s_sha}, pipeline local {local_sha}"
        );
        return ExitCode::FAILURE;
    }
    println!("k8s-sim: model/latest.safetensors sha256 {k8s_sha}, the same from both");
    let rounds = extra
        .iter()
        .position(|a| a == "--rounds")
        .and_then(|i| extra.get(i + 1))
        .and_then(|r| r.parse::<u32>().ok())
        .unwrap_or(fedimdb::train::defaults::ROUNDS);
    println!(
        "done: test accuracy {:.2}% after {rounds} rounds, {seconds:.1} s in all; model at {}",
        accuracy * 100.0,
        vol.join("model/latest.safetensors").display()
    );
    ExitCode::SUCCESS
}
