//! Model and update files: safetensors with a JSON header.
//!
//! Three kinds of file share one format:
//!
//! | kind      | written by          | tensors |
//! |-----------|---------------------|---------|
//! | `stats`   | trainer, round 0    | `stats.count`: per class, per-bucket document counts; `stats.scaled`: the same sums of each review's scale `1/sqrt(|S|)` (the gradient at the starting model, see [`crate::control`]) |
//! | `update`  | trainer, rounds ≥ 1 | `update.index`: the buckets the shard touches; `linear.weight`, `grad.weight`: the trained weights and the shard's gradient at those buckets; `linear.bias`, `grad.bias` |
//! | `model`   | aggregator          | `linear.weight`, `linear.bias`, `nb.ratio` |
//! | `control` | aggregator          | `control.weight`, `control.bias`: the global control variate (SCAFFOLD) |
//!
//! Tensors are flat and row-major: one row per model row ([`ModelConfig::rows`]: one for two
//! classes, K for K classes) for weights, ratios, gradients and controls, one per class for
//! the statistics, each row `dim` long (dense files) or `update.index` long (sparse ones);
//! biases hold one value per row.
//!
//! Updates are sparse: a bucket no review of the shard reads moves in a way the aggregator
//! can compute itself ([`crate::train::Drift`]), so only the touched buckets are written,
//! and the update is still lossless. `update.index` is u32; every other tensor is
//! little-endian f32. Everything else lives in one safetensors metadata
//! entry, `fedimdb`, holding a JSON [`Header`] (one entry, so the bytes are deterministic:
//! safetensors writes its metadata map in hash order). Loading checks the kind, shapes,
//! dtypes and that every value is finite, and names the file when something is wrong.

use std::borrow::Cow;
use std::collections::{BTreeMap, HashMap};
use std::path::Path;
use std::sync::Arc;

use anyhow::{Context, Result, bail, ensure};
use safetensors::tensor::{Dtype, SafeTensors, TensorView};
use serde::{Deserialize, Serialize};

use crate::atomic::write_parts_atomic;
use crate::digest::{sha256_bytes, sha256_parts};
use crate::model::{BIAS, ClassCounts, Model, ModelConfig, NB_RATIO, WEIGHT};
use crate::verify::FileBytes;

/// Version of the file format; bumped when a reader could misread older files, or an older
/// reader newer ones.
pub const FORMAT_VERSION: u32 = 3;
/// The version before sparse files could list their buckets as a bitmap
/// ([`UPDATE_MASK`]); its files have today's layout otherwise and load as they are.
pub const FORMAT_VERSION_INDEX_LIST: u32 = 2;
/// The version of 2-class files before K classes: model files of it have today's layout and
/// still load (a server keeps serving them); its statistics and control files held other
/// tensors and are refused, so a run started before is recomputed from its statistics.
pub const FORMAT_VERSION_BINARY: u32 = 1;
/// The metadata key holding the [`Header`].
pub const METADATA_KEY: &str = "fedimdb";
pub const STATS_COUNT: &str = "stats.count";
pub const STATS_SCALED: &str = "stats.scaled";
pub const UPDATE_INDEX: &str = "update.index";
/// A sparse file's buckets as a bitmap over the config's buckets (bit `j % 8` of byte
/// `j / 8` set for bucket `j`), written instead of [`UPDATE_INDEX`] when it is smaller: when
/// a shard touches more than one bucket in 32, as the shards of a few workers do (a 5,000-review
/// shard touches about 1.2 M of 4.2 M buckets: 0.5 MB of bitmap against 4.6 MB of u32).
pub const UPDATE_MASK: &str = "update.mask";
pub const GRAD_WEIGHT: &str = "grad.weight";
pub const GRAD_BIAS: &str = "grad.bias";
pub const CONTROL_WEIGHT: &str = "control.weight";
pub const CONTROL_BIAS: &str = "control.bias";
pub const MOMENTS_FIRST: &str = "moments.first";
pub const MOMENTS_SECOND: &str = "moments.second";

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Kind {
    Stats,
    Update,
    Model,
    Control,
    /// The server optimizer's state (`fedimdb::server_optimizer::Moments`).
    Moments,
}

impl Kind {
    /// The f32 tensor names a file of this kind holds, sorted.
    pub fn tensor_names(self) -> &'static [&'static str] {
        match self {
            Kind::Stats => &[STATS_COUNT, STATS_SCALED],
            Kind::Update => &[GRAD_BIAS, GRAD_WEIGHT, BIAS, WEIGHT],
            Kind::Model => &[BIAS, WEIGHT, NB_RATIO],
            Kind::Control => &[CONTROL_BIAS, CONTROL_WEIGHT],
            Kind::Moments => &[MOMENTS_FIRST, MOMENTS_SECOND],
        }
    }

    /// Whether the file is sparse: its per-bucket tensors hold the buckets of `update.index`.
    pub fn is_sparse(self) -> bool {
        matches!(self, Kind::Update | Kind::Stats)
    }
}

/// One point of a model's training history, for the model card.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct RoundPoint {
    pub round: u32,
    pub test_accuracy: f64,
}

/// What a person or program wants to know about a trained model. The one card type: a
/// model file's header holds it, and `model/latest.json` holds it with the three
/// publication fields filled in (which model file it describes, from which round, since
/// when), so a reader of either finds the same fields.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, Default)]
pub struct ModelCard {
    /// Published cards only (`model/latest.json`): its fields stand first in the card.
    #[serde(flatten)]
    pub published: Option<Publication>,
    pub workers: usize,
    pub partition: crate::manifest::Partition,
    pub alpha: Option<f64>,
    pub train_samples: u64,
    /// Test accuracy after each training round.
    pub history: Vec<RoundPoint>,
    /// Test-set metrics of this model.
    pub metrics: BTreeMap<String, f64>,
    /// The label names in class order: class k is `labels[k]`. Empty in cards written before
    /// K classes, which are IMDB sentiment ([`ModelCard::label_names`]).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub labels: Vec<String>,
    /// What the model predicts, in words for people: `IMDB sentiment`, `IMDB rating`, or
    /// the name of the data's source. Absent in cards written before K classes (IMDB
    /// sentiment).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub task: Option<String>,
}

