//! Tests of `jobs.rs` (pure): the plan, the Jobs' specs and arguments, the GPU overlay, the
//! lockdown of every container, the dry-run YAML, resume and quorum.

use k8s_openapi::api::batch::v1::Job;
use k8s_openapi::apimachinery::pkg::api::resource::Quantity;

use super::fixtures::{assert_has, params, params_with};
use crate::k8s::jobs::{self, Overlay, Params};
use crate::plan::StepKind;

fn args_of(job: &Job) -> Vec<String> {
    job.spec
        .as_ref()
        .unwrap()
        .template
        .spec
        .as_ref()
        .unwrap()
        .containers[0]
        .args
        .clone()
        .unwrap()
}

/// The Job of one step of the plan of `p`.
fn job(p: &Params, kind: StepKind) -> Job {
    jobs::job_of(p, p.plan.step(kind))
}

fn copier_job(p: &Params) -> Job {
    job(p, StepKind::Copier)
}

fn trainer_job(p: &Params, round: u32) -> Job {
    job(p, StepKind::Trainer(round))
}

fn aggregator_job(p: &Params, round: u32) -> Job {
    job(p, StepKind::Aggregator(round))
}

fn has_resume(job: &Job) -> bool {
    args_of(job).iter().any(|a| a == "--resume")
}

#[test]
fn plan_is_copier_then_trainer_and_aggregator_per_round() {
    let steps = jobs::steps(&params(3, 2, Overlay::Local));
    let kinds: Vec<_> = steps.iter().map(|s| s.kind).collect();
    assert_eq!(
        kinds,
        vec![
            StepKind::Copier,
            StepKind::Trainer(0),
            StepKind::Aggregator(0),
            StepKind::Trainer(1),
            StepKind::Aggregator(1),
            StepKind::Trainer(2),
            StepKind::Aggregator(2),
        ]
    );
    let names: std::collections::HashSet<_> = steps.iter().map(|s| s.name().to_string()).collect();
    assert_eq!(names.len(), steps.len(), "job names are unique");
    assert_eq!(steps[1].name(), "fedimdb-t1-trainer-r0");
}

#[test]
fn trainer_is_an_indexed_job_of_workers_pods() {
    let p = params(4, 1, Overlay::Local);
    let j = trainer_job(&p, 1);
    let spec = j.spec.as_ref().unwrap();
    assert_eq!(spec.completion_mode.as_deref(), Some("Indexed"));
    assert_eq!(spec.completions, Some(4));
    assert_eq!(spec.parallelism, Some(4));
    assert!(spec.backoff_limit_per_index.is_some());
    assert_eq!(
        spec.max_failed_indexes,
        Some(0),
        "every trainer is needed by default"
    );
    assert!(spec.pod_failure_policy.is_some());
    assert_eq!(spec.active_deadline_seconds, Some(600));
    assert!(spec.ttl_seconds_after_finished.is_some());
    let args = args_of(&j);
    assert_eq!(
        args.join(" "),
        "--root /data --round 1 --algorithm scaffold --epochs 3 --batch 64 \
         --schedule linear --seed 7 --hash-bits 22 --max-ngram 3 --resume"
    );
    assert!(
        !args.iter().any(|a| a == "--shard"),
        "the shard comes from JOB_COMPLETION_INDEX"
    );
    let c = &spec.template.spec.as_ref().unwrap().containers[0];
    assert_eq!(c.image.as_deref(), Some("example.io/fedimdb/trainer:0.1.0"));
    assert!(
        !c.resources
            .as_ref()
            .unwrap()
            .limits
            .as_ref()
            .unwrap()
            .contains_key("nvidia.com/gpu")
    );
}

