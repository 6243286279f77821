//! The Jobs of `pipeline k8s`, one per step of the run's [`Plan`], built as pure functions
//! of [`Params`] (no API calls), so that `--dry-run` and the tests see exactly what would
//! be applied. The plan gives each Job its binary, arguments and environment; this module
//! adds what is Kubernetes' own: the volume at `/data`, the completion index, images,
//! resources, security, the failure policy, and the GPU of the `gpu` overlay. They mirror
//! the Jobs in `manifests/base/` (a test compares them).

use std::collections::BTreeMap;

use k8s_openapi::api::batch::v1::{
    Job, JobSpec, PodFailurePolicy, PodFailurePolicyOnExitCodesRequirement, PodFailurePolicyRule,
};
use k8s_openapi::api::core::v1::{
    Capabilities, Container, EmptyDirVolumeSource, EnvVar, PersistentVolumeClaimVolumeSource,
    PodSecurityContext, PodSpec, PodTemplateSpec, ResourceRequirements, SeccompProfile,
    SecurityContext, Toleration, Volume, VolumeMount,
};
use k8s_openapi::apimachinery::pkg::api::resource::Quantity;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::ObjectMeta;

use crate::plan::{ARCHIVE_NAME, DOWNLOAD_DIR, Plan, PlannedStep, StepKind, download_args};

/// Field manager name used for server-side apply.
pub const MANAGER: &str = "fedimdb-pipeline";
/// Where the shared volume is mounted in every pod.
pub const ROOT: &str = "/data";
/// The user of the distroless `nonroot` images.
pub const UID: i64 = 65532;

/// Which cluster flavour the Jobs are built for (the overlays in `manifests/overlays/`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum Overlay {
    /// kind or minikube.
    Local,
    /// Google Kubernetes Engine, CPU nodes.
    Gke,
    /// Trainers on NVIDIA GPUs (`nvidia.com/gpu`, the cuda trainer image, `--device cuda`).
    Gpu,
}

/// Everything the Jobs depend on.
#[derive(Debug, Clone)]
pub struct Params {
    pub namespace: String,
    /// Distinguishes the Jobs of one run from those of earlier runs.
    pub run_id: String,
    /// What the run computes, step by step: the plan `pipeline local` runs too.
    pub plan: Plan,
    /// The copier's `--source` as its pod sees it (under [`ROOT`]); None: the official
    /// archive, which the copier Job downloads onto the volume first.
    pub source: Option<String>,
    /// Image names are `REGISTRY/BINARY:TAG` (trainer on GPUs: `REGISTRY/trainer-cuda:TAG`),
    /// unless [`Params::images`] names one.
    pub registry: String,
    pub image_tag: String,
    /// Images given whole (`--copier-image` ...; the driver Job of `manifests/` passes those
    /// of the overlay, pinned by digest in the cloud overlays).
    pub images: StepImages,
    pub overlay: Overlay,
    /// The ReadWriteMany claim holding the volume (docs/VOLUME.md).
    pub claim: String,
    /// `activeDeadlineSeconds` of every Job.
    pub deadline_s: i64,
}

/// Whole image references of the steps, each replacing `REGISTRY/BINARY:TAG`.
#[derive(Debug, Clone, Default)]
pub struct StepImages {
    pub copier: Option<String>,
    pub trainer: Option<String>,
    pub aggregator: Option<String>,
}

/// checkov annotations of the Jobs whose images have no digest on a local cluster: the same
/// text as `manifests/components/local` puts on the step templates (a test compares them).
/// The reasons must not contain '=' (checkov splits the value at it).
pub const LOCAL_IMAGE_SKIPS: [(&str, &str); 2] = [
    (
        "checkov.io/skip20",
        "CKV_K8S_43=local clusters run images loaded into the nodes by tag (kind load \
         docker-image) which have no registry digest; the cloud overlays pin digests",
    ),
    (
        "checkov.io/skip21",
        "CKV_K8S_15=Always would pull images loaded into the nodes from a registry that \
         does not hold them; the tags are pinned",
    ),
];

/// One Job to apply and wait for.
#[derive(Debug, Clone)]
pub struct Step {
    pub kind: StepKind,
    pub job: Job,
}