impl ModelCard {
    /// The label names in class order, IMDB's `neg`, `pos` for cards from before K classes.
    pub fn label_names(&self) -> Vec<String> {
        if self.labels.is_empty() {
            crate::labels::Task::Sentiment.labels()
        } else {
            self.labels.clone()
        }
    }

    /// What the model predicts, `IMDB sentiment` for cards from before K classes.
    pub fn task_name(&self) -> String {
        self.task
            .clone()
            .unwrap_or_else(|| crate::labels::Task::Sentiment.title().to_owned())
    }
}

/// Which model file a published card describes, from which round, since when.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Publication {
    /// The round that made the model.
    pub round: u32,
    /// The SHA-256 of `model/latest.safetensors`.
    pub sha256: String,
    /// When it was published (RFC 3339 UTC).
    pub trained_at: String,
}

impl ModelCard {
    /// This card as published now: for the model of `round` whose file has checksum `sha256`.
    pub fn published(self, round: u32, sha256: String) -> Self {
        Self {
            published: Some(Publication {
                round,
                sha256,
                trained_at: crate::report::utc_now(),
            }),
            ..self
        }
    }
}

/// The JSON header of every file.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Header {
    pub kind: Kind,
    pub format_version: u32,
    /// fedimdb version that wrote the file.
    pub version: String,
    pub config: ModelConfig,
    /// The round that produced the file.
    pub round: u32,
    /// The worker's shard (updates and stats).
    pub shard: Option<usize>,
    /// Training reviews behind the file: a worker's shard size, or the total for a model.
    pub samples: u64,
    /// Stats and control files: how many of `samples` are of each class.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub class_samples: Option<Vec<u64>>,
    pub seed: Option<u64>,
    /// SHA-256 of the global model an update started from, so the aggregator can refuse
    /// an update trained from the wrong model.
    pub base_sha256: Option<String>,
    /// Training hyper-parameters (updates, and models trained by the trainer's original form).
    pub train: Option<crate::train::TrainConfig>,
    /// The model card (models).
    pub card: Option<ModelCard>,
    /// Control files: for each shard, the round whose update holds the gradient counted in
    /// the control variate (0: the shard's statistics of round 0).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub sources: Option<Vec<u32>>,
    /// Updates: SHA-256 of the control file the worker's correction came from.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub control_sha256: Option<String>,
}

impl Header {
    /// How many of `samples` are of each class (stats and control files), checked to add up
    /// to `samples`, one count per class of the config.
    pub fn class_samples(&self) -> Result<Vec<u64>> {
        let counts = self
            .class_samples
            .clone()
            .with_context(|| format!("the {:?} header lacks `class_samples`", self.kind))?;
        ensure!(
            counts.len() == self.config.classes() && counts.iter().sum::<u64>() == self.samples,
            "the {:?} header's class_samples {counts:?} are not {} counts adding up to its {} samples",
            self.kind,
            self.config.classes(),
            self.samples
        );
        Ok(counts)
    }

    pub fn new(kind: Kind, config: ModelConfig, round: u32) -> Self {
        Self {
            kind,
            format_version: FORMAT_VERSION,
            version: crate::VERSION.to_owned(),
            config,
            round,
            shard: None,
            samples: 0,
            class_samples: None,
            seed: None,
            base_sha256: None,
            train: None,
            card: None,
            sources: None,
            control_sha256: None,
        }
    }
}

/// A tensor's f32 values: owned, or read in place from the mapped file they were loaded from.
///
/// A loaded model-sized table is only read by most steps (a trainer gathers its shard's
/// buckets from the global model and the control variate), so copying it out of the file
/// would fault in and fill as many fresh pages as the file has, for nothing. Writing to
/// mapped values copies them first (`to_mut`).
#[derive(Clone)]
pub struct Values(Repr);

#[derive(Clone)]
enum Repr {
    Owned(Vec<f32>),
    /// Values inside `file`'s mapping, which `_file` keeps alive: the mapping does not move
    /// when the `Arc` does, so the slice stays valid for as long as this value exists, and
    /// it is only ever lent out for the lifetime of a borrow of it.
    Mapped {
        _file: Arc<FileBytes>,
        values: &'static [f32],
    },
}

impl Values {
    /// The values of `raw`, a tensor's little-endian bytes inside `file`: in place where they
    /// are aligned for f32 (as safetensors lays out f32 tensors, and as a mapping starts
    /// on a page), copied otherwise.
    fn of(raw: &[u8], file: Option<&Arc<FileBytes>>) -> Self {
        Self(match (file, bytemuck::try_cast_slice::<u8, f32>(raw)) {
            (Some(file), Ok(aligned)) => {
                // SAFETY: `aligned` points into the mapping `file` holds (`raw` was cut from
                // its bytes); see `Repr::Mapped` for why extending the lifetime is sound.
                let values = unsafe { std::slice::from_raw_parts(aligned.as_ptr(), aligned.len()) };
                Repr::Mapped {
                    _file: Arc::clone(file),
                    values,
                }
            }
            (None, Ok(aligned)) => Repr::Owned(aligned.to_vec()),
            (_, Err(_)) => Repr::Owned(
                raw.chunks_exact(4)
                    .map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]]))
                    .collect(),
            ),
        })
    }

    /// Whether the values are read in place from a mapped file.
    pub fn is_mapped(&self) -> bool {
        matches!(self.0, Repr::Mapped { .. })
    }

    /// The values as an owned vector, copied out of the file if they are mapped.
    pub fn into_vec(self) -> Vec<f32> {
        match self.0 {
            Repr::Owned(v) => v,
            Repr::Mapped { values, .. } => values.to_vec(),
        }
    }

    /// The values, owned from now on, to change.
    pub fn to_mut(&mut self) -> &mut Vec<f32> {
        if let Repr::Mapped { values, .. } = self.0 {
            self.0 = Repr::Owned(values.to_vec());
        }
        match &mut self.0 {
            Repr::Owned(v) => v,
            Repr::Mapped { .. } => unreachable!("made owned above"),
        }
    }
}