#[test]
fn gpu_overlay_requests_a_gpu_and_uses_the_cuda_image() {
    let j = trainer_job(&params(2, 1, Overlay::Gpu), 0);
    let pod = j.spec.as_ref().unwrap().template.spec.clone().unwrap();
    let c = &pod.containers[0];
    assert_eq!(
        c.image.as_deref(),
        Some("example.io/fedimdb/trainer-cuda:0.1.0")
    );
    let res = c.resources.as_ref().unwrap();
    assert_eq!(res.limits.as_ref().unwrap()["nvidia.com/gpu"].0, "1");
    assert_eq!(res.requests.as_ref().unwrap()["nvidia.com/gpu"].0, "1");
    assert!(
        c.args
            .as_ref()
            .unwrap()
            .ends_with(&["--device".to_string(), "cuda".to_string()])
    );
    assert_eq!(
        pod.tolerations.unwrap()[0].key.as_deref(),
        Some("nvidia.com/gpu")
    );
    // Only the trainer differs from the gke overlay's (the local one's differ in their
    // pull policy and checkov annotations).
    let a = aggregator_job(&params(2, 1, Overlay::Gpu), 0);
    assert_eq!(a, aggregator_job(&params(2, 1, Overlay::Gke), 0));
}

#[test]
fn every_container_is_locked_down() {
    for step in jobs::steps(&params(2, 1, Overlay::Gpu)) {
        let spec = step.job.spec.as_ref().unwrap();
        let pod = spec.template.spec.as_ref().unwrap();
        assert_eq!(
            pod.security_context.as_ref().unwrap().run_as_non_root,
            Some(true)
        );
        assert_eq!(pod.restart_policy.as_deref(), Some("Never"));
        assert!(
            spec.active_deadline_seconds.is_some() && spec.ttl_seconds_after_finished.is_some()
        );
        assert!(spec.backoff_limit.is_some() || spec.backoff_limit_per_index.is_some());
        for c in pod
            .containers
            .iter()
            .chain(pod.init_containers.iter().flatten())
        {
            assert_eq!(
                c.security_context.as_ref(),
                Some(&jobs::container_security()),
                "{}",
                c.name
            );
            let r = c.resources.as_ref().unwrap();
            for k in ["cpu", "memory"] {
                assert!(
                    r.requests.as_ref().unwrap().contains_key(k)
                        && r.limits.as_ref().unwrap().contains_key(k)
                );
            }
            assert!(!c.image.as_ref().unwrap().ends_with(":latest"));
        }
    }
}

#[test]
fn copier_downloads_then_shards_into_workers() {
    let j = copier_job(&params(5, 1, Overlay::Local));
    let pod = j.spec.as_ref().unwrap().template.spec.clone().unwrap();
    assert_eq!(
        pod.init_containers.unwrap()[0].args.clone().unwrap(),
        ["download", "--to", "/data/download"]
    );
    let args = pod.containers[0].args.clone().unwrap();
    let w = args.iter().position(|a| a == "--workers").unwrap();
    assert_eq!(args[w + 1], "5");
    assert!(!args.contains(&"--force".to_string()));
    let forced = copier_job(&params_with(5, 1, Overlay::Local, &["--force"]));
    assert!(args_of(&forced).ends_with(&["--force".to_string()]));
    let a = aggregator_job(&params(5, 3, Overlay::Local), 3);
    assert_eq!(
        args_of(&a).join(" "),
        "--root /data --round 3 --min-workers 5 --strategy fedavg --keep-rounds 1 --resume"
    );
}

/// Label skew, model size and robust aggregation run on a cluster as they do locally:
/// each flag reaches the Job of the binary that uses it.
#[test]
fn the_training_flags_of_pipeline_local_reach_the_jobs() {
    let flags = [
        "--partition",
        "dirichlet",
        "--alpha",
        "0.1",
        "--min-shard",
        "50",
        "--hash-bits",
        "18",
        "--max-ngram",
        "2",
        "--lr",
        "4",
        "--strategy",
        "trimmed-mean",
        "--trim",
        "0.25",
    ];
    let p = params_with(4, 2, Overlay::Local, &flags);
    let args = |job: &Job| args_of(job).join(" ");
    let copier = args(&copier_job(&p));
    assert_has(&copier, "--partition dirichlet --alpha 0.1 --min-shard 50");
    let trainer = args(&trainer_job(&p, 2));
    for want in ["--round 2", "--lr 4", "--hash-bits 18 --max-ngram 2"] {
        assert_has(&trainer, want);
    }
    let aggregator = args(&aggregator_job(&p, 2));
    assert_has(&aggregator, "--strategy trimmed-mean --trim 0.25");
}

