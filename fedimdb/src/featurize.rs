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
        Self {
            hash_bits: 22,
            max_ngram: 3,
        }
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

/// The characters of the normalised text, produced lazily: lower-cased, with the HTML line
/// breaks IMDB reviews contain (`<br />`, `<br/>`, `<br>`, any case) turned into a space.
/// Both the string functions and the allocation-free hashing path read text through this
/// one iterator, so they cannot disagree.
#[derive(Debug, Clone)]
pub struct NormChars<'a> {
    rest: &'a str,
    pending: std::char::ToLowercase,
}

impl<'a> NormChars<'a> {
    pub fn new(text: &'a str) -> Self {
        let mut pending = 'x'.to_lowercase();
        pending.next();
        Self {
            rest: text,
            pending,
        }
    }
}

/// The HTML line breaks IMDB reviews contain, matched case-insensitively and read as a space.
pub const BREAKS: [&str; 3] = ["<br />", "<br/>", "<br>"];

impl Iterator for NormChars<'_> {
    type Item = char;

    #[inline]
    fn next(&mut self) -> Option<char> {
        if let Some(c) = self.pending.next() {
            return Some(c);
        }
        let b = *self.rest.as_bytes().first()?;
        if b < 0x80 {
            if b == b'<'
                && let Some(t) = BREAKS.iter().find(|t| {
                    self.rest.len() >= t.len()
                        && self.rest.as_bytes()[..t.len()].eq_ignore_ascii_case(t.as_bytes())
                })
            {
                self.rest = &self.rest[t.len()..];
                return Some(' ');
            }
            self.rest = &self.rest[1..];
            return Some(b.to_ascii_lowercase() as char);
        }
        let c = self.rest.chars().next()?;
        self.rest = &self.rest[c.len_utf8()..];
        self.pending = c.to_lowercase();
        self.pending.next()
    }
}

/// Lower-cases the text and turns the HTML line breaks IMDB reviews contain (`<br />`) into
/// spaces.
pub fn normalize(text: &str) -> String {
    NormChars::new(text).collect()
}

/// What the tokeniser reports while scanning normalised characters.
enum Event {
    /// A character that belongs to the current word.
    WordChar(char),
    /// The current word ended.
    WordEnd,
    /// A `!` or `?`, a token of its own.
    Mark(char),
}

/// The tokeniser: words are runs of letters and digits (an apostrophe between two of them
/// stays inside, so "don't" is one token); `!` and `?` are tokens of their own because they
/// carry sentiment; everything else separates tokens.
#[inline]
fn scan(chars: impl Iterator<Item = char>, mut emit: impl FnMut(Event)) {
    let mut chars = chars.peekable();
    let mut in_word = false;
    while let Some(c) = chars.next() {
        let word_char = c.is_alphanumeric()
            || (c == '\'' && in_word && chars.peek().is_some_and(|n| n.is_alphanumeric()));
        if word_char {
            in_word = true;
            emit(Event::WordChar(c));
            continue;
        }
        if in_word {
            in_word = false;
            emit(Event::WordEnd);
        }
        if c == '!' || c == '?' {
            emit(Event::Mark(c));
        }
    }
    if in_word {
        emit(Event::WordEnd);
    }
}

/// Splits normalised text into tokens (see [`scan`] for the rules).
pub fn tokenize(normalized: &str) -> Vec<String> {
    let mut tokens = Vec::new();
    let mut word = String::new();
    scan(normalized.chars(), |e| match e {
        Event::WordChar(c) => word.push(c),
        Event::WordEnd => tokens.push(std::mem::take(&mut word)),
        Event::Mark(c) => tokens.push(c.to_string()),
    });
    tokens
}

const FNV_OFFSET: u64 = 0xcbf2_9ce4_8422_2325;
const FNV_PRIME: u64 = 0x0000_0100_0000_01b3;

#[inline]
fn fnv_char(mut h: u64, c: char) -> u64 {
    let mut buf = [0u8; 4];
    for &b in c.encode_utf8(&mut buf).as_bytes() {
        h ^= b as u64;
        h = h.wrapping_mul(FNV_PRIME);
    }
    h
}

/// 64-bit FNV-1a of a token's UTF-8 bytes: a fixed, platform-independent token hash.
fn token_hash(token: &str) -> u64 {
    token.chars().fold(FNV_OFFSET, fnv_char)
}

