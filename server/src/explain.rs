//! Which words pushed a prediction: exact attributions of the linear model.
//!
//! A review's logit for a class is `bias + Σ_{b ∈ S} c(b)` over its distinct n-gram buckets
//! `S`, with `c(b) = weight[b]·ratio[b]/sqrt(|S|)` in that class's row
//! ([`fedimdb::model::Scorer::contribution`]; a two-class model has one row, read with its
//! sign toward the class). So each n-gram's share of the decision is exact, not estimated:
//! a class's top n-grams are the largest positive `c(b)` toward it. For highlighting, each
//! bucket's `c(b)` is split evenly over its occurrences and each occurrence's share evenly
//! over its tokens; a token's weight is the sum of its shares, and the token weights add
//! up to `logit - bias` of the highlighted class (class 1 of a two-class model, so positive
//! weights still mean "toward positive"; the predicted class of a K-class model).
//!
//! Everything comes from one pass of the featurizer over the review
//! ([`fedimdb::featurize::Tokens`]): its tokens with their places in the original text (for
//! highlighting) and their n-gram buckets, whose distinct set also gives the logits.

use fedimdb::featurize::Tokens;
use fedimdb::model::Scorer;
use serde::Serialize;

/// An n-gram and how much it moved a class's score.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Word {
    /// The n-gram's tokens (lower-cased) joined by spaces.
    pub text: String,
    /// Number of tokens.
    pub n: usize,
    /// Its contribution to the logit: in `top_positive`/`top_negative` of a two-class model
    /// signed toward class 1 (positive), in a class's `words` toward that class (> 0).
    pub weight: f32,
}

/// A token's place in the original text and its share of the logit.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Span {
    /// Offsets in Unicode code points of the submitted text (`Array.from(text)` in JS).
    pub start: usize,
    pub end: usize,
    pub weight: f32,
}

/// The n-grams that pushed one class's score up.
#[derive(Debug, Clone, PartialEq)]
pub struct ClassWords {
    /// The class index.
    pub class: usize,
    /// Most first, every weight positive.
    pub words: Vec<Word>,
}

/// Why a review got its score.
#[derive(Debug, Clone, PartialEq)]
pub struct Explanation {
    /// The `top_classes` most probable classes (most probable first; ties: lower index),
    /// each with its `top_k` n-grams.
    pub classes: Vec<ClassWords>,
    /// Per-token weights toward [`Explanation::highlight_class`], if asked.
    pub highlight: Option<Vec<Span>>,
    /// The class the highlight weights point toward: 1 for two classes, the predicted class
    /// for more.
    pub highlight_class: usize,
}

impl Explanation {
    /// The words of `class`, if it is among the explained classes.
    pub fn words(&self, class: usize) -> Option<&[Word]> {
        self.classes
            .iter()
            .find(|c| c.class == class)
            .map(|c| c.words.as_slice())
    }
}

/// Classes by probability, most probable first (ties: the lower index).
pub fn ranked(probabilities: &[f32]) -> Vec<usize> {
    let mut order: Vec<usize> = (0..probabilities.len()).collect();
    order.sort_by(|&a, &b| {
        probabilities[b]
            .total_cmp(&probabilities[a])
            .then(a.cmp(&b))
    });
    order
}

/// Hashes a bucket id to itself: bucket ids are already uniformly spread hash values, so
/// hashing them again (SipHash, the std default) only costs time on every request.
#[derive(Default)]
struct BucketHasher(u64);

impl std::hash::Hasher for BucketHasher {
    fn finish(&self) -> u64 {
        // Spread the bits hashbrown uses for its control bytes (the top 7) as well.
        self.0.wrapping_mul(0x9e37_79b9_7f4a_7c15)
    }
    fn write(&mut self, bytes: &[u8]) {
        for &b in bytes {
            self.0 = (self.0 << 8) | b as u64;
        }
    }
    fn write_u32(&mut self, n: u32) {
        self.0 = n as u64;
    }
}

type BucketBuild = std::hash::BuildHasherDefault<BucketHasher>;

/// One n-gram occurrence: bucket, length, first token.
#[derive(Debug, Clone, Copy)]
struct Occurrence {
    bucket: u32,
    n: u32,
    start: u32,
}