impl std::ops::Deref for Values {
    type Target = [f32];
    fn deref(&self) -> &[f32] {
        match &self.0 {
            Repr::Owned(v) => v,
            Repr::Mapped { values, .. } => values,
        }
    }
}

impl std::ops::DerefMut for Values {
    fn deref_mut(&mut self) -> &mut [f32] {
        self.to_mut()
    }
}

impl Default for Values {
    fn default() -> Self {
        Self(Repr::Owned(Vec::new()))
    }
}

impl<'a> IntoIterator for &'a Values {
    type Item = &'a f32;
    type IntoIter = std::slice::Iter<'a, f32>;
    fn into_iter(self) -> Self::IntoIter {
        self.iter()
    }
}

impl From<Vec<f32>> for Values {
    fn from(v: Vec<f32>) -> Self {
        Self(Repr::Owned(v))
    }
}

impl PartialEq for Values {
    fn eq(&self, other: &Self) -> bool {
        **self == **other
    }
}

impl std::fmt::Debug for Values {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        (**self).fmt(f)
    }
}

/// A table as safetensors' header sees it: its type, shape and size, without its bytes
/// ([`Checkpoint::file_parts`] writes those from where they lie).
struct Sized {
    dtype: Dtype,
    shape: Vec<usize>,
    len: usize,
}

impl safetensors::View for Sized {
    fn dtype(&self) -> Dtype {
        self.dtype
    }

    fn shape(&self) -> &[usize] {
        &self.shape
    }

    fn data(&self) -> Cow<'_, [u8]> {
        Cow::Borrowed(&[])
    }

    fn data_len(&self) -> usize {
        self.len
    }
}

/// A loaded file: its header, its f32 tensors by name, the buckets of a sparse file, and
/// the SHA-256 of its bytes.
#[derive(Debug, Clone)]
pub struct Checkpoint {
    pub header: Header,
    pub tensors: BTreeMap<String, Values>,
    /// `update.index` of a sparse file (strictly increasing buckets); empty otherwise.
    pub index: Vec<u32>,
    pub sha256: String,
}

impl Checkpoint {
    /// Serialises to safetensors bytes. Tensors must be the kind's names with the config's
    /// shapes.
    pub fn to_bytes(&self) -> Result<Vec<u8>> {
        Ok(self.file_parts()?.concat())
    }

    /// Writes the file atomically; returns its SHA-256. The tables are written and hashed
    /// where they lie, not copied into a buffer the size of the file first.
    pub fn save(&self, path: &Path) -> Result<String> {
        let parts = self.file_parts()?;
        let parts: Vec<&[u8]> = parts.iter().map(|p| &p[..]).collect();
        write_parts_atomic(path, &parts)?;
        Ok(sha256_parts(&parts))
    }

    /// Whether a sparse file lists its buckets as a bitmap (`update.mask`, a bit per model
    /// bucket) rather than as a list (`update.index`, 4 bytes per touched bucket): whichever
    /// is smaller.
    fn writes_mask(&self) -> bool {
        self.header.config.dim().div_ceil(8) < 4 * self.index.len()
    }

    /// The file's bytes in order: safetensors' header, then each table where it lies (a
    /// sparse file's bucket mask, built here, excepted).
    fn file_parts(&self) -> Result<Vec<Cow<'_, [u8]>>> {
        self.check_tensors()
            .context("refusing to write an inconsistent checkpoint")?;
        // Safetensors stores little-endian values; on a little-endian machine (every target
        // we build for) the f32 memory is already that byte layout, so it is viewed, not copied.
        const _: () = assert!(
            cfg!(target_endian = "little"),
            "checkpoints assume a little-endian machine"
        );
        let mut tables: Vec<(&str, Dtype, Cow<'_, [u8]>)> = self
            .tensors
            .iter()
            .map(|(name, v)| {
                (
                    name.as_str(),
                    Dtype::F32,
                    bytemuck::cast_slice(&v[..]).into(),
                )
            })
            .collect();
        if self.header.kind.is_sparse() {
            let dim = self.header.config.dim();
            tables.push(if self.writes_mask() {
                (
                    UPDATE_MASK,
                    Dtype::U8,
                    index_to_mask(&self.index, dim).into(),
                )
            } else {
                (
                    UPDATE_INDEX,
                    Dtype::U32,
                    bytemuck::cast_slice(&self.index).into(),
                )
            });
        }
        // Safetensors' own order: by falling alignment, then by name. The header is
        // serialised by the crate from the tables' sizes alone (`Sized`), so it is exactly
        // the header of `safetensors::serialize` on the whole tables (a test pins the two).
        tables.sort_by(|(ln, ld, _), (rn, rd, _)| rd.cmp(ld).then(ln.cmp(rn)));
        let sizes = tables.iter().map(|(name, dtype, bytes)| {
            let shape = vec![bytes.len() * 8 / dtype.bitsize()];
            (
                *name,
                Sized {
                    dtype: *dtype,
                    shape,
                    len: bytes.len(),
                },
            )
        });
        let meta = HashMap::from([(
            METADATA_KEY.to_owned(),
            serde_json::to_string(&self.header)?,
        )]);
        let head = safetensors::serialize(sizes, Some(meta))?;
        Ok(std::iter::once(head.into())
            .chain(tables.into_iter().map(|(_, _, bytes)| bytes))
            .collect())
    }

