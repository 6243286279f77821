//! Which words pushed a prediction: exact attributions of the linear model.
//!
//! A review's logit is `bias + Σ_{b ∈ S} c(b)` over its distinct n-gram buckets `S`, with
//! `c(b) = weight[b]·ratio[b]/sqrt(|S|)` ([`fedimdb::model::Scorer::contribution`]). So each
//! n-gram's share of the decision is exact, not estimated: the top n-grams are the largest
//! `c(b)` of either sign. For highlighting, each bucket's `c(b)` is split evenly over its
//! occurrences and each occurrence's share evenly over its tokens; a token's weight is the
//! sum of its shares, and the token weights add up to `logit - bias`.
//!
//! Highlighting needs each token's place in the *original* text, which the shared
//! featurizer does not keep (it lower-cases and drops `<br />`). [`token_spans`] re-runs
//! the same normalisation and tokenisation rules while tracking offsets; a unit test checks
//! it yields exactly `tokenize(normalize(text))` on tricky inputs, so the two cannot drift
//! apart unnoticed.

use fedimdb::featurize::{BREAKS, for_each_ngram_bucket};
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

/// A token: its byte range in the original text and its character range in the normalised
/// text (they can differ: `İ` lower-cases to two characters, and a token may end between them).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct TokenSpan {
    pub start: usize,
    pub end: usize,
    pub norm_start: usize,
    pub norm_end: usize,
}

/// The tokens of a text, with its normalised characters.
#[derive(Debug, Clone, Default)]
pub struct Tokens {
    pub normalized: Vec<char>,
    pub spans: Vec<TokenSpan>,
}

impl Tokens {
    /// A token's normalised text, as the featurizer sees it.
    pub fn text(&self, span: TokenSpan) -> String {
        self.normalized[span.norm_start..span.norm_end]
            .iter()
            .collect()
    }
}

/// The tokens of `text` with their places, by the rules of
/// `fedimdb::featurize::{normalize, tokenize}`.
pub fn token_spans(text: &str) -> Tokens {
    // Normalised characters, each with the byte range of the original it came from.
    let mut chars: Vec<(char, usize, usize)> = Vec::with_capacity(text.len());
    let bytes = text.as_bytes();
    let mut i = 0;
    while i < text.len() {
        if bytes[i] == b'<'
            && let Some(t) = BREAKS.iter().find(|t| {
                bytes.len() - i >= t.len()
                    && bytes[i..i + t.len()].eq_ignore_ascii_case(t.as_bytes())
            })
        {
            chars.push((' ', i, i + t.len()));
            i += t.len();
            continue;
        }
        let c = text[i..].chars().next().unwrap_or(' ');
        let end = i + c.len_utf8();
        if c.is_ascii() {
            chars.push((c.to_ascii_lowercase(), i, end));
        } else {
            for l in c.to_lowercase() {
                chars.push((l, i, end));
            }
        }
        i = end;
    }
    let mut tokens = Vec::new();
    let mut word: Option<TokenSpan> = None;
    for k in 0..chars.len() {
        let (c, s, e) = chars[k];
        let word_char = c.is_alphanumeric()
            || (c == '\''
                && word.is_some()
                && chars.get(k + 1).is_some_and(|n| n.0.is_alphanumeric()));
        if word_char {
            match &mut word {
                Some(w) => {
                    w.end = e;
                    w.norm_end = k + 1;
                }
                None => {
                    word = Some(TokenSpan {
                        start: s,
                        end: e,
                        norm_start: k,
                        norm_end: k + 1,
                    })
                }
            }
            continue;
        }
        if let Some(w) = word.take() {
            tokens.push(w);
        }
        if c == '!' || c == '?' {
            tokens.push(TokenSpan {
                start: s,
                end: e,
                norm_start: k,
                norm_end: k + 1,
            });
        }
    }
    tokens.extend(word);
    Tokens {
        normalized: chars.into_iter().map(|c| c.0).collect(),
        spans: tokens,
    }
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

/// Explains the scorer's logit for `text`: the `top_k` n-grams pushing each way and, if
/// asked, per-token weights with their code-point ranges in `text`.
///
/// Built for speed (it runs on every `/api/predict` by default): n-gram buckets come from
/// the featurizer's string-free path, the distinct count from the review's features, and
/// only the few n-grams reported are turned into text.
pub fn explain(text: &str, scorer: &Scorer, top_k: usize, highlight: bool) -> Explanation {
    let cfg = scorer.config.featurizer;
    let mut occ: Vec<Occurrence> = Vec::with_capacity(text.len() / 2);
    for_each_ngram_bucket(text, &cfg, |n, start, bucket| {
        occ.push(Occurrence {
            bucket,
            n: n as u32,
            start: start as u32,
        })
    });
    // Distinct buckets: sort a copy of the buckets once.
    let mut distinct: Vec<u32> = occ.iter().map(|o| o.bucket).collect();
    distinct.sort_unstable();
    distinct.dedup();
    let n_distinct = distinct.len();
    let contribution = |b: u32| scorer.contribution(b, n_distinct);
    let tokens = if top_k > 0 || highlight {
        token_spans(text)
    } else {
        Tokens::default()
    };
    let spans = &tokens.spans;
    let ngram_text = |o: &Occurrence| -> String {
        let toks = &spans[o.start as usize..(o.start + o.n) as usize];
        toks.iter()
            .map(|&t| tokens.text(t))
            .collect::<Vec<_>>()
            .join(" ")
    };
    // Top k of each sign: the first occurrence of each bucket, by contribution, ties by
    // position so the answer is deterministic.
    let mut pos: Vec<(f32, usize)> = Vec::new();
    let mut neg: Vec<(f32, usize)> = Vec::new();
    if top_k > 0 && spans.len() == spans_expected(&occ) {
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
        if spans.len() != spans_expected(&occ) {
            // Cannot happen while token_spans follows the featurizer (tested); if it ever
            // does, give no highlight rather than a wrong one.
            tracing::warn!("token spans and featurizer tokens disagree; no highlight");
            return Vec::new();
        }
        let mut count: std::collections::HashMap<u32, u32, BucketBuild> =
            std::collections::HashMap::with_capacity_and_hasher(n_distinct, BucketBuild::default());
        for o in &occ {
            *count.entry(o.bucket).or_insert(0) += 1;
        }
        let mut weights = vec![0f32; spans.len()];
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
        spans
            .iter()
            .zip(weights)
            .map(|(s, w)| Span {
                start: cp_at[s.start],
                end: cp_at[s.end],
                weight: w,
            })
            .collect()
    });
    Explanation {
        top_positive,
        top_negative,
        highlight,
    }
}

