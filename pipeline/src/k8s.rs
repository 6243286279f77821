//! `pipeline k8s`: runs the workflow on a Kubernetes cluster. Each step of the run's plan
//! (`plan.rs`) is a Job applied with server-side apply and waited for in order: the
//! copier, then for round 0..=R the trainers (an Indexed Job of N pods) and the aggregator. The server Deployment (from
//! `manifests/`) hot-reloads the new model from the shared volume.
//!
//! Re-running resumes: the trainers and aggregators of rounds below `--from-round` (all, by
//! default) get `--resume` and exit at once when their outputs already exist and verify. A
//! Lease per claim (`lock.rs`) keeps two drivers from writing into one volume at once.
//!
//! In the cluster, the driver Job of `manifests/components/run` runs this command with
//! `--driver-job` (from its pod's labels): the run's phase, round and accuracy are written
//! on that Job, and a failed step suspends it until it is applied again.

pub mod api;
pub mod jobs;
pub mod lock;
#[cfg(test)]
mod tests;

use std::path::{Component, Path, PathBuf};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use anyhow::{Context, Result, bail, ensure};
use clap::Args as ClapArgs;
use kube::{Client, Config};

use jobs::{Overlay, Params};

/// Flags of `pipeline k8s`.
#[derive(Debug, ClapArgs)]
pub struct K8sArgs {
    /// Namespace of the Jobs (where `manifests/` put the volume and the server).
    #[arg(long, default_value = "fedimdb")]
    pub namespace: String,
    /// The labeled text to shard, a file or folder on the shared volume: a path relative to
    /// its root (e.g. `own/mail.csv`; `/data/own/mail.csv`, where the pods mount it, alike),
    /// read as `pipeline local --source` reads it, with the same source flags (--format,
    /// --text-column, --label-column, --test, whose path is on the volume too,
    /// --test-fraction). Default: the official IMDB archive, downloaded onto the volume by
    /// the copier Job (README, "Your own data").
    #[arg(long, value_name = "PATH")]
    pub source: Option<PathBuf>,
    #[command(flatten)]
    pub run: crate::plan::RunArgs,
    /// Images are REGISTRY/BINARY:TAG.
    #[arg(long, env = "FEDIMDB_REGISTRY", default_value = "fedimdb")]
    pub registry: String,
    /// Tag of the images (pinned; `latest` is refused).
    #[arg(long, env = "FEDIMDB_TAG", default_value = env!("CARGO_PKG_VERSION"))]
    pub image_tag: String,
    /// The copier's image, whole (e.g. `REGISTRY/copier@sha256:...`), instead of
    /// REGISTRY/copier:TAG.
    #[arg(long, env = "FEDIMDB_COPIER_IMAGE", value_name = "IMAGE")]
    pub copier_image: Option<String>,
    /// The trainers' image, whole, instead of REGISTRY/trainer:TAG (trainer-cuda on GPUs).
    #[arg(long, env = "FEDIMDB_TRAINER_IMAGE", value_name = "IMAGE")]
    pub trainer_image: Option<String>,
    /// The aggregator's image, whole, instead of REGISTRY/aggregator:TAG.
    #[arg(long, env = "FEDIMDB_AGGREGATOR_IMAGE", value_name = "IMAGE")]
    pub aggregator_image: Option<String>,
    /// Cluster flavour: `gpu` runs the trainers on NVIDIA GPUs.
    #[arg(long, value_enum, default_value = "local")]
    pub overlay: Overlay,
    /// The ReadWriteMany claim holding the shared volume.
    #[arg(long, default_value = "fedimdb-data")]
    pub claim: String,
    /// Names the Jobs of this run (default: the current Unix time).
    #[arg(long)]
    pub run_id: Option<String>,
    /// Seconds one step may take before the run gives up.
    #[arg(long, default_value_t = 3600.0)]
    pub step_timeout: f64,
    /// Seconds between two reads of a Job's status.
    #[arg(long, default_value_t = 2.0)]
    pub poll: f64,
    /// Print the Jobs as YAML instead of applying them (needs no cluster).
    #[arg(long)]
    pub dry_run: bool,
    /// The Job this driver runs in (the driver Job of manifests/components/run sets it from
    /// its pod's `batch.kubernetes.io/job-name` label): the run's phase, round and latest
    /// test accuracy are written on it as labels, for `kubectl get jobs -L ...`; when a step
    /// fails, it is suspended, so that applying it again resumes the run.
    #[arg(long, env = "FEDIMDB_DRIVER_JOB", value_name = "JOB")]
    pub driver_job: Option<String>,
}