    /// Parses and validates safetensors bytes; `origin` names the file in errors.
    pub fn from_bytes(bytes: &[u8], origin: &Path) -> Result<Self> {
        Self::from_hashed_bytes(bytes, origin, sha256_bytes(bytes))
    }

    /// [`Self::from_bytes`] for bytes whose SHA-256 the caller has just computed (a verified
    /// read), so a model-sized file is not hashed twice.
    pub fn from_hashed_bytes(bytes: &[u8], origin: &Path, sha256: String) -> Result<Self> {
        Self::parse(bytes, None, origin, sha256)
    }

    /// [`Self::from_hashed_bytes`] for a mapped file: the tensors are read in place
    /// ([`Values::is_mapped`]), not copied.
    pub fn from_mapped(file: FileBytes, origin: &Path, sha256: String) -> Result<Self> {
        let file = Arc::new(file);
        Self::parse(&file, Some(&file), origin, sha256)
    }

    fn parse(
        bytes: &[u8],
        file: Option<&Arc<FileBytes>>,
        origin: &Path,
        sha256: String,
    ) -> Result<Self> {
        let what = origin.display();
        let st = SafeTensors::deserialize(bytes).with_context(|| {
            format!("{what} is not a readable safetensors file (truncated or corrupt?)")
        })?;
        let (_, meta) = SafeTensors::read_metadata(bytes)?;
        let header_json = meta
            .metadata()
            .as_ref()
            .and_then(|m| m.get(METADATA_KEY))
            .with_context(|| {
                format!("{what} has no `{METADATA_KEY}` metadata: it was not written by fedimdb")
            })?;
        let header: Header = serde_json::from_str(header_json)
            .with_context(|| format!("{what} has an unreadable `{METADATA_KEY}` header"))?;
        ensure!(
            [FORMAT_VERSION, FORMAT_VERSION_INDEX_LIST].contains(&header.format_version)
                || (header.format_version == FORMAT_VERSION_BINARY && header.kind == Kind::Model),
            "{what} has format_version {}, this build reads {FORMAT_VERSION_INDEX_LIST} and \
             {FORMAT_VERSION} (and model files of {FORMAT_VERSION_BINARY}); it was written by \
             another fedimdb version: recompute it (a run recomputes from round 0 with \
             `--from-round 0`)",
            header.format_version
        );
        header
            .config
            .validate()
            .map_err(|e| anyhow::anyhow!("{what}: bad model config: {e}"))?;
        let mut tensors = BTreeMap::new();
        let mut index = Vec::new();
        let mut listed = false;
        for (name, view) in st.tensors() {
            if header.kind.is_sparse() && [UPDATE_INDEX, UPDATE_MASK].contains(&name.as_str()) {
                ensure!(!listed, "{what} lists its buckets twice");
                (index, listed) = (buckets(&what, &name, &view, header.config.dim())?, true);
                continue;
            }
            ensure!(
                view.dtype() == Dtype::F32,
                "{what}: tensor `{name}` has dtype {:?}, expected F32",
                view.dtype()
            );
            tensors.insert(name, Values::of(view.data(), file));
        }
        let ck = Self {
            header,
            tensors,
            index,
            sha256,
        };
        ck.check_tensors()
            .with_context(|| format!("{what} is not a valid {:?} file", ck.header.kind))?;
        Ok(ck)
    }

    /// Reads and validates a file.
    pub fn load(path: &Path) -> Result<Self> {
        let bytes =
            std::fs::read(path).with_context(|| format!("cannot read {}", path.display()))?;
        Self::from_bytes(&bytes, path)
    }

    /// Reads a file and checks it is of the expected kind.
    pub fn load_kind(path: &Path, kind: Kind) -> Result<Self> {
        Self::load(path)?.expect_kind(kind, path)
    }

    /// This checkpoint if it is of `kind`; otherwise an error naming `origin`.
    pub fn expect_kind(self, kind: Kind, origin: &Path) -> Result<Self> {
        ensure!(
            self.header.kind == kind,
            "{} is a {:?} file, expected kind {kind:?}",
            origin.display(),
            self.header.kind
        );
        Ok(self)
    }

    fn check_tensors(&self) -> Result<()> {
        let want = self.header.kind.tensor_names();
        let have: Vec<&str> = self.tensors.keys().map(String::as_str).collect();
        let mut want_sorted = want.to_vec();
        want_sorted.sort_unstable();
        ensure!(
            have == want_sorted,
            "tensors are {have:?}, expected {want_sorted:?}"
        );
        let dim = self.header.config.dim();
        let per_bucket = if self.header.kind.is_sparse() {
            ensure!(
                self.index.windows(2).all(|w| w[0] < w[1])
                    && self.index.last().is_none_or(|&j| (j as usize) < dim),
                "`{UPDATE_INDEX}` must hold strictly increasing buckets below {dim}"
            );
            self.index.len()
        } else {
            ensure!(
                self.index.is_empty(),
                "a {:?} file has no `{UPDATE_INDEX}`",
                self.header.kind
            );
            dim
        };
        let (rows, classes) = (self.header.config.rows(), self.header.config.classes());
        for (name, v) in &self.tensors {
            let expect = if [BIAS, GRAD_BIAS, CONTROL_BIAS].contains(&name.as_str()) {
                rows
            } else if self.header.kind == Kind::Stats {
                classes * per_bucket
            } else {
                rows * per_bucket
            };
            ensure!(
                v.len() == expect,
                "tensor `{name}` has {} values, expected {expect} for the config",
                v.len()
            );
            if let Some(i) = first_non_finite(v) {
                bail!(
                    "tensor `{name}` holds a non-finite value ({}) at index {i}",
                    v[i]
                );
            }
        }
        Ok(())
    }