/// The number of tokens the featurizer saw: its unigrams (every token starts one).
fn spans_expected(occ: &[Occurrence]) -> usize {
    occ.iter().filter(|o| o.n == 1).count()
}

#[cfg(test)]
mod tests {
    use super::*;
    use fedimdb::featurize::{Featurizer, FeaturizerConfig, normalize, tokenize};
    use fedimdb::model::ModelConfig;

    const TRICKY: [&str; 8] = [
        "Plain ascii, with <BR/>breaks<br>and<br />marks!? don't 'quote'",
        "Ünïcödé İstanbul ǅemal straße ΣΑΣ rock'n'roll",
        "trailing apostrophe' and <b>tags</b> <br",
        "",
        "   ...   ",
        "x<br /><br />y<Br>z!!",
        "İİİ a'b'c ''d'' 10/10",
        "emoji 🎬 great!! ǈ ẞ ﬁne",
    ];

    #[test]
    fn token_spans_follow_the_featurizer() {
        for t in TRICKY {
            let tokens = token_spans(t);
            let texts: Vec<String> = tokens.spans.iter().map(|&s| tokens.text(s)).collect();
            assert_eq!(texts, tokenize(&normalize(t)), "{t:?}");
            for s in &tokens.spans {
                assert!(
                    t.is_char_boundary(s.start) && t.is_char_boundary(s.end) && s.start < s.end,
                    "{t:?} {s:?}"
                );
            }
        }
        let s = token_spans("Great<br />FILM!").spans;
        assert_eq!((s[1].start, s[1].end), (11, 15));
        assert_eq!(&"Great<br />FILM!"[s[1].start..s[1].end], "FILM");
    }

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
        let e = explain(text, &s, 5, true);
        assert_eq!(e.top_positive[0].text, "great");
        assert_eq!(e.top_negative[0].text, "awful");
        assert!(
            e.top_positive.iter().all(|w| w.weight > 0.0)
                && e.top_negative.iter().all(|w| w.weight < 0.0)
        );
        let spans = e.highlight.unwrap();
        let chars: Vec<char> = text.chars().collect();
        let first: String = chars[spans[1].start..spans[1].end].iter().collect();
        assert_eq!(first, "GREAT");
        let total: f32 = spans.iter().map(|s| s.weight).sum();
        let logit = s.logit(&Featurizer::new(s.config.featurizer).features(text));
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
        for text in TRICKY
            .iter()
            .chain(&["Great film. GREAT film! An awful, awful end... great? film film"])
        {
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
            let e = explain(text, &s, 3, false);
            assert_eq!(
                e.top_positive
                    .iter()
                    .map(|w| w.text.clone())
                    .collect::<Vec<_>>(),
                want(true),
                "{text:?}"
            );
            assert_eq!(
                e.top_negative
                    .iter()
                    .map(|w| w.text.clone())
                    .collect::<Vec<_>>(),
                want(false),
                "{text:?}"
            );
        }
    }

    #[test]
    fn code_point_offsets_with_multibyte_text() {
        let s = scorer();
        let text = "Ça 🎬 great";
        let spans = explain(text, &s, 1, true).highlight.unwrap();
        let chars: Vec<char> = text.chars().collect();
        let last = spans.last().unwrap();
        assert_eq!(
            chars[last.start..last.end].iter().collect::<String>(),
            "great"
        );
        assert!(explain("", &s, 3, true).highlight.unwrap().is_empty());
        assert!(explain("", &s, 3, false).top_positive.is_empty());
    }
}
