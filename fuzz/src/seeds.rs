//! The seed corpus (checked in under `fuzz/corpus/<target>/`): small valid inputs, written
//! with the library itself so they follow the real formats. `fuzz/run.sh --write-seeds`
//! rewrites them (after a format change).

use std::collections::BTreeMap;

use fedimdb::checkpoint::{Checkpoint, Header, Kind, ModelCard, RoundPoint};
use fedimdb::featurize::Featurizer;
use fedimdb::model::{ClassCounts, Model, ModelConfig};
use fedimdb::reviews::{NEGATIVE, POSITIVE, Review, encode_parquet};

/// Texts that exercise the featurizer's rules: breaks, case, apostrophes, marks, Unicode
/// whose lower case is longer (İ), digits.
pub const TEXTS: [&str; 6] = [
    "An utterly <br />wonderful film, isn't it? 10/10!!",
    "Ünïcödé İstanbul ǅemal straße ΣΑΣ rock'n'roll",
    "trailing apostrophe' and <b>tags</b> <BR/>x<br",
    "emoji 🎬 great!! ǈ ẞ ﬁne 'quoted' ''d''",
    "Dull.<br /><br />Awful acting, not bad music?",
    "",
];

/// The seeds of one target, as (file name, bytes).
pub fn for_target(target: &str) -> Vec<(String, Vec<u8>)> {
    match target {
        "featurize" => featurize(),
        "checkpoint" => checkpoints(),
        "shard_reader" => shards(),
        "request_parsers" => requests(),
        other => panic!("no seeds for target {other:?}"),
    }
}

/// Featurize inputs: 3 bytes of settings (hash bits, longest n-gram, explanation), then text.
fn featurize() -> Vec<(String, Vec<u8>)> {
    TEXTS
        .iter()
        .enumerate()
        .map(|(i, t)| {
            let mut b = vec![i as u8 * 3, i as u8 + 2, i as u8 * 7];
            b.extend_from_slice(t.as_bytes());
            (format!("text-{i}"), b)
        })
        .collect()
}

fn small_config() -> ModelConfig {
    ModelConfig::with_buckets(10, 2)
}

fn counts(cfg: ModelConfig) -> ClassCounts {
    let mut f = Featurizer::new(cfg.featurizer);
    let docs: Vec<Vec<u32>> = TEXTS.iter().map(|t| f.features(t)).collect();
    let labels: Vec<u8> = (0..docs.len()).map(|i| (i % 2) as u8).collect();
    ClassCounts::count(2, cfg.dim(), &docs, &labels)
}

/// A model, a round-0 statistics file and a worker update, all with 2^10 buckets.
fn checkpoints() -> Vec<(String, Vec<u8>)> {
    let cfg = small_config();
    let counts = counts(cfg);
    let model = Model::from_counts(cfg, &counts);

    let mut header = Header::new(Kind::Model, cfg, 3);
    header.samples = 6;
    header.card = Some(ModelCard {
        published: None,
        workers: 2,
        partition: fedimdb::manifest::Partition::Dirichlet,
        alpha: Some(0.5),
        train_samples: 6,
        history: vec![
            RoundPoint {
                round: 1,
                test_accuracy: 0.5,
            },
            RoundPoint {
                round: 2,
                test_accuracy: 0.75,
            },
        ],
        metrics: BTreeMap::from([("accuracy".to_owned(), 0.75), ("log_loss".to_owned(), 0.4)]),
        labels: vec!["neg".to_owned(), "pos".to_owned()],
        task: Some("IMDB sentiment".to_owned()),
    });
    let model_ck = Checkpoint::from_model(model, header);

    let mut header = Header::new(Kind::Stats, cfg, 0);
    header.shard = Some(1);
    header.seed = Some(42);
    let stats_ck = Checkpoint::from_counts(&counts, header);

    let mut header = Header::new(Kind::Update, cfg, 2);
    header.shard = Some(0);
    header.samples = 3;
    header.base_sha256 = Some("0".repeat(64));
    header.train = Some(fedimdb::train::TrainArgs::default().config(2, 0, 2));
    let index: Vec<u32> = (0..cfg.dim() as u32).step_by(3).collect();
    let weight: Vec<f32> = index
        .iter()
        .map(|&i| ((i % 7) as f32 - 3.0) / 8.0)
        .collect();
    let grad: Vec<f32> = index
        .iter()
        .map(|&i| ((i % 5) as f32 - 2.0) / 64.0)
        .collect();
    let update_ck = Checkpoint::update(header, index, weight, vec![0.125], grad, vec![-0.01]);

    // Few buckets: listed as u32 (the update above, a third of them, is a bitmap).
    let mut header = update_ck.header.clone();
    header.shard = Some(1);
    let listed_ck = Checkpoint::update(
        header,
        vec![1, 500, 1000],
        vec![0.5, -0.25, 0.125],
        vec![0.0],
        vec![0.01, 0.02, -0.03],
        vec![0.0],
    );

    let mut moments = fedimdb::server_optimizer::Moments::zeros(cfg.dim());
    moments.first[7] = 0.25;
    moments.second[7] = 0.0625;

    [
        ("model", model_ck),
        ("stats", stats_ck),
        ("update", update_ck),
        ("update-listed", listed_ck),
        ("moments", moments.to_checkpoint(cfg, 2)),
    ]
    .into_iter()
    .map(|(name, ck)| {
        (
            format!("{name}.safetensors"),
            ck.to_bytes().expect("checkpoint bytes"),
        )
    })
    .collect()
}