#[test]
fn dry_run_yaml_round_trips() {
    let steps = jobs::steps(&params(2, 1, Overlay::Local));
    let yaml = jobs::to_yaml(&steps).unwrap();
    let docs: Vec<Job> = serde_yaml::Deserializer::from_str(&yaml)
        .map(|d| serde::Deserialize::deserialize(d).unwrap())
        .collect();
    assert_eq!(docs.len(), steps.len());
    assert_eq!(docs[0], steps[0].job);
    assert!(yaml.contains("apiVersion: batch/v1") && yaml.contains("kind: Job"));
}

// ---- resume and quorum ----

#[test]
fn rounds_below_from_round_resume_and_the_rest_recompute() {
    let by_round = |from_round: Option<u32>| -> Vec<(StepKind, bool)> {
        let from = from_round.map(|r| r.to_string());
        let flags: Vec<&str> = from.iter().flat_map(|r| ["--from-round", r]).collect();
        jobs::steps(&params_with(2, 3, Overlay::Local, &flags))
            .iter()
            .filter(|s| s.kind != StepKind::Copier)
            .map(|s| (s.kind, has_resume(&s.job)))
            .collect()
    };
    // Default: every trainer and aggregator resumes.
    assert!(
        by_round(None).iter().all(|(_, r)| *r),
        "{:?}",
        by_round(None)
    );
    // --from-round 2: rounds 0 and 1 resume, 2 and 3 recompute.
    for (kind, resumes) in by_round(Some(2)) {
        assert_eq!(resumes, kind.round().unwrap() < 2, "{kind}");
    }
    // --from-round 0: everything after the copier recomputes.
    assert!(by_round(Some(0)).iter().all(|(_, r)| !*r));
    // The copier never gets the flag (it is idempotent by itself).
    let p = params_with(2, 3, Overlay::Local, &["--from-round", "1"]);
    assert!(!has_resume(&copier_job(&p)));
    // --device cuda stays last on the GPU trainer.
    let g = trainer_job(&params(2, 1, Overlay::Gpu), 0);
    assert!(args_of(&g).ends_with(&["--resume".into(), "--device".into(), "cuda".into()]));
}

#[test]
fn min_workers_lets_indexes_fail_and_reaches_the_aggregator() {
    let p = params_with(5, 1, Overlay::Local, &["--min-workers", "3"]);
    let steps = jobs::steps(&p);
    let t = &steps[1];
    let spec = t.job.spec.as_ref().unwrap();
    assert_eq!(spec.backoff_limit_per_index, Some(2));
    assert_eq!(
        spec.max_failed_indexes,
        Some(2),
        "the other indexes keep running when up to workers - M fail"
    );
    assert_eq!(t.quorum(), 3);
    assert_eq!(steps[2].quorum(), 1);
    assert_eq!(
        args_of(&steps[2].job).join(" "),
        "--root /data --round 0 --min-workers 3 --strategy fedavg --keep-rounds 1 --resume"
    );
    // The usage-error rule still fails the whole Job; the others retry per index.
    let rules = &spec.pod_failure_policy.as_ref().unwrap().rules;
    assert_eq!(rules[0].action, "FailJob");
    assert_eq!(rules[0].on_exit_codes.as_ref().unwrap().values, vec![2]);
    assert_eq!(jobs::steps(&params(5, 1, Overlay::Local))[1].quorum(), 5);
}