/// Checks an image reference given whole: `NAME:TAG` or `NAME@sha256:DIGEST`, with a
/// pinned tag.
fn check_image(flag: &str, image: &Option<String>) -> Result<Option<String>> {
    let Some(image) = image else {
        return Ok(None);
    };
    let last = image.rsplit('/').next().unwrap_or_default();
    let (name, pinned) = match last.split_once('@') {
        Some((name, digest)) => (
            name.split(':').next().unwrap_or_default(),
            digest
                .strip_prefix("sha256:")
                .is_some_and(|d| d.len() == 64 && d.bytes().all(|b| b.is_ascii_hexdigit())),
        ),
        None => match last.split_once(':') {
            Some((name, tag)) => (name, !tag.is_empty() && tag != "latest"),
            None => (last, false),
        },
    };
    ensure!(
        !name.is_empty() && !image.chars().any(char::is_whitespace) && pinned,
        "{flag} {image:?} must name an image by a pinned tag (NAME:TAG, not latest) or by \
         digest (NAME@sha256: and 64 hex digits)"
    );
    Ok(Some(image.clone()))
}

/// A DNS-1123 label: lowercase letters, digits and '-', starting and ending alphanumeric.
fn is_dns_label(s: &str, max: usize) -> bool {
    !s.is_empty()
        && s.len() <= max
        && s.bytes()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-')
        && !s.starts_with('-')
        && !s.ends_with('-')
}

/// Where the pods see a path on the volume given to `flag`: relative to the volume's root,
/// or absolute under [`jobs::ROOT`]; never above the root, nor in the folders the run
/// writes (the copier replaces `data/`, the rounds and the model are rewritten).
fn on_volume(flag: &str, path: &Path) -> Result<PathBuf> {
    let relative = if path.is_absolute() {
        path.strip_prefix(jobs::ROOT).map_err(|_| {
            anyhow::anyhow!(
                "{flag} {} is not on the volume: give a path relative to the volume's root (the \
                 pods mount it at {}), e.g. own/mail.csv, after copying the data there (README, \
                 \"Your own data\")",
                path.display(),
                jobs::ROOT
            )
        })?
    } else {
        path
    };
    let mut parts = Vec::new();
    for c in relative.components() {
        match c {
            Component::Normal(p) => parts.push(p),
            Component::CurDir => {}
            _ => bail!(
                "{flag} {} must stay inside the volume: a path relative to its root, without '..'",
                path.display()
            ),
        }
    }
    let layout = fedimdb::layout::Layout::new("");
    let outputs = [layout.data_dir(), layout.rounds_dir(), layout.model_dir()];
    match parts.first() {
        None => bail!(
            "{flag} {} names the volume's root: name a file or folder on it, e.g. own/mail.csv",
            path.display()
        ),
        Some(first) if outputs.iter().any(|o| o.as_os_str() == *first) => bail!(
            "{flag} {} is in {}/, which the run writes: put your data in a folder of its own on \
             the volume, e.g. own/",
            path.display(),
            first.to_string_lossy()
        ),
        Some(_) => {}
    }
    Ok(parts
        .into_iter()
        .fold(PathBuf::from(jobs::ROOT), |p, c| p.join(c)))
}

