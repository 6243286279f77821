//! Which words pushed a prediction: exact attributions of the linear model.
//!
//! A review's logit is `bias + Σ_{b ∈ S} c(b)` over its distinct n-gram buckets `S`, with
//! `c(b) = weight[b]·ratio[b]/sqrt(|S|)` ([`fedimdb::model::Scorer::contribution`]). So each
//! n-gram's share of the decision is exact, not estimated: the top n-grams are the largest
//! `c(b)` of either sign. For highlighting, each bucket's `c(b)` is split evenly over its
//! occurrences and each occurrence's share evenly over its tokens; a token's weight is the
//! sum of its shares, and the token weights add up to `logit - bias`.
//!
//! Everything comes from one pass of the featurizer over the review
//! ([`fedimdb::featurize::Tokens`]): its tokens with their places in the original text (for
//! highlighting) and their n-gram buckets, whose distinct set also gives the logit.

use fedimdb::featurize::Tokens;
use fedimdb::model::Scorer;
use serde::Serialize;

/// An n-gram and how much it moved the logit.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Word {
    /// The n-gram's tokens (lower-cased) joined by spaces.
    pub text: String,
    /// Number of tokens.
    pub n: usize,
    /// Its contribution to the logit (positive: toward a positive review).
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

/// Why a review got its score.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Explanation {
    pub top_positive: Vec<Word>,
    pub top_negative: Vec<Word>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub highlight: Option<Vec<Span>>,
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

/// Scores `text` and explains the score: the logit (exactly `scorer.logit` of the review's
/// features), the `top_k` n-grams pushing each way and, if asked, per-token weights with
/// their code-point ranges in `text`.
///
/// Built for speed (it runs on every `/api/predict` by default): the review is featurised
/// once, and only the few n-grams reported are turned into text.
pub fn explain(text: &str, scorer: &Scorer, top_k: usize, highlight: bool) -> (f32, Explanation) {
    let cfg = scorer.config.featurizer;
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
    let logit = scorer.logit(&features);
    let n_distinct = features.len();
    let contribution = |b: u32| scorer.contribution(b, n_distinct);
    let ngram_text = |o: &Occurrence| -> String {
        (o.start..o.start + o.n)
            .map(|i| tokens.text(i as usize))
            .collect::<Vec<_>>()
            .join(" ")
    };
    // Top k of each sign: the first occurrence of each bucket, by contribution, ties by
    // position so the answer is deterministic.
    let mut pos: Vec<(f32, usize)> = Vec::new();
    let mut neg: Vec<(f32, usize)> = Vec::new();
    if top_k > 0 {
        let mut first_seen =
            std::collections::HashSet::with_capacity_and_hasher(occ.len(), BucketBuild::default());
        for (i, o) in occ.iter().enumerate() {
            if first_seen.insert(o.bucket) {
                let c = contribution(o.bucket);
                if c > 0.0 {
                    pos.push((c, i));
                } else if c < 0.0 {
                    neg.push((c, i));
                }
            }
        }
        let by_weight = |a: &(f32, usize), b: &(f32, usize)| {
            b.0.abs().total_cmp(&a.0.abs()).then(a.1.cmp(&b.1))
        };
        for v in [&mut pos, &mut neg] {
            if v.len() > top_k {
                v.select_nth_unstable_by(top_k - 1, by_weight);
                v.truncate(top_k);
            }
            v.sort_by(by_weight);
        }
    }
    let word = |&(w, i): &(f32, usize)| Word {
        text: ngram_text(&occ[i]),
        n: occ[i].n as usize,
        weight: w,
    };
    let top_positive = pos.iter().map(word).collect();
    let top_negative = neg.iter().map(word).collect();
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
        logit,
        Explanation {
            top_positive,
            top_negative,
            highlight,
        },
    )
}

#[cfg(test)]
mod tests {
    use super::*;
    use fedimdb::featurize::{Featurizer, FeaturizerConfig};
    use fedimdb::model::ModelConfig;

    fn scorer() -> Scorer {
        let cfg = ModelConfig {
            featurizer: FeaturizerConfig {
                hash_bits: 12,
                max_ngram: 2,
            },
            nb_smoothing: 1.0,
        };
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
        Scorer::new(cfg, &weight, 0.25, &vec![1.0; dim])
    }

    #[test]
    fn top_words_and_token_weights_add_up_to_the_logit() {
        let s = scorer();
        let text = "A GREAT film, an awful end. Great!";
        let (logit, e) = explain(text, &s, 5, true);
        assert_eq!(e.top_positive[0].text, "great");
        assert_eq!(e.top_negative[0].text, "awful");
        assert!(
            e.top_positive.iter().all(|w| w.weight > 0.0)
                && e.top_negative.iter().all(|w| w.weight < 0.0)
        );
        // The same logit, to the bit, as scoring the review's features.
        let features = Featurizer::new(s.config.featurizer).features(text);
        assert_eq!(logit.to_bits(), s.logit(&features).to_bits());
        let spans = e.highlight.unwrap();
        let chars: Vec<char> = text.chars().collect();
        let first: String = chars[spans[1].start..spans[1].end].iter().collect();
        assert_eq!(first, "GREAT");
        let total: f32 = spans.iter().map(|s| s.weight).sum();
        assert!(
            (total + s.bias - logit).abs() < 1e-5,
            "{total} + {} vs {logit}",
            s.bias
        );
    }

    /// The fast path gives what the plain definition over `preprocess` gives.
    #[test]
    fn top_words_equal_the_definition_over_preprocess() {
        let s = scorer();
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
            let mut seen = std::collections::HashSet::new();
            let mut all: Vec<(f32, usize)> = p
                .ngrams
                .iter()
                .enumerate()
                .filter(|(_, g)| seen.insert(g.bucket))
                .map(|(i, g)| (s.contribution(g.bucket, distinct.len()), i))
                .collect();
            all.sort_by(|a, b| b.0.abs().total_cmp(&a.0.abs()).then(a.1.cmp(&b.1)));
            let want = |positive: bool| -> Vec<String> {
                all.iter()
                    .filter(|x| if positive { x.0 > 0.0 } else { x.0 < 0.0 })
                    .take(3)
                    .map(|x| p.ngrams[x.1].text.clone())
                    .collect()
            };
            let (_, e) = explain(text, &s, 3, false);
            for (words, positive) in [(&e.top_positive, true), (&e.top_negative, false)] {
                let got: Vec<String> = words.iter().map(|w| w.text.clone()).collect();
                assert_eq!(got, want(positive), "{text:?}");
            }
        }
    }

    #[test]
    fn code_point_offsets_with_multibyte_text() {
        let s = scorer();
        let text = "Ça 🎬 great";
        let spans = explain(text, &s, 1, true).1.highlight.unwrap();
        let chars: Vec<char> = text.chars().collect();
        let last = spans.last().unwrap();
        assert_eq!(
            chars[last.start..last.end].iter().collect::<String>(),
            "great"
        );
        assert!(explain("", &s, 3, true).1.highlight.unwrap().is_empty());
        assert!(explain("", &s, 3, false).1.top_positive.is_empty());
    }
}