/// Every container of a plan: (job, image, pull policy), and each Job's annotations.
fn images_of(p: &jobs::Params) -> Vec<(String, String, String, usize)> {
    jobs::steps(p)
        .iter()
        .flat_map(|s| {
            let pod = s.job.spec.as_ref().unwrap().template.spec.clone().unwrap();
            let skips = s.job.metadata.annotations.as_ref().map_or(0, |a| a.len());
            pod.containers
                .into_iter()
                .chain(pod.init_containers.unwrap_or_default())
                .map(move |c| {
                    (
                        s.name().to_string(),
                        c.image.unwrap(),
                        c.image_pull_policy.unwrap(),
                        skips,
                    )
                })
        })
        .collect()
}

/// Images given whole replace REGISTRY/BINARY:TAG; by digest they are pulled if not
/// present, by tag Always, but on a local cluster, whose images are loaded into the nodes
/// and have no digest: there IfNotPresent, and the checkov checks on images are skipped
/// with the reasons of manifests/components/local.
#[test]
fn images_by_digest_or_tag_get_their_pull_policy_and_checkov_skips() {
    let digest = "sha256:5f2c0e4a9b7d1c3e8f6a0b2d4c6e8f1a3b5d7c9e1f3a5b7d9c1e3f5a7b9d1c3e";
    let pinned = |overlay| {
        let mut p = params(2, 1, overlay);
        p.images = jobs::StepImages {
            copier: Some(format!("r.io/copier@{digest}")),
            trainer: Some(format!("r.io/trainer-x@{digest}")),
            aggregator: Some(format!("r.io/aggregator@{digest}")),
        };
        p
    };
    for overlay in [Overlay::Local, Overlay::Gke, Overlay::Gpu] {
        let all = images_of(&pinned(overlay));
        assert_eq!(all.len(), 1 + 1 + 2 * 2, "download, copier, 2 rounds of 2");
        for (job, image, policy, skips) in all {
            assert!(
                image.starts_with("r.io/") && image.ends_with(digest),
                "{job}: {image}"
            );
            assert_eq!(policy, "IfNotPresent", "{overlay:?} {job}");
            assert_eq!(skips, 0, "{overlay:?} {job}: nothing to skip with digests");
        }
    }
    for (job, image, policy, skips) in images_of(&params(2, 1, Overlay::Gke)) {
        assert!(image.starts_with("example.io/fedimdb/") && image.ends_with(":0.1.0"));
        assert_eq!(policy, "Always", "{job}: a tag may move in the registry");
        assert_eq!(skips, 0, "{job}: a cloud cluster gets no skips");
    }
    let local = jobs::steps(&params(2, 1, Overlay::Local));
    for s in &local {
        let a = s.job.metadata.annotations.clone().unwrap();
        for (key, value) in jobs::LOCAL_IMAGE_SKIPS {
            assert_eq!(a[key], value, "{}", s.name());
            let (id, why) = value.split_once('=').unwrap();
            assert!(id.starts_with("CKV_K8S_") && !why.contains('='), "{value}");
        }
    }
    assert!(
        images_of(&params(2, 1, Overlay::Local))
            .iter()
            .all(|(_, _, policy, _)| policy == "IfNotPresent")
    );
}

/// A local cluster's trainers ask for less (as manifests/components/local), the limits stay.
#[test]
fn local_trainers_request_less() {
    let requests = |overlay| {
        let j = trainer_job(&params(2, 1, overlay), 0);
        let c = &j.spec.unwrap().template.spec.unwrap().containers[0];
        let r = c.resources.clone().unwrap();
        let get = |m: Option<std::collections::BTreeMap<String, Quantity>>, k: &str| {
            m.unwrap()[k].clone()
        };
        (
            get(r.requests.clone(), "cpu").0,
            get(r.requests, "memory").0,
            get(r.limits, "cpu").0,
        )
    };
    assert_eq!(
        requests(Overlay::Local),
        ("250m".into(), "1Gi".into(), "2".into())
    );
    assert_eq!(
        requests(Overlay::Gke),
        ("1".into(), "2Gi".into(), "2".into())
    );
}