/// Scores `text` and explains the score: the row logits (exactly `scorer.logits` of the
/// review's features), the `top_k` n-grams pushing toward each of the `top_classes` most
/// probable classes (both classes of a two-class model, whatever `top_classes`) and, if
/// asked, per-token weights with their code-point ranges in `text`.
///
/// Built for speed (it runs on every `/api/predict` by default): the review is featurised
/// once, and only the few n-grams reported are turned into text.
pub fn explain(
    text: &str,
    scorer: &Scorer,
    top_k: usize,
    top_classes: usize,
    highlight: bool,
) -> (Vec<f32>, Explanation) {
    let cfg = scorer.config.featurizer;
    let binary = scorer.config.rows() == 1;
    let tokens = Tokens::new(text);
    let mut occ: Vec<Occurrence> = Vec::with_capacity(tokens.len() * cfg.max_ngram as usize);
    tokens.for_each_ngram(&cfg, |n, start, bucket| {
        occ.push(Occurrence {
            bucket,
            n: n as u32,
            start: start as u32,
        })
    });
    // The review's features (sorted, distinct buckets), as `Featurizer` gives them.
    let mut features: Vec<u32> = occ.iter().map(|o| o.bucket).collect();
    features.sort_unstable();
    features.dedup();
    let logits = scorer.logits(&features);
    let link = scorer.config.link();
    let probabilities = link.probabilities(&logits);
    let n_distinct = features.len();
    let ngram_text = |o: &Occurrence| -> String {
        (o.start..o.start + o.n)
            .map(|i| tokens.text(i as usize))
            .collect::<Vec<_>>()
            .join(" ")
    };
    let explained: Vec<usize> = if binary {
        ranked(&probabilities)
    } else {
        let mut r = ranked(&probabilities);
        r.truncate(top_classes);
        r
    };
    // The first occurrence of each bucket, in text order.
    let mut first: Vec<(u32, usize)> = Vec::new();
    if top_k > 0 {
        let mut first_seen =
            std::collections::HashSet::with_capacity_and_hasher(occ.len(), BucketBuild::default());
        for (i, o) in occ.iter().enumerate() {
            if first_seen.insert(o.bucket) {
                first.push((o.bucket, i));
            }
        }
    }
    // Top k toward each explained class, by contribution, ties by position so the answer is
    // deterministic.
    let by_weight = |a: &(f32, usize), b: &(f32, usize)| b.0.total_cmp(&a.0).then(a.1.cmp(&b.1));
    let classes = explained
        .iter()
        .map(|&class| {
            let mut top: Vec<(f32, usize)> = first
                .iter()
                .filter_map(|&(b, i)| {
                    let c = scorer.contribution(class, b, n_distinct);
                    (c > 0.0).then_some((c, i))
                })
                .collect();
            if top.len() > top_k {
                if top_k > 0 {
                    top.select_nth_unstable_by(top_k - 1, by_weight);
                }
                top.truncate(top_k);
            }
            top.sort_by(by_weight);
            ClassWords {
                class,
                words: top
                    .iter()
                    .map(|&(w, i)| Word {
                        text: ngram_text(&occ[i]),
                        n: occ[i].n as usize,
                        weight: w,
                    })
                    .collect(),
            }
        })
        .collect();
    let highlight_class = if binary { 1 } else { link.predict(&logits) };
    let contribution = |b: u32| scorer.contribution(highlight_class, b, n_distinct);
    let highlight = highlight.then(|| {
        let mut count: std::collections::HashMap<u32, u32, BucketBuild> =
            std::collections::HashMap::with_capacity_and_hasher(n_distinct, BucketBuild::default());
        for o in &occ {
            *count.entry(o.bucket).or_insert(0) += 1;
        }
        let mut weights = vec![0f32; tokens.len()];
        for o in &occ {
            let share = contribution(o.bucket) / count[&o.bucket] as f32 / o.n as f32;
            for w in &mut weights[o.start as usize..(o.start + o.n) as usize] {
                *w += share;
            }
        }
        // Byte offsets to code-point offsets, in one pass over the text.
        let mut cp_at = vec![0usize; text.len() + 1];
        let mut cp = 0;
        for (b, _) in text.char_indices() {
            cp_at[b] = cp;
            cp += 1;
        }
        cp_at[text.len()] = cp;
        weights
            .into_iter()
            .enumerate()
            .map(|(i, w)| {
                let s = tokens.span(i);
                Span {
                    start: cp_at[s.start],
                    end: cp_at[s.end],
                    weight: w,
                }
            })
            .collect()
    });
    (
        logits,
        Explanation {
            classes,
            highlight,
            highlight_class,
        },
    )
}

#[cfg(test)]
mod tests {
    use super::*;
    use fedimdb::featurize::Featurizer;
    use fedimdb::model::{ModelConfig, Multiclass};

    fn config() -> ModelConfig {
        ModelConfig::with_buckets(12, 2)
    }

    fn scorer() -> Scorer {
        let cfg = config();
        let dim = cfg.dim();
        let mut f = Featurizer::new(cfg.featurizer);
        let mut weight = vec![0.0; dim];
        for b in f.features("great") {
            weight[b as usize] = 2.0;
        }
        for b in f.features("awful") {
            weight[b as usize] = -3.0;
        }
        for b in f.features("film") {
            weight[b as usize] = 0.5;
        }
        Scorer::new(cfg, &weight, &[0.25], &vec![1.0; dim])
    }

    /// Three classes: `great` says class 0, `awful` class 1, `film` class 2.
    fn scorer3() -> Scorer {
        let cfg = config().with_classes(3, Multiclass::Softmax);
        let dim = cfg.dim();
        let mut f = Featurizer::new(cfg.featurizer);
        let mut weight = vec![0.0; 3 * dim];
        for (class, word, w) in [(0, "great", 2.0), (1, "awful", 3.0), (2, "film", 0.5)] {
            for b in f.features(word) {
                weight[class * dim + b as usize] = w;
                // and against the others
                for other in (0..3).filter(|&o| o != class) {
                    weight[other * dim + b as usize] -= w / 2.0;
                }
            }
        }
        Scorer::new(cfg, &weight, &[0.1, 0.0, -0.1], &vec![1.0; 3 * dim])
    }