pub fn params(args: &K8sArgs) -> Result<Params> {
    // The source and the test set as the copier pod sees them; the source flags go with the
    // run's flags into the copier step's arguments.
    let source = args
        .source
        .as_deref()
        .map(|s| on_volume("--source", s))
        .transpose()?;
    let mut run = args.run.clone();
    if let Some(test) = &run.reading.test {
        run.reading.test = Some(on_volume("--test", test)?);
    }
    let plan = crate::plan::Plan::new(run, source.as_deref())?;
    ensure!(
        args.step_timeout > 0.0 && args.step_timeout.is_finite(),
        "--step-timeout must be a positive number of seconds"
    );
    ensure!(
        args.poll > 0.0 && args.poll.is_finite(),
        "--poll must be a positive number of seconds"
    );
    ensure!(
        is_dns_label(&args.namespace, 63),
        "--namespace {:?} is not a valid namespace (lowercase letters, digits and '-')",
        args.namespace
    );
    ensure!(
        !args.image_tag.is_empty() && args.image_tag != "latest",
        "--image-tag must name a pinned tag, not {:?}",
        args.image_tag
    );
    ensure!(!args.registry.is_empty(), "--registry must not be empty");
    let lease = lock::lease_name(&args.claim);
    ensure!(
        !args.claim.is_empty()
            && lease.len() <= 253
            && lease.split('.').all(|l| is_dns_label(l, 63)),
        "--claim {:?} is not a valid claim name (lowercase letters, digits, '-' and '.')",
        args.claim
    );
    let run_id = match &args.run_id {
        Some(r) => r.clone(),
        None => SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map(|d| d.as_secs())
            .unwrap_or(0)
            .to_string(),
    };
    ensure!(
        is_dns_label(&run_id, 20),
        "--run-id {run_id:?} must be at most 20 lowercase letters, digits and '-'"
    );
    let images = jobs::StepImages {
        copier: check_image("--copier-image", &args.copier_image)?,
        trainer: check_image("--trainer-image", &args.trainer_image)?,
        aggregator: check_image("--aggregator-image", &args.aggregator_image)?,
    };
    if let Some(job) = &args.driver_job {
        ensure!(
            is_dns_label(job, 63),
            "--driver-job {job:?} is not a Job name (lowercase letters, digits and '-')"
        );
    }
    Ok(Params {
        namespace: args.namespace.clone(),
        run_id,
        plan,
        source: source.map(|s| s.display().to_string()),
        registry: args.registry.clone(),
        image_tag: args.image_tag.clone(),
        images,
        overlay: args.overlay,
        claim: args.claim.clone(),
        deadline_s: (args.step_timeout.ceil() as i64).max(1),
    })
}

pub fn run(args: &K8sArgs) -> Result<()> {
    let p = params(args)?;
    let steps = jobs::steps(&p);
    if args.dry_run {
        print!("{}", jobs::to_yaml(&steps)?);
        return Ok(());
    }
    let rt = tokio::runtime::Runtime::new().context("cannot start the async runtime")?;
    rt.block_on(async {
        let client = connect().await?;
        let mut orch = api::Orchestrator::new(
            client,
            &p.namespace,
            Duration::from_secs_f64(args.poll),
            Duration::from_secs_f64(args.step_timeout),
        );
        orch.driver_job = args.driver_job.clone();
        let lock = lock::LockConfig::new(&p.claim, &p.run_id);
        orch.run_locked(&steps, lock, shutdown_signal()).await
    })
}

/// Listens for SIGINT (Ctrl-C) and SIGTERM (the pod running the driver is deleted) from
/// now on (so that a signal while the lock is being taken is not lost); the future resolves
/// with the signal's name, and the run then releases its lock before exiting.
fn shutdown_signal() -> impl std::future::Future<Output = String> {
    #[cfg(unix)]
    {
        use tokio::signal::unix::{SignalKind, signal};
        let int = signal(SignalKind::interrupt());
        let term = signal(SignalKind::terminate());
        async move {
            match (int, term) {
                (Ok(mut int), Ok(mut term)) => tokio::select! {
                    _ = int.recv() => "SIGINT".to_string(),
                    _ = term.recv() => "SIGTERM".to_string(),
                },
                _ => std::future::pending().await,
            }
        }
    }
    #[cfg(not(unix))]
    async {
        let _ = tokio::signal::ctrl_c().await;
        "Ctrl-C".to_string()
    }
}

/// A client from the kubeconfig (or the in-cluster service account), checked to reach the
/// API server, with messages that say what to fix.
async fn connect() -> Result<Client> {
    let config = Config::infer().await.map_err(|e| {
        anyhow::anyhow!(
            "no usable Kubernetes configuration ({e}); point KUBECONFIG at a kubeconfig \
             (e.g. `gcloud container clusters get-credentials ...` or `kind create cluster`)"
        )
    })?;
    let url = config.cluster_url.clone();
    let client =
        Client::try_from(config).with_context(|| format!("cannot create a client for {url}"))?;
    match tokio::time::timeout(Duration::from_secs(15), client.apiserver_version()).await {
        Ok(Ok(_)) => Ok(client),
        Ok(Err(e)) => Err(anyhow::anyhow!(
            "cannot reach the Kubernetes API server at {url}: {e}"
        )),
        Err(_) => Err(anyhow::anyhow!(
            "cannot reach the Kubernetes API server at {url}: no answer within 15 s"
        )),
    }
}
