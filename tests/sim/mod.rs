//! A simulated Kubernetes cluster for the system tests: enough of the API server, the Job
//! controller and the kubelet for `pipeline k8s` to run a whole training run against it,
//! with every pod a local process of the real binary its image names.
//!
//! - `apiserver.rs`: the HTTP API on 127.0.0.1 (what the driver calls, nothing more);
//! - `store.rs`: the objects, resourceVersions, selectors, merge patches;
//! - `controller.rs`: the Job controller (pods per Job and index, retries, failure policy,
//!   status and conditions);
//! - `kubelet.rs`: pods as processes (images to binaries, env, volumes as folders, logs,
//!   termination messages).
//!
//! What a run against it proves: the driver's API calls, as kube's client makes them,
//! drive Jobs whose pods run the real binaries with the arguments, env, index and
//! termination-message wiring of the Jobs the driver builds, and the failure handling the
//! Jobs' specs ask the Job controller for. What it does not prove: anything a real
//! cluster adds — scheduling, the kubelet's container runtime, images, NFS, resource
//! limits, security contexts, RBAC, admission, the API server's validation and
//! server-side apply's field ownership (docs/KUBERNETES.md, "The simulated cluster").

#![allow(dead_code)]

pub mod apiserver;
pub mod controller;
pub mod fixtures;
pub mod kubelet;
pub mod store;

use std::collections::{BTreeMap, HashMap};
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant, SystemTime};

use serde_json::Value;

use store::{Kind, Selector, Store};

/// One container about to be started, as a [`LaunchHook`] sees it: its args and env are
/// final (expanded, paths rewritten) and may be changed.
pub struct Launch<'a> {
    /// The Job the pod belongs to (its `batch.kubernetes.io/job-name` label).
    pub job: &'a str,
    pub pod: &'a str,
    /// The completion index, for an Indexed Job.
    pub index: Option<u32>,
    pub container: &'a str,
    pub image: &'a str,
    pub args: &'a mut Vec<String>,
    pub env: &'a mut Vec<(String, String)>,
}

/// Changes containers as they start: the tests' way to break a pod on purpose (an
/// injected fault, a bad flag), standing in for what breaks pods in a cluster.
pub type LaunchHook = Box<dyn Fn(&mut Launch) + Send + Sync>;

/// What the simulator, the API server and the controllers share.
pub struct Shared {
    pub store: Mutex<Store>,
    pub tracks: Mutex<HashMap<String, controller::Track>>,
    pub procs: Mutex<kubelet::Procs>,
    /// Where the binaries the images name are.
    pub bin_dir: PathBuf,
    /// Claim name -> the folder that is its volume.
    pub claims: BTreeMap<String, PathBuf>,
    pub hook: Option<LaunchHook>,
    /// The simulator's own files: pods' logs and termination messages, emptyDirs.
    pub work: PathBuf,
    pub kubeconfig: PathBuf,
    /// Requests the API server did not serve, and pods that could not start: each a
    /// line saying what. The tests want none.
    pub unserved: Mutex<Vec<String>>,
    /// Every request, `METHOD PATH?QUERY`, in order.
    pub requests: Mutex<Vec<String>>,
}

/// How to build a [`Sim`].
pub struct SimConfig {
    pub bin_dir: PathBuf,
    /// The volume of each claim, by claim name.
    pub claims: BTreeMap<String, PathBuf>,
    /// The namespace of the kubeconfig's context.
    pub namespace: String,
    pub hook: Option<LaunchHook>,
}

/// A running simulated cluster. Dropping it kills every pod's process.
pub struct Sim {
    rt: tokio::runtime::Runtime,
    pub shared: Arc<Shared>,
    pub addr: SocketAddr,
    pub kubeconfig: PathBuf,
    _work: tempfile::TempDir,
}

/// How often the Job controller looks at the Jobs.
const TICK: Duration = Duration::from_millis(20);

impl Sim {
    pub fn start(cfg: SimConfig) -> Sim {
        let work = tempfile::Builder::new()
            .prefix("fedimdb-k8s-sim-")
            .tempdir()
            .expect("a temporary folder for the simulator");
        let kubeconfig = work.path().join("kubeconfig");
        let rt = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(2)
            .enable_all()
            .build()
            .expect("a runtime for the simulator");
        let listener = rt
            .block_on(tokio::net::TcpListener::bind("127.0.0.1:0"))
            .expect("a port on 127.0.0.1 for the simulated API server");
        let addr = listener.local_addr().expect("the listener's address");
        std::fs::write(
            &kubeconfig,
            format!(
                "apiVersion: v1\nkind: Config\ncurrent-context: sim\nclusters:\n- name: sim\n  \
                 cluster:\n    server: http://{addr}\ncontexts:\n- name: sim\n  context:\n    \
                 cluster: sim\n    user: sim\n    namespace: {}\nusers:\n- name: sim\n  user: {{}}\n",
                cfg.namespace
            ),
        )
        .expect("the kubeconfig is written");
        let shared = Arc::new(Shared {
            store: Mutex::default(),
            tracks: Mutex::default(),
            procs: Mutex::default(),
            bin_dir: cfg.bin_dir,
            claims: cfg.claims,
            hook: cfg.hook,
            work: work.path().to_path_buf(),
            kubeconfig: kubeconfig.clone(),
            unserved: Mutex::default(),
            requests: Mutex::default(),
        });
        let app = apiserver::router(shared.clone());
        rt.spawn(async move {
            let _ = axum::serve(listener, app).await;
        });
        let sh = shared.clone();
        rt.spawn(async move {
            let mut tick = tokio::time::interval(TICK);
            loop {
                tick.tick().await;
                controller::reconcile(&sh);
            }
        });
        Sim {
            rt,
            shared,
            addr,
            kubeconfig,
            _work: work,
        }
    }