/// Two tiny review shards in the copier's format.
fn shards() -> Vec<(String, Vec<u8>)> {
    let review = |i: usize, text: &str| Review {
        id: format!(
            "train/{}/{i}",
            if i.is_multiple_of(2) { "pos" } else { "neg" }
        ),
        rating: if i.is_multiple_of(2) { 9 } else { 2 },
        label: if i.is_multiple_of(2) {
            POSITIVE
        } else {
            NEGATIVE
        },
        text: text.to_owned(),
    };
    let three: Vec<Review> = TEXTS[..3]
        .iter()
        .enumerate()
        .map(|(i, t)| review(i, t))
        .collect();
    let one = vec![review(7, TEXTS[3])];
    [("three", three), ("one", one)]
        .into_iter()
        .map(|(name, reviews)| {
            let mut bytes = Vec::new();
            encode_parquet(&mut bytes, &reviews).expect("parquet bytes");
            (format!("{name}.parquet"), bytes)
        })
        .collect()
}

/// Request bodies: the first byte picks the parser (`0` /api/predict, `1` /api/preprocess,
/// `2` a v2 infer request in JSON, `3` a v2 infer request with the binary tensor extension:
/// the `Inference-Header-Content-Length` value, a newline, then the body).
fn requests() -> Vec<(String, Vec<u8>)> {
    let mut out: Vec<(String, Vec<u8>)> = [
        ("predict-text", r#"0{"text": "A great film!", "top_k": 3, "highlight": true}"#),
        ("predict-texts", r#"0{"texts": ["good", "bad <br />movie"], "top_k": 0}"#),
        ("preprocess", r#"1{"text": "Don't miss it!!"}"#),
        ("v2-flat", r#"2{"id": "1", "inputs": [{"name": "text", "shape": [2], "datatype": "BYTES", "data": ["great", "awful"]}]}"#),
        (
            "v2-nested",
            r#"2{"inputs": [{"name": "text", "shape": [1, 1], "datatype": "BYTES", "data": [["fine"]]}], "outputs": [{"name": "probability", "parameters": {"binary_data": true}}]}"#,
        ),
    ]
    .into_iter()
    .map(|(n, s)| (n.to_owned(), s.as_bytes().to_vec()))
    .collect();
    // The binary extension as Triton's client sends it: two BYTES elements after the JSON.
    let mut raw = Vec::new();
    for t in ["great film", "dull"] {
        raw.extend_from_slice(&(t.len() as u32).to_le_bytes());
        raw.extend_from_slice(t.as_bytes());
    }
    let json = format!(
        r#"{{"inputs":[{{"name":"text","shape":[2,1],"datatype":"BYTES","parameters":{{"binary_data_size":{}}}}}],"parameters":{{"binary_data_output":true}}}}"#,
        raw.len()
    );
    let mut b = format!("3{}\n{json}", json.len()).into_bytes();
    b.extend_from_slice(&raw);
    out.push(("v2-binary".to_owned(), b));
    out
}