/// The token hashes of raw text in one pass: normalise, tokenise and hash without building
/// any string. Equal to hashing the tokens of `tokenize(&normalize(text))`.
fn token_hashes(text: &str, out: &mut Vec<u64>) {
    let mut h = FNV_OFFSET;
    scan(NormChars::new(text), |e| match e {
        Event::WordChar(c) => h = fnv_char(h, c),
        Event::WordEnd => out.push(std::mem::replace(&mut h, FNV_OFFSET)),
        Event::Mark(c) => out.push(fnv_char(FNV_OFFSET, c)),
    });
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
            let Some(&t) = tokens.get(i + n - 1) else {
                break;
            };
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
        Self {
            config,
            hashes: Vec::new(),
        }
    }

    pub fn config(&self) -> &FeaturizerConfig {
        &self.config
    }

    /// Replaces `out` with the sorted, distinct buckets of `text`'s n-grams.
    pub fn features_into(&mut self, text: &str, out: &mut Vec<u32>) {
        self.hashes.clear();
        token_hashes(text, &mut self.hashes);
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

/// Calls `f(n, start, bucket)` for every n-gram occurrence of `text` (tokens numbered as in
/// `tokenize(&normalize(text))`), without building any string: what [`preprocess`] computes,
/// at the speed of [`Featurizer`]. The server uses it to explain predictions.
pub fn for_each_ngram_bucket(text: &str, cfg: &FeaturizerConfig, f: impl FnMut(usize, usize, u32)) {
    let mut hashes = Vec::new();
    token_hashes(text, &mut hashes);
    for_each_ngram(&hashes, cfg, f);
}

/// Runs the preprocessing stage on one text and keeps every intermediate result.
pub fn preprocess(text: &str, cfg: &FeaturizerConfig) -> Preprocessed {
    let normalized = normalize(text);
    let tokens = tokenize(&normalized);
    let hashes: Vec<u64> = tokens.iter().map(|t| token_hash(t)).collect();
    let mut ngrams = Vec::new();
    for_each_ngram(&hashes, cfg, |n, start, bucket| {
        ngrams.push(NGram {
            text: tokens[start..start + n].join(" "),
            n,
            start,
            bucket,
        });
    });
    Preprocessed {
        normalized,
        tokens,
        ngrams,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn normalises_breaks_and_case() {
        assert_eq!(
            normalize("Great<br /><br />FILM<BR/>x<y"),
            "great  film x<y"
        );
        assert_eq!(normalize("ÉPIQUE"), "épique");
    }

    #[test]
    fn tokenises_words_apostrophes_and_marks() {
        assert_eq!(
            tokenize("don't miss it!! 10/10, 'really'?"),
            ["don't", "miss", "it", "!", "!", "10", "10", "really", "?"]
        );
        assert_eq!(tokenize("café-au-lait"), ["café", "au", "lait"]);
        assert!(tokenize("  ...  ").is_empty());
        assert_eq!(tokenize("it's' 'twas"), ["it's", "twas"]);
    }

    #[test]
    fn features_are_sorted_distinct_and_in_range() {
        let cfg = FeaturizerConfig {
            hash_bits: 12,
            max_ngram: 3,
        };
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
        assert_eq!(
            p.ngrams.iter().map(|g| g.text.as_str()).collect::<Vec<_>>(),
            ["not", "not bad", "bad"]
        );
        assert_eq!(buckets, PINNED_NOT_BAD);
    }

    /// Buckets of "not", "not bad", "bad" under the default config.
    const PINNED_NOT_BAD: [u32; 3] = [3_741_232, 1_384_177, 2_329_403];

    #[test]
    fn one_pass_hashing_equals_hashing_the_tokens() {
        let texts = [
            "Plain ascii, with <BR/>breaks<br>and<br />marks!?",
            "Ünïcödé İstanbul ǅemal straße ΣΑΣ don't 'quote' rock'n'roll",
            "trailing apostrophe' and <b>tags</b> <br",
            "",
        ];
        for t in texts {
            let mut fast = Vec::new();
            token_hashes(t, &mut fast);
            let slow: Vec<u64> = tokenize(&normalize(t))
                .iter()
                .map(|w| token_hash(w))
                .collect();
            assert_eq!(fast, slow, "{t}");
        }
    }

    #[test]
    fn preprocess_agrees_with_features() {
        let cfg = FeaturizerConfig::default();
        let text = "An utterly <br />wonderful film, isn't it?";
        let mut from_pre: Vec<u32> = preprocess(text, &cfg)
            .ngrams
            .iter()
            .map(|g| g.bucket)
            .collect();
        from_pre.sort_unstable();
        from_pre.dedup();
        assert_eq!(from_pre, Featurizer::new(cfg).features(text));
    }
}
