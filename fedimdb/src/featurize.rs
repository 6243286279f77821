//! Text → features: normalisation, tokenisation and hashed word n-grams.
//!
//! The same code runs in the trainer, the aggregator's evaluation and the server, so a
//! review is featurised identically everywhere. Features are *hashed*: an n-gram's bucket is
//! a fixed function of its tokens, so no vocabulary has to be built, shipped or agreed on
//! between workers — each worker featurises its shard on its own and the buckets line up.
//!
//! A document becomes the sorted set of distinct buckets of its 1..=`max_ngram`-grams
//! (binary presence, as naive-Bayes SVMs use: repeating a word does not make a review more
//! positive).

use serde::{Deserialize, Serialize};

/// How text becomes feature buckets. Stored in every model file; a model can only be used
/// with the featurizer it was trained with.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct FeaturizerConfig {
    /// Number of hash buckets is `2^hash_bits`.
    pub hash_bits: u32,
    /// Longest word n-gram (1 = unigrams only).
    pub max_ngram: u32,
}

impl Default for FeaturizerConfig {
    fn default() -> Self {
        Self { hash_bits: 22, max_ngram: 3 }
    }
}

impl FeaturizerConfig {
    /// Number of hash buckets (the model's input dimension).
    pub fn buckets(&self) -> usize {
        1usize << self.hash_bits
    }

    /// Checks the values are in the supported range.
    pub fn validate(&self) -> Result<(), String> {
        if !(10..=28).contains(&self.hash_bits) {
            return Err(format!("hash_bits is {}, expected 10..=28", self.hash_bits));
        }
        if !(1..=5).contains(&self.max_ngram) {
            return Err(format!("max_ngram is {}, expected 1..=5", self.max_ngram));
        }
        Ok(())
    }
}

/// Lower-cases the text and turns the HTML line breaks IMDB reviews contain (`<br />`) into
/// spaces.
pub fn normalize(text: &str) -> String {
    let mut out = String::with_capacity(text.len());
    let mut rest = text;
    while let Some(pos) = rest.find('<') {
        push_lower(&mut out, &rest[..pos]);
        let tail = &rest[pos..];
        let tag_len = ["<br />", "<br/>", "<br>"]
            .iter()
            .find(|t| tail.len() >= t.len() && tail[..t.len()].eq_ignore_ascii_case(t))
            .map(|t| t.len());
        match tag_len {
            Some(n) => {
                out.push(' ');
                rest = &tail[n..];
            }
            None => {
                out.push('<');
                rest = &tail[1..];
            }
        }
    }
    push_lower(&mut out, rest);
    out
}

fn push_lower(out: &mut String, s: &str) {
    if s.is_ascii() {
        out.extend(s.bytes().map(|b| b.to_ascii_lowercase() as char));
    } else {
        for c in s.chars() {
            out.extend(c.to_lowercase());
        }
    }
}

/// Splits normalised text into tokens: runs of letters and digits (with apostrophes inside
/// a word kept, so "don't" is one token), and `!` and `?` as tokens of their own because
/// they carry sentiment. Everything else separates tokens.
pub fn tokenize(normalized: &str) -> Vec<&str> {
    let mut tokens = Vec::with_capacity(normalized.len() / 5);
    let mut start: Option<usize> = None;
    let mut chars = normalized.char_indices().peekable();
    while let Some((i, c)) = chars.next() {
        let word_char = c.is_alphanumeric()
            || (c == '\'' && start.is_some() && chars.peek().is_some_and(|&(_, n)| n.is_alphanumeric()));
        if word_char {
            start.get_or_insert(i);
            continue;
        }
        if let Some(s) = start.take() {
            tokens.push(&normalized[s..i]);
        }
        if c == '!' || c == '?' {
            tokens.push(&normalized[i..i + 1]);
        }
    }
    if let Some(s) = start {
        tokens.push(&normalized[s..]);
    }
    tokens
}

/// 64-bit FNV-1a: a fixed, platform-independent token hash.
fn token_hash(token: &str) -> u64 {
    let mut h: u64 = 0xcbf2_9ce4_8422_2325;
    for b in token.bytes() {
        h ^= b as u64;
        h = h.wrapping_mul(0x0000_0100_0000_01b3);
    }
    h
}

/// The splitmix64 finaliser: spreads combined hashes over all 64 bits.
fn mix(mut z: u64) -> u64 {
    z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
    z ^ (z >> 31)
}

/// Calls `f(n, start, bucket)` for every n-gram of `tokens` (n = 1..=max_ngram, starting at
/// token `start`).
fn for_each_ngram(tokens: &[u64], cfg: &FeaturizerConfig, mut f: impl FnMut(usize, usize, u32)) {
    let shift = 64 - cfg.hash_bits;
    for i in 0..tokens.len() {
        let mut h = 0u64;
        for n in 1..=cfg.max_ngram as usize {
            let Some(&t) = tokens.get(i + n - 1) else { break };
            h = mix(h.rotate_left(17) ^ t ^ (n as u64).wrapping_mul(0x9e37_79b9_7f4a_7c15));
            f(n, i, (h >> shift) as u32);
        }
    }
}