    /// Fails unless this is a file of `kind`, which holds `what`.
    pub fn holds(&self, kind: Kind, what: &str) -> Result<()> {
        ensure!(
            self.header.kind == kind,
            "a {:?} file holds no {what}",
            self.header.kind
        );
        Ok(())
    }

    /// The f32 values of tensor `name` (present after validation).
    pub fn tensor(&self, name: &str) -> &[f32] {
        &self.tensors[name]
    }

    /// Takes tensor `name` out of the checkpoint, copied only if it is mapped.
    pub fn take_tensor(&mut self, name: &str) -> Result<Vec<f32>> {
        self.tensors
            .remove(name)
            .map(Values::into_vec)
            .with_context(|| format!("checkpoint has no tensor `{name}`"))
    }

    /// A model file from a model.
    pub fn from_model(model: Model, mut header: Header) -> Self {
        header.kind = Kind::Model;
        header.config = model.config;
        let tensors = BTreeMap::from([
            (WEIGHT.to_owned(), model.weight.into()),
            (BIAS.to_owned(), model.bias.into()),
            (NB_RATIO.to_owned(), model.nb_ratio.into()),
        ]);
        Self {
            header,
            tensors,
            index: Vec::new(),
            sha256: String::new(),
        }
    }

    /// A dense file of `kind` from its tensors.
    pub fn dense(
        kind: Kind,
        mut header: Header,
        tensors: impl IntoIterator<Item = (&'static str, Vec<f32>)>,
    ) -> Self {
        header.kind = kind;
        let tensors = tensors
            .into_iter()
            .map(|(k, v)| (k.to_owned(), v.into()))
            .collect();
        Self {
            header,
            tensors,
            index: Vec::new(),
            sha256: String::new(),
        }
    }

    /// The model in a model file, taken out of the checkpoint without copying its tables.
    pub fn into_model(mut self) -> Result<Model> {
        self.holds(Kind::Model, "model")?;
        Ok(Model {
            config: self.header.config,
            bias: self.take_tensor(BIAS)?,
            weight: self.take_tensor(WEIGHT)?,
            nb_ratio: self.take_tensor(NB_RATIO)?,
        })
    }

    /// The fast inference form of the model in a model file.
    pub fn scorer(&self) -> Result<crate::model::Scorer> {
        self.holds(Kind::Model, "model")?;
        Ok(crate::model::Scorer::new(
            self.header.config,
            self.tensor(WEIGHT),
            self.tensor(BIAS),
            self.tensor(NB_RATIO),
        ))
    }

    /// A sparse update file: the trained weights and the shard's gradient at the buckets of
    /// `index` (row-major), and the biases and their gradients.
    pub fn update(
        mut header: Header,
        index: Vec<u32>,
        weight: Vec<f32>,
        bias: Vec<f32>,
        grad: Vec<f32>,
        grad_bias: Vec<f32>,
    ) -> Self {
        header.kind = Kind::Update;
        let tensors = BTreeMap::from([
            (WEIGHT.to_owned(), weight.into()),
            (BIAS.to_owned(), bias.into()),
            (GRAD_WEIGHT.to_owned(), grad.into()),
            (GRAD_BIAS.to_owned(), grad_bias.into()),
        ]);
        Self {
            header,
            tensors,
            index,
            sha256: String::new(),
        }
    }

    /// A sparse stats file from a worker's counts: the buckets its reviews touch, one row
    /// per class.
    pub fn from_counts(counts: &ClassCounts, header: Header) -> Self {
        let dim = counts.counts[0].len();
        let index: Vec<u32> = (0..dim)
            .filter(|&j| counts.counts.iter().any(|c| c[j] != 0.0))
            .map(|j| j as u32)
            .collect();
        let gather = |rows: &[Vec<f32>]| -> Vec<f32> {
            rows.iter()
                .flat_map(|v| index.iter().map(|&j| v[j as usize]))
                .collect()
        };
        let (count, scaled) = (gather(&counts.counts), gather(&counts.scaled));
        Self::stats(header, counts.docs.clone(), index, count, scaled)
    }

    /// The stats file of a shard's reviews `docs` (model buckets) with `labels`, counted at
    /// the buckets they read only: what [`Self::from_counts`] makes of their
    /// [`ClassCounts::count`], the same bits (each bucket's sums are taken in the same order),
    /// without a model-sized table per class. A worker of 64 reads a few percent of the
    /// buckets.
    pub fn count(header: Header, classes: usize, docs: &[Vec<u32>], labels: &[u8]) -> Self {
        let buckets = crate::train::ShardBuckets::new(docs, header.config.dim());
        let n = buckets.len();
        let (mut count, mut scaled) = (vec![0.0f32; classes * n], vec![0.0f32; classes * n]);
        let mut class_samples = vec![0u64; classes];
        for (d, &y) in docs.iter().zip(labels) {
            let y = y as usize;
            class_samples[y] += 1;
            let s = crate::model::doc_scale(d.len());
            for (p, &j) in d.iter().enumerate() {
                if let Some(&ahead) = d.get(p + crate::prefetch::AHEAD) {
                    let l = y * n + buckets.position(ahead) as usize;
                    crate::prefetch::prefetch(&count[l]);
                    crate::prefetch::prefetch(&scaled[l]);
                }
                let l = buckets.position(j) as usize;
                count[y * n + l] += 1.0;
                scaled[y * n + l] += s;
            }
        }
        Self::stats(header, class_samples, buckets.into_touched(), count, scaled)
    }

    fn stats(
        mut header: Header,
        class_samples: Vec<u64>,
        index: Vec<u32>,
        count: Vec<f32>,
        scaled: Vec<f32>,
    ) -> Self {
        header.kind = Kind::Stats;
        header.samples = class_samples.iter().sum();
        header.class_samples = Some(class_samples);
        let tensors = BTreeMap::from([
            (STATS_COUNT.to_owned(), count.into()),
            (STATS_SCALED.to_owned(), scaled.into()),
        ]);
        Self {
            header,
            tensors,
            index,
            sha256: String::new(),
        }
    }

    /// The counts in a stats file.
    pub fn to_counts(&self) -> Result<ClassCounts> {
        self.holds(Kind::Stats, "statistics")?;
        let classes = self.header.class_samples()?.len();
        let mut counts = ClassCounts::zeros(classes, self.header.config.dim());
        self.add_counts_to(&mut counts)?;
        Ok(counts)
    }

    /// Adds the counts in a stats file to `total`, bucket by bucket where the file lists
    /// them, without making them dense first (the aggregator sums every worker's statistics
    /// this way). The sums are those of adding the dense counts: unlisted buckets add zero.
    pub fn add_counts_to(&self, total: &mut ClassCounts) -> Result<()> {
        self.holds(Kind::Stats, "statistics")?;
        let docs = self.header.class_samples()?;
        let (classes, dim) = (docs.len(), self.header.config.dim());
        ensure!(
            total.docs.len() == classes && total.counts.iter().all(|row| row.len() == dim),
            "the statistics are of {classes} classes over {dim} buckets, the sum they are added \
             to of {} classes over {} buckets",
            total.docs.len(),
            total.counts.first().map_or(0, Vec::len)
        );
        let n = self.index.len();
        for (name, table) in [
            (STATS_COUNT, &mut total.counts),
            (STATS_SCALED, &mut total.scaled),
        ] {
            let values = self.tensor(name);
            let rows = values.len().checked_div(n).unwrap_or(0);
            ensure!(
                rows <= classes,
                "tensor `{name}` holds {rows} rows of counts for {classes} classes"
            );
            for (row, values) in table.iter_mut().zip(values.chunks_exact(n.max(1))) {
                for (&j, &v) in self.index.iter().zip(values) {
                    row[j as usize] += v;
                }
            }
        }
        for (a, b) in total.docs.iter_mut().zip(&docs) {
            *a += b;
        }
        Ok(())
    }
}

/// The buckets a sparse file lists in tensor `name`, [`UPDATE_INDEX`] (u32, ascending) or
/// [`UPDATE_MASK`] (a bitmap over the config's `dim` buckets); `what` names the file.
fn buckets(
    what: &impl std::fmt::Display,
    name: &str,
    view: &TensorView,
    dim: usize,
) -> Result<Vec<u32>> {
    let dtype = if name == UPDATE_MASK {
        Dtype::U8
    } else {
        Dtype::U32
    };
    ensure!(
        view.dtype() == dtype,
        "{what}: tensor `{name}` has dtype {:?}, expected {dtype:?}",
        view.dtype()
    );
    let data = view.data();
    if name == UPDATE_INDEX {
        return Ok(data
            .chunks_exact(4)
            .map(|c| u32::from_le_bytes([c[0], c[1], c[2], c[3]]))
            .collect());
    }
    ensure!(
        data.len() == dim.div_ceil(8),
        "{what}: tensor `{name}` has {} bytes, expected {} for {dim} buckets",
        data.len(),
        dim.div_ceil(8)
    );
    Ok(mask_to_index(data))
}

/// The bitmap of ascending buckets `index` over `dim` buckets ([`UPDATE_MASK`]).
fn index_to_mask(index: &[u32], dim: usize) -> Vec<u8> {
    let mut mask = vec![0u8; dim.div_ceil(8)];
    for &j in index {
        mask[j as usize / 8] |= 1 << (j % 8);
    }
    mask
}

/// The ascending buckets set in a bitmap ([`UPDATE_MASK`]). Bits past the config's buckets
/// come back as buckets `≥ dim`, which the tensor check refuses.
fn mask_to_index(mask: &[u8]) -> Vec<u32> {
    let mut index = Vec::new();
    for (k, &byte) in mask.iter().enumerate() {
        let mut bits = byte;
        while bits != 0 {
            index.push((k * 8) as u32 + bits.trailing_zeros());
            bits &= bits - 1;
        }
    }
    index
}

/// The index of the first value that is infinite or NaN. Every model file a step reads is
/// checked, 16 MB per table; a search that stops at the first hit compiles to one branch per
/// value, so the values are tested a block at a time (a fold without an early exit, which
/// the compiler turns into vector instructions), and only a failing block is searched.
fn first_non_finite(v: &[f32]) -> Option<usize> {
    const BLOCK: usize = 1024;
    let block = v
        .chunks(BLOCK)
        .position(|c| c.iter().fold(false, |any, x| any | !x.is_finite()))?;
    let at = block * BLOCK;
    v[at..].iter().position(|x| !x.is_finite()).map(|i| at + i)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::Multiclass;

    fn cfg() -> ModelConfig {
        ModelConfig::with_buckets(10, 2)
    }

    /// The blockwise search finds the first infinite or NaN value wherever it lies (either
    /// side of a block's edge, the last value, among ordinary large and tiny values), as a
    /// plain search does, and nothing in a finite table.
    #[test]
    fn first_non_finite_is_the_first() {
        let base: Vec<f32> = (0..3000)
            .map(|i| match i % 4 {
                0 => f32::MAX,
                1 => -f32::MIN_POSITIVE / 2.0,
                2 => 0.0,
                _ => i as f32,
            })
            .collect();
        assert_eq!(first_non_finite(&base), None);
        assert_eq!(first_non_finite(&[]), None);
        for at in [0, 1, 1023, 1024, 1025, 2047, 2999] {
            for bad in [f32::NAN, f32::INFINITY, f32::NEG_INFINITY] {
                let mut v = base.clone();
                v[at] = bad;
                if at + 700 < v.len() {
                    v[at + 700] = f32::NAN;
                }
                let want = v.iter().position(|x| !x.is_finite());
                assert_eq!(first_non_finite(&v), want, "{bad} at {at}");
                assert_eq!(want, Some(at));
            }
        }
    }

    fn model() -> Model {
        let docs = vec![vec![1, 2], vec![3, 4]];
        Model::from_counts(cfg(), &ClassCounts::count(2, cfg().dim(), &docs, &[1, 0]))
    }

    #[test]
    fn model_round_trips_with_identical_bytes() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("m.safetensors");
        let ck = Checkpoint::from_model(model(), Header::new(Kind::Model, cfg(), 3));
        let sha = ck.save(&p).unwrap();
        let back = Checkpoint::load_kind(&p, Kind::Model).unwrap();
        assert_eq!(back.sha256, sha);
        assert_eq!(back.header.round, 3);
        assert_eq!(back.to_bytes().unwrap(), std::fs::read(&p).unwrap());
        assert_eq!(back.into_model().unwrap(), model());
    }