impl Step {
    pub fn name(&self) -> &str {
        self.job.metadata.name.as_deref().unwrap_or_default()
    }
    /// Pods that must succeed.
    pub fn completions(&self) -> i32 {
        self.job
            .spec
            .as_ref()
            .and_then(|s| s.completions)
            .unwrap_or(1)
    }
    /// Indexes that must succeed for the run to go on: `completions - maxFailedIndexes`
    /// (the trainers with `--min-workers`), else all of them.
    pub fn quorum(&self) -> i32 {
        let failable = self
            .job
            .spec
            .as_ref()
            .and_then(|s| s.max_failed_indexes)
            .unwrap_or(0);
        (self.completions() - failable).max(1)
    }
    /// The pod template's first container: the step's binary.
    fn main_container(&self) -> Option<&Container> {
        let pod = self.job.spec.as_ref()?.template.spec.as_ref()?;
        pod.containers.first()
    }
    /// The main container's name (its termination message is the step's outcome record).
    pub fn container(&self) -> Option<&str> {
        self.main_container().map(|c| c.name.as_str())
    }
}

/// The Jobs of the whole plan, in its order: copier; then, for round 0..=R, trainers and
/// aggregator.
pub fn steps(p: &Params) -> Vec<Step> {
    p.plan
        .steps
        .iter()
        .map(|s| Step {
            kind: s.kind,
            job: job_of(p, s),
        })
        .collect()
}

/// The Job of one planned step.
pub fn job_of(p: &Params, step: &PlannedStep) -> Job {
    match step.kind {
        StepKind::Copier => copier_job(p, step),
        StepKind::Trainer(_) => trainer_job(p, step),
        StepKind::Aggregator(_) => aggregator_job(p, step),
    }
}

/// `--root /data` and the step's arguments: every binary but the copier takes the
/// volume's root first.
fn rooted(step: &PlannedStep) -> Vec<String> {
    let mut args = vec!["--root".to_owned(), ROOT.to_owned()];
    args.extend(step.args.iter().cloned());
    args
}

/// Name of a Job: `fedimdb-RUN-copier`, `fedimdb-RUN-trainer-rR`, `fedimdb-RUN-aggregator-rR`.
pub fn job_name(p: &Params, kind: StepKind) -> String {
    match kind {
        StepKind::Copier => format!("fedimdb-{}-copier", p.run_id),
        StepKind::Trainer(r) => format!("fedimdb-{}-trainer-r{r}", p.run_id),
        StepKind::Aggregator(r) => format!("fedimdb-{}-aggregator-r{r}", p.run_id),
    }
}

pub fn image(p: &Params, binary: &str) -> String {
    format!(
        "{}/{binary}:{}",
        p.registry.trim_end_matches('/'),
        p.image_tag
    )
}

/// Whether an image reference names its image by digest (`NAME@sha256:...`).
pub fn has_digest(image: &str) -> bool {
    image.contains("@sha256:")
}

/// The pull policy of an image. By digest: IfNotPresent (a digest names one image for good,
/// so a cached copy is the right one). By tag on a local cluster: IfNotPresent, which is
/// what lets the kubelet use images loaded into the node (`kind load docker-image`). By tag
/// elsewhere: Always, so that a tag moved in the registry is not served stale from a
/// node's cache.
pub fn pull_policy(p: &Params, image: &str) -> &'static str {
    if has_digest(image) || p.overlay == Overlay::Local {
        "IfNotPresent"
    } else {
        "Always"
    }
}

fn labels(p: &Params, component: &str) -> BTreeMap<String, String> {
    BTreeMap::from([
        ("app.kubernetes.io/name".to_string(), "fedimdb".to_string()),
        (
            "app.kubernetes.io/part-of".to_string(),
            "fedimdb".to_string(),
        ),
        (
            "app.kubernetes.io/component".to_string(),
            component.to_string(),
        ),
        (
            "app.kubernetes.io/managed-by".to_string(),
            MANAGER.to_string(),
        ),
        ("fedimdb/run".to_string(), p.run_id.clone()),
    ])
}

fn q(s: &str) -> Quantity {
    Quantity(s.to_string())
}

fn resources(cpu: &str, memory: &str, cpu_limit: &str, memory_limit: &str) -> ResourceRequirements {
    ResourceRequirements {
        requests: Some(BTreeMap::from([
            ("cpu".into(), q(cpu)),
            ("memory".into(), q(memory)),
        ])),
        limits: Some(BTreeMap::from([
            ("cpu".into(), q(cpu_limit)),
            ("memory".into(), q(memory_limit)),
        ])),
        ..Default::default()
    }
}

/// The container security context shared by every fedimdb container.
pub fn container_security() -> SecurityContext {
    SecurityContext {
        run_as_non_root: Some(true),
        run_as_user: Some(UID),
        run_as_group: Some(UID),
        read_only_root_filesystem: Some(true),
        allow_privilege_escalation: Some(false),
        capabilities: Some(Capabilities {
            drop: Some(vec!["ALL".into()]),
            ..Default::default()
        }),
        seccomp_profile: Some(SeccompProfile {
            type_: "RuntimeDefault".into(),
            ..Default::default()
        }),
        ..Default::default()
    }
}