    pub fn job(&self, ns: &str, name: &str) -> Option<Value> {
        self.shared
            .store
            .lock()
            .unwrap()
            .get(Kind::Job, ns, name)
            .cloned()
    }

    pub fn jobs(&self, ns: &str) -> Vec<Value> {
        self.shared
            .store
            .lock()
            .unwrap()
            .list(Kind::Job, ns, &Selector::default())
    }

    /// The pods of a Job, in name order.
    pub fn pods_of(&self, ns: &str, job: &str) -> Vec<Value> {
        let sel = Selector::parse(&format!("{}={job}", controller::JOB_NAME_KEY)).unwrap();
        self.shared.store.lock().unwrap().list(Kind::Pod, ns, &sel)
    }

    pub fn lease(&self, ns: &str, name: &str) -> Option<Value> {
        self.shared
            .store
            .lock()
            .unwrap()
            .get(Kind::Lease, ns, name)
            .cloned()
    }

    /// Creates a Job as `kubectl create` would (for the driver Job of `manifests/`).
    pub fn create_job(&self, ns: &str, job: Value) -> Value {
        let mut store = self.shared.store.lock().unwrap();
        let made = store
            .create(Kind::Job, ns, job)
            .unwrap_or_else(|e| panic!("cannot create the Job: {}", e.message));
        controller::default_job(&mut store, ns, &made)
    }

    /// Moves a Lease's `renewTime` (and `acquireTime`) `by` into the past: the simulator's
    /// way of letting a dead driver's lock expire without the tests waiting for it.
    pub fn age_lease(&self, ns: &str, name: &str, by: Duration) {
        let then = store::rfc3339_micro(SystemTime::now() - by);
        let found = self
            .shared
            .store
            .lock()
            .unwrap()
            .modify(Kind::Lease, ns, name, |l| {
                l["spec"]["renewTime"] = Value::String(then.clone());
                l["spec"]["acquireTime"] = Value::String(then.clone());
            });
        assert!(found.is_some(), "no Lease {ns}/{name} to age");
    }

    /// SIGKILLs the pod's running container; false if it runs none.
    pub fn kill_pod(&self, ns: &str, pod: &str) -> bool {
        kubelet::kill(&self.shared, ns, pod)
    }

    /// Evicts a pod: the `DisruptionTarget` condition, then it is stopped and deleted.
    pub fn evict_pod(&self, ns: &str, pod: &str) {
        let _g = self.rt.enter();
        kubelet::terminate(&self.shared, ns, pod, true);
    }

    /// Waits (polling) until `f` gives `Some`, at most `timeout`; panics naming `what`.
    pub fn wait_for<T>(
        &self,
        what: &str,
        timeout: Duration,
        mut f: impl FnMut(&Sim) -> Option<T>,
    ) -> T {
        let t0 = Instant::now();
        loop {
            if let Some(v) = f(self) {
                return v;
            }
            assert!(t0.elapsed() < timeout, "waited {timeout:?} for {what}");
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// Requests not served and pods that could not start (each a line).
    pub fn unserved(&self) -> Vec<String> {
        self.shared.unserved.lock().unwrap().clone()
    }

    pub fn requests(&self) -> Vec<String> {
        self.shared.requests.lock().unwrap().clone()
    }

    /// The log of a pod's container, as the API serves it.
    pub fn log(&self, ns: &str, pod: &str, container: &str) -> String {
        std::fs::read_to_string(
            self.shared
                .work
                .join("pods")
                .join(ns)
                .join(pod)
                .join(format!("{container}.log")),
        )
        .unwrap_or_default()
    }

    pub fn work_dir(&self) -> &Path {
        &self.shared.work
    }
}

impl Drop for Sim {
    fn drop(&mut self) {
        let pids: Vec<u32> = self.shared.procs.lock().unwrap().running_pids();
        for p in pids {
            // SAFETY: kill(2) on a child this simulator spawned and still waits for.
            unsafe {
                libc::kill(p as i32, libc::SIGKILL);
            }
        }
    }
}