    /// A verified read maps the file and reads its tables in place; changing a value copies
    /// the table first and leaves the file as it was.
    #[test]
    fn mapped_files_are_read_in_place_and_copied_on_write() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("m.safetensors");
        let sha = Checkpoint::from_model(model(), Header::new(Kind::Model, cfg(), 3))
            .save(&p)
            .unwrap();
        let mut mapped =
            Checkpoint::from_mapped(FileBytes::map(&p).unwrap(), &p, sha.clone()).unwrap();
        let owned = Checkpoint::load(&p).unwrap();
        assert!(mapped.tensors.values().all(Values::is_mapped));
        assert_eq!(mapped.tensors, owned.tensors);
        assert_eq!(mapped.to_bytes().unwrap(), std::fs::read(&p).unwrap());
        mapped.tensors.get_mut(WEIGHT).unwrap()[3] = 7.0;
        assert!(!mapped.tensors[WEIGHT].is_mapped());
        assert_eq!(mapped.tensor(WEIGHT)[3], 7.0);
        assert_eq!(crate::digest::sha256_file(&p).unwrap(), sha);
        assert_eq!(
            mapped.take_tensor(NB_RATIO).unwrap(),
            owned.tensor(NB_RATIO)
        );

        let empty = dir.path().join("empty");
        std::fs::write(&empty, b"").unwrap();
        assert!(FileBytes::map(&empty).unwrap().is_empty());
        let e = format!(
            "{:#}",
            Checkpoint::from_mapped(FileBytes::map(&empty).unwrap(), &empty, String::new())
                .unwrap_err()
        );
        assert!(
            e.contains("empty") && e.contains("not a readable safetensors file"),
            "{e}"
        );
    }

    /// The trainer counts its shard at the buckets it reads; the file must be the bits the
    /// dense counts give, for two classes and three, with repeated and shared buckets.
    #[test]
    fn sparse_counting_writes_the_dense_counts_bytes() {
        let mut state = 0x9e37_79b9_u64;
        let mut next = |m: u64| {
            state = state
                .wrapping_mul(6364136223846793005)
                .wrapping_add(1442695040888963407);
            (state >> 33) % m
        };
        for classes in [2usize, 3] {
            let config =
                ModelConfig::with_buckets(12, 2).with_classes(classes, Multiclass::OneVsRest);
            let docs: Vec<Vec<u32>> = (0..200)
                .map(|_| {
                    let mut d: Vec<u32> = (0..1 + next(40)).map(|_| next(1 << 12) as u32).collect();
                    d.sort_unstable();
                    d.dedup();
                    d
                })
                .collect();
            let labels: Vec<u8> = (0..docs.len())
                .map(|_| next(classes as u64) as u8)
                .collect();
            let header = Header::new(Kind::Stats, config, 0);
            let dense = Checkpoint::from_counts(
                &ClassCounts::count(classes, config.dim(), &docs, &labels),
                header.clone(),
            );
            let sparse = Checkpoint::count(header, classes, &docs, &labels);
            assert!(sparse.index.len() > 100 && sparse.index.len() < config.dim());
            assert_eq!(
                sparse.to_bytes().unwrap(),
                dense.to_bytes().unwrap(),
                "{classes} classes"
            );
        }
    }

    /// What `safetensors::serialize` makes of the checkpoint's whole tables: the layout
    /// [`Checkpoint::file_parts`] must reproduce from the tables' sizes and their bytes.
    fn serialized_whole(ck: &Checkpoint) -> Vec<u8> {
        let mask = index_to_mask(&ck.index, ck.header.config.dim());
        let mut views: Vec<(&str, TensorView)> = ck
            .tensors
            .iter()
            .map(|(n, v)| {
                let bytes = bytemuck::cast_slice(&v[..]);
                (
                    n.as_str(),
                    TensorView::new(Dtype::F32, vec![v.len()], bytes).unwrap(),
                )
            })
            .collect();
        if ck.header.kind.is_sparse() {
            views.push(if ck.writes_mask() {
                (
                    UPDATE_MASK,
                    TensorView::new(Dtype::U8, vec![mask.len()], &mask).unwrap(),
                )
            } else {
                let bytes = bytemuck::cast_slice(&ck.index);
                (
                    UPDATE_INDEX,
                    TensorView::new(Dtype::U32, vec![ck.index.len()], bytes).unwrap(),
                )
            });
        }
        let meta = HashMap::from([(
            METADATA_KEY.to_owned(),
            serde_json::to_string(&ck.header).unwrap(),
        )]);
        safetensors::serialize(views, Some(meta)).unwrap()
    }

    /// A checkpoint is written from its tables where they lie, header first: the file must
    /// be byte for byte what safetensors serialises from the whole tables, for a model, a
    /// sparse file with a bucket list and one with a bucket mask.
    #[test]
    fn files_written_in_parts_are_what_safetensors_serialises() {
        let dir = tempfile::tempdir().unwrap();
        let config = cfg();
        let counts = |docs: &[Vec<u32>]| {
            let labels: Vec<u8> = (0..docs.len()).map(|i| (i % 2) as u8).collect();
            Checkpoint::count(Header::new(Kind::Stats, config, 0), 2, docs, &labels)
        };
        let few = counts(&[vec![3, 9], vec![9, 700]]);
        let many = counts(&(0..60).map(|i| vec![i * 7, i * 7 + 1]).collect::<Vec<_>>());
        assert!(
            few.index.len() < 32 && many.index.len() > 32,
            "a list and a mask"
        );
        let model = Checkpoint::from_model(model(), Header::new(Kind::Model, config, 3));
        for (name, ck) in [("model", model), ("list", few), ("mask", many)] {
            let path = dir.path().join(name);
            let sha = ck.save(&path).unwrap();
            let whole = serialized_whole(&ck);
            assert_eq!(std::fs::read(&path).unwrap(), whole, "{name}");
            assert_eq!(ck.to_bytes().unwrap(), whole, "{name}");
            assert_eq!(sha, sha256_bytes(&whole), "{name}");
        }
    }

    #[test]
    fn bad_files_are_refused_by_name() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("m.safetensors");
        let mut ck = Checkpoint::from_model(model(), Header::new(Kind::Model, cfg(), 1));
        ck.save(&p).unwrap();
        let bytes = std::fs::read(&p).unwrap();

        std::fs::write(&p, &bytes[..bytes.len() - 10]).unwrap();
        let e = format!("{:#}", Checkpoint::load(&p).unwrap_err());
        assert!(
            e.contains("m.safetensors") && e.contains("truncated"),
            "{e}"
        );

        std::fs::write(&p, &bytes).unwrap();
        let e = format!("{:#}", Checkpoint::load_kind(&p, Kind::Update).unwrap_err());
        assert!(e.contains("expected kind Update"), "{e}");

        ck.tensors.get_mut(WEIGHT).unwrap()[5] = f32::NAN;
        let e = format!("{:#}", ck.to_bytes().unwrap_err());
        assert!(e.contains("non-finite") && e.contains("index 5"), "{e}");
    }
    #[test]
    fn sparse_files_list_their_buckets_in_the_smaller_form() {
        let dim = cfg().dim(); // 1024 buckets: a bitmap of 128 bytes
        for index in [
            vec![3u32, 17, 1000],                 // a list (12 bytes)
            (0..dim as u32).step_by(3).collect(), // a bitmap
            (0..dim as u32).collect(),            // every bucket
            vec![],                               // none
        ] {
            let n = index.len();
            let ck = Checkpoint::update(
                Header::new(Kind::Update, cfg(), 2),
                index.clone(),
                (0..n).map(|i| i as f32).collect(),
                vec![0.5],
                vec![0.25; n],
                vec![-0.5],
            );
            let bytes = ck.to_bytes().unwrap();
            let (_, meta) = SafeTensors::read_metadata(&bytes).unwrap();
            let has = |name: &str| meta.tensors().contains_key(name);
            assert_eq!(has(UPDATE_MASK), 128 < 4 * n, "{n} buckets");
            assert_eq!(has(UPDATE_INDEX), 128 >= 4 * n, "{n} buckets");
            let back = Checkpoint::from_bytes(&bytes, Path::new("u")).unwrap();
            assert_eq!(back.index, index);
            assert_eq!(back.tensors, ck.tensors);
            assert_eq!(back.to_bytes().unwrap(), bytes);
        }
        // A bitmap of the wrong length for the config is refused, naming the tensor.
        let header = serde_json::to_string(&Header::new(Kind::Update, cfg(), 2)).unwrap();
        let zero = [0f32];
        let one = TensorView::new(Dtype::F32, vec![1], bytemuck::cast_slice(&zero)).unwrap();
        let none = TensorView::new(Dtype::F32, vec![0], &[]).unwrap();
        let mask = [0u8; 129];
        let views = vec![
            (BIAS, one.clone()),
            (GRAD_BIAS, one),
            (WEIGHT, none.clone()),
            (GRAD_WEIGHT, none),
            (
                UPDATE_MASK,
                TensorView::new(Dtype::U8, vec![129], &mask).unwrap(),
            ),
        ];
        let bytes = safetensors::serialize(
            views,
            Some(HashMap::from([(METADATA_KEY.to_owned(), header)])),
        )
        .unwrap();
        let e = format!(
            "{:#}",
            Checkpoint::from_bytes(&bytes, Path::new("u")).unwrap_err()
        );
        assert!(
            e.contains("`update.mask` has 129 bytes, expected 128"),
            "{e}"
        );
    }
}