fn pod_security() -> PodSecurityContext {
    PodSecurityContext {
        run_as_non_root: Some(true),
        run_as_user: Some(UID),
        run_as_group: Some(UID),
        fs_group: Some(UID),
        seccomp_profile: Some(SeccompProfile {
            type_: "RuntimeDefault".into(),
            ..Default::default()
        }),
        ..Default::default()
    }
}

/// A container of `step`: its environment from the plan, then where the outcome record
/// goes.
fn container(
    p: &Params,
    step: &PlannedStep,
    name: &str,
    image: String,
    args: Vec<String>,
    res: ResourceRequirements,
) -> Container {
    let var = |name: &str, value: &str| EnvVar {
        name: name.into(),
        value: Some(value.into()),
        ..Default::default()
    };
    let mut env: Vec<EnvVar> = step.env.iter().map(|(k, v)| var(k, v)).collect();
    // The step's outcome record goes to its termination message, which the driver reads
    // from the pod's status (`fedimdb::outcome`).
    env.push(var(
        fedimdb::outcome::ENV,
        fedimdb::outcome::TERMINATION_LOG,
    ));
    Container {
        name: name.into(),
        image_pull_policy: Some(pull_policy(p, &image).into()),
        image: Some(image),
        args: Some(args),
        env: Some(env),
        termination_message_path: Some(fedimdb::outcome::TERMINATION_LOG.into()),
        termination_message_policy: Some("File".into()),
        resources: Some(res),
        security_context: Some(container_security()),
        volume_mounts: Some(vec![
            VolumeMount {
                name: "data".into(),
                mount_path: ROOT.into(),
                ..Default::default()
            },
            VolumeMount {
                name: "tmp".into(),
                mount_path: "/tmp".into(),
                ..Default::default()
            },
        ]),
        ..Default::default()
    }
}

fn volumes(p: &Params) -> Vec<Volume> {
    vec![
        Volume {
            name: "data".into(),
            persistent_volume_claim: Some(PersistentVolumeClaimVolumeSource {
                claim_name: p.claim.clone(),
                ..Default::default()
            }),
            ..Default::default()
        },
        Volume {
            name: "tmp".into(),
            empty_dir: Some(EmptyDirVolumeSource {
                size_limit: Some(q("1Gi")),
                ..Default::default()
            }),
            ..Default::default()
        },
    ]
}

/// Exit code 2 is a usage error (bad flags): retrying cannot fix it, so the Job fails at
/// once. Other failures are retried up to the backoff limit. Pod disruptions (node drain,
/// preemption) are not counted against it.
fn failure_policy() -> PodFailurePolicy {
    PodFailurePolicy {
        rules: vec![
            PodFailurePolicyRule {
                action: "FailJob".into(),
                on_exit_codes: Some(PodFailurePolicyOnExitCodesRequirement {
                    container_name: None,
                    operator: "In".into(),
                    values: vec![2],
                }),
                ..Default::default()
            },
            PodFailurePolicyRule {
                action: "Ignore".into(),
                on_pod_conditions: Some(vec![
                    k8s_openapi::api::batch::v1::PodFailurePolicyOnPodConditionsPattern {
                        type_: "DisruptionTarget".into(),
                        status: Some("True".into()),
                    },
                ]),
                ..Default::default()
            },
        ],
    }
}

fn job(p: &Params, kind: StepKind, mut pod: PodSpec, mut spec: JobSpec) -> Job {
    let labels = labels(p, kind.binary());
    pod.restart_policy = Some("Never".into());
    pod.security_context = Some(pod_security());
    pod.automount_service_account_token = Some(false);
    pod.volumes = Some(volumes(p));
    spec.active_deadline_seconds = Some(p.deadline_s);
    spec.ttl_seconds_after_finished = Some(86_400);
    spec.pod_failure_policy = Some(failure_policy());
    // On a local cluster, images loaded into the nodes have no digest; the checks that
    // want one are skipped there, with the reason, as in manifests/components/local.
    let by_tag = pod
        .containers
        .iter()
        .chain(pod.init_containers.iter().flatten())
        .any(|c| !c.image.as_deref().is_some_and(has_digest));
    let annotations = (p.overlay == Overlay::Local && by_tag).then(|| {
        LOCAL_IMAGE_SKIPS
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect()
    });
    spec.template = PodTemplateSpec {
        metadata: Some(ObjectMeta {
            labels: Some(labels.clone()),
            ..Default::default()
        }),
        spec: Some(pod),
    };
    Job {
        metadata: ObjectMeta {
            name: Some(job_name(p, kind)),
            namespace: Some(p.namespace.clone()),
            labels: Some(labels),
            annotations,
            ..Default::default()
        },
        spec: Some(spec),
        status: None,
    }
}