    fn top_positive(e: &Explanation) -> &[Word] {
        e.words(1).unwrap()
    }

    #[test]
    fn top_words_and_token_weights_add_up_to_the_logit() {
        let s = scorer();
        let text = "A GREAT film, an awful end. Great!";
        let (logits, e) = explain(text, &s, 5, 1, true);
        let logit = logits[0];
        assert_eq!(top_positive(&e)[0].text, "great");
        assert_eq!(e.words(0).unwrap()[0].text, "awful");
        assert!(
            e.classes
                .iter()
                .all(|c| c.words.iter().all(|w| w.weight > 0.0))
        );
        // The same logit, to the bit, as scoring the review's features.
        let features = Featurizer::new(s.config.featurizer).features(text);
        assert_eq!(logit.to_bits(), s.logits(&features)[0].to_bits());
        assert_eq!(e.highlight_class, 1);
        let spans = e.highlight.unwrap();
        let chars: Vec<char> = text.chars().collect();
        let first: String = chars[spans[1].start..spans[1].end].iter().collect();
        assert_eq!(first, "GREAT");
        let total: f32 = spans.iter().map(|s| s.weight).sum();
        assert!(
            (total + s.bias[0] - logit).abs() < 1e-5,
            "{total} + {} vs {logit}",
            s.bias[0]
        );
    }

    /// The fast path gives what the plain definition over `preprocess` gives.
    #[test]
    fn top_words_equal_the_definition_over_preprocess() {
        for s in [scorer(), scorer3()] {
            for text in [
                "",
                "   ...   ",
                "İİİ great<br />FILM!! awful' 'film' great",
                "Great film. GREAT film! An awful, awful end... great? film film",
            ] {
                let p = fedimdb::featurize::preprocess(text, &s.config.featurizer);
                let mut distinct: Vec<u32> = p.ngrams.iter().map(|g| g.bucket).collect();
                distinct.sort_unstable();
                distinct.dedup();
                let want = |class: usize| -> Vec<String> {
                    let mut seen = std::collections::HashSet::new();
                    let mut all: Vec<(f32, usize)> = p
                        .ngrams
                        .iter()
                        .enumerate()
                        .filter(|(_, g)| seen.insert(g.bucket))
                        .map(|(i, g)| (s.contribution(class, g.bucket, distinct.len()), i))
                        .collect();
                    all.sort_by(|a, b| b.0.total_cmp(&a.0).then(a.1.cmp(&b.1)));
                    all.iter()
                        .filter(|x| x.0 > 0.0)
                        .take(3)
                        .map(|x| p.ngrams[x.1].text.clone())
                        .collect()
                };
                let (_, e) = explain(text, &s, 3, 3, false);
                assert_eq!(e.classes.len(), s.classes());
                for c in &e.classes {
                    let got: Vec<String> = c.words.iter().map(|w| w.text.clone()).collect();
                    assert_eq!(got, want(c.class), "{text:?} class {}", c.class);
                }
            }
        }
    }

    #[test]
    fn k_classes_rank_explain_and_highlight_the_predicted_class() {
        let s = scorer3();
        let text = "An awful, awful film. Awful!";
        let (logits, e) = explain(text, &s, 2, 2, true);
        let features = Featurizer::new(s.config.featurizer).features(text);
        assert_eq!(logits, s.logits(&features));
        let p = s.probabilities(&features);
        assert_eq!(e.classes.len(), 2, "the two most probable classes");
        assert_eq!(e.classes[0].class, s.predict(&features));
        assert_eq!(e.classes[0].class, 1);
        assert!(p[e.classes[0].class] >= p[e.classes[1].class]);
        assert_eq!(e.classes[0].words[0].text, "awful");
        assert_eq!(e.highlight_class, 1);
        let total: f32 = e.highlight.unwrap().iter().map(|s| s.weight).sum();
        assert!((total + s.bias[1] - logits[1]).abs() < 1e-5);
        // top_classes beyond K: every class once
        assert_eq!(explain(text, &s, 1, 10, false).1.classes.len(), 3);
    }

    #[test]
    fn code_point_offsets_with_multibyte_text() {
        let s = scorer();
        let text = "Ça 🎬 great";
        let spans = explain(text, &s, 1, 1, true).1.highlight.unwrap();
        let chars: Vec<char> = text.chars().collect();
        let last = spans.last().unwrap();
        assert_eq!(
            chars[last.start..last.end].iter().collect::<String>(),
            "great"
        );
        assert!(explain("", &s, 3, 1, true).1.highlight.unwrap().is_empty());
        assert!(top_positive(&explain("", &s, 3, 1, false).1).is_empty());
    }
}