/// Reusable featurizer: holds scratch buffers so featurising many documents allocates little.
#[derive(Debug, Clone)]
pub struct Featurizer {
    config: FeaturizerConfig,
    hashes: Vec<u64>,
}

impl Featurizer {
    pub fn new(config: FeaturizerConfig) -> Self {
        Self { config, hashes: Vec::new() }
    }

    pub fn config(&self) -> &FeaturizerConfig {
        &self.config
    }

    /// Replaces `out` with the sorted, distinct buckets of `text`'s n-grams.
    pub fn features_into(&mut self, text: &str, out: &mut Vec<u32>) {
        let norm = normalize(text);
        self.hashes.clear();
        self.hashes.extend(tokenize(&norm).into_iter().map(token_hash));
        out.clear();
        for_each_ngram(&self.hashes, &self.config, |_, _, b| out.push(b));
        out.sort_unstable();
        out.dedup();
    }

    /// The sorted, distinct buckets of `text`'s n-grams.
    pub fn features(&mut self, text: &str) -> Vec<u32> {
        let mut out = Vec::new();
        self.features_into(text, &mut out);
        out
    }
}

/// One n-gram of a text with its bucket, for explaining a prediction.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct NGram {
    /// The n-gram's tokens joined by spaces.
    pub text: String,
    /// Number of tokens.
    pub n: usize,
    /// Index of its first token in the token list.
    pub start: usize,
    pub bucket: u32,
}

/// The normalised text, its tokens and every n-gram occurrence with its bucket: the whole
/// preprocessing stage laid open (what the server's `/api/preprocess` returns).
#[derive(Debug, Clone, Serialize)]
pub struct Preprocessed {
    pub normalized: String,
    pub tokens: Vec<String>,
    pub ngrams: Vec<NGram>,
}

/// Runs the preprocessing stage on one text and keeps every intermediate result.
pub fn preprocess(text: &str, cfg: &FeaturizerConfig) -> Preprocessed {
    let normalized = normalize(text);
    let tokens: Vec<String> = tokenize(&normalized).into_iter().map(str::to_owned).collect();
    let hashes: Vec<u64> = tokens.iter().map(|t| token_hash(t)).collect();
    let mut ngrams = Vec::new();
    for_each_ngram(&hashes, cfg, |n, start, bucket| {
        ngrams.push(NGram { text: tokens[start..start + n].join(" "), n, start, bucket });
    });
    Preprocessed { normalized, tokens, ngrams }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn normalises_breaks_and_case() {
        assert_eq!(normalize("Great<br /><br />FILM<BR/>x<y"), "great  film x<y");
        assert_eq!(normalize("ÉPIQUE"), "épique");
    }

    #[test]
    fn tokenises_words_apostrophes_and_marks() {
        assert_eq!(tokenize("don't miss it!! 10/10, 'really'?"), [
            "don't", "miss", "it", "!", "!", "10", "10", "really", "?"
        ]);
        assert_eq!(tokenize("café-au-lait"), ["café", "au", "lait"]);
        assert!(tokenize("  ...  ").is_empty());
    }

    #[test]
    fn features_are_sorted_distinct_and_in_range() {
        let cfg = FeaturizerConfig { hash_bits: 12, max_ngram: 3 };
        let mut f = Featurizer::new(cfg);
        let feats = f.features("good good good movie");
        assert!(feats.windows(2).all(|w| w[0] < w[1]));
        assert!(feats.iter().all(|&b| (b as usize) < cfg.buckets()));
        // good, movie, "good good", "good movie", "good good good", "good good movie"
        assert!(feats.len() <= 6 && feats.len() >= 5, "{feats:?}");
    }

    #[test]
    fn hashing_is_stable_across_builds() {
        // Pinned: a model trained by one build must featurise identically in another.
        let mut f = Featurizer::new(FeaturizerConfig::default());
        assert_eq!(f.features("Great"), f.features("great"));
        let p = preprocess("not bad", &FeaturizerConfig::default());
        let buckets: Vec<u32> = p.ngrams.iter().map(|g| g.bucket).collect();
        assert_eq!(p.ngrams.iter().map(|g| g.text.as_str()).collect::<Vec<_>>(), ["not", "not bad", "bad"]);
        assert_eq!(buckets, PINNED_NOT_BAD);
    }

    /// Buckets of "not", "not bad", "bad" under the default config.
    const PINNED_NOT_BAD: [u32; 3] = [0, 0, 0];

    #[test]
    fn preprocess_agrees_with_features() {
        let cfg = FeaturizerConfig::default();
        let text = "An utterly <br />wonderful film, isn't it?";
        let mut from_pre: Vec<u32> = preprocess(text, &cfg).ngrams.iter().map(|g| g.bucket).collect();
        from_pre.sort_unstable();
        from_pre.dedup();
        assert_eq!(from_pre, Featurizer::new(cfg).features(text));
    }
}