/// The copier: shards `--source`, a file or folder on the volume, with the source flags
/// among the plan's arguments; without it, an init container first downloads the official
/// archive onto the volume (skipped when already there with the right hash), which the
/// copier then shards into `workers` shards.
fn copier_job(p: &Params, step: &PlannedStep) -> Job {
    let download = format!("{ROOT}/{DOWNLOAD_DIR}");
    let copier_image = p
        .images
        .copier
        .clone()
        .unwrap_or_else(|| image(p, "copier"));
    let (source, init) = match &p.source {
        Some(source) => (source.clone(), None),
        None => (
            format!("{download}/{ARCHIVE_NAME}"),
            Some(vec![container(
                p,
                step,
                "download",
                copier_image.clone(),
                download_args(download),
                resources("250m", "256Mi", "1", "512Mi"),
            )]),
        ),
    };
    let mut args: Vec<String> = vec!["--source".into(), source, "--out".into(), ROOT.into()];
    args.extend(step.args.iter().cloned());
    let main = container(
        p,
        step,
        "copier",
        copier_image,
        args,
        resources("1", "1Gi", "2", "2Gi"),
    );
    let pod = PodSpec {
        init_containers: init,
        containers: vec![main],
        ..Default::default()
    };
    let spec = JobSpec {
        backoff_limit: Some(2),
        ..Default::default()
    };
    job(p, step.kind, pod, spec)
}

/// The trainers of one round: an Indexed Job of `workers` pods; pod I trains shard I (the
/// trainer reads `JOB_COMPLETION_INDEX`). Each index is retried twice; with `--min-workers
/// M`, up to `workers - M` indexes may fail without stopping the others (the Job then ends
/// `Failed` with reason `FailedIndexes` once every index has finished, and the run goes on
/// if at least M succeeded); without it the first failed index fails the Job.
fn trainer_job(p: &Params, step: &PlannedStep) -> Job {
    let gpu = p.overlay == Overlay::Gpu;
    let mut args = rooted(step);
    // Smaller requests on a laptop cluster (the limits stay), as manifests/components/local.
    let mut res = match p.overlay {
        Overlay::Local => resources("250m", "1Gi", "2", "4Gi"),
        Overlay::Gke | Overlay::Gpu => resources("1", "2Gi", "2", "4Gi"),
    };
    let mut tolerations = None;
    let image = if gpu {
        args.extend(["--device".into(), "cuda".into()]);
        for map in [res.requests.as_mut(), res.limits.as_mut()]
            .into_iter()
            .flatten()
        {
            map.insert("nvidia.com/gpu".into(), q("1"));
        }
        tolerations = Some(vec![Toleration {
            key: Some("nvidia.com/gpu".into()),
            operator: Some("Exists".into()),
            effect: Some("NoSchedule".into()),
            ..Default::default()
        }]);
        image(p, "trainer-cuda")
    } else {
        image(p, "trainer")
    };
    let image = p.images.trainer.clone().unwrap_or(image);
    let pod = PodSpec {
        containers: vec![container(p, step, "trainer", image, args, res)],
        tolerations,
        ..Default::default()
    };
    let n = step.shards as i32;
    let spec = JobSpec {
        completion_mode: Some("Indexed".into()),
        completions: Some(n),
        parallelism: Some(n),
        backoff_limit_per_index: Some(2),
        max_failed_indexes: Some((step.shards - step.quorum) as i32),
        ..Default::default()
    };
    job(p, step.kind, pod, spec)
}

/// The aggregator of one round: averages the updates of all shards of the data manifest
/// (`workers`) into the round's model, or with `--min-workers M` those present when at
/// least M arrived.
fn aggregator_job(p: &Params, step: &PlannedStep) -> Job {
    let pod = PodSpec {
        containers: vec![container(
            p,
            step,
            "aggregator",
            p.images
                .aggregator
                .clone()
                .unwrap_or_else(|| image(p, "aggregator")),
            rooted(step),
            resources("500m", "1Gi", "2", "2Gi"),
        )],
        ..Default::default()
    };
    let spec = JobSpec {
        backoff_limit: Some(2),
        ..Default::default()
    };
    job(p, step.kind, pod, spec)
}

/// The YAML of all steps, as `---`-separated documents (what `--dry-run` prints).
pub fn to_yaml(steps: &[Step]) -> anyhow::Result<String> {
    let mut out = String::new();
    for s in steps {
        out.push_str("---\n");
        out.push_str(&serde_yaml::to_string(&s.job)?);
    }
    Ok(out)
}
