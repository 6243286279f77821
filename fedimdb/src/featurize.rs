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
//!
//! One scanner ([`scan`] over [`NormChars`]) finds every token, with its hash and its byte
//! range in the original text: [`Featurizer`] keeps only the hashes, [`Tokens`] keeps all
//! three (the server explains predictions with it, highlighting tokens where the user wrote
//! them), [`tokenize`] and [`preprocess`] keep the text.

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

/// The HTML line breaks IMDB reviews contain, matched case-insensitively and read as a space.
const BREAKS: [&str; 3] = ["<br />", "<br/>", "<br>"];

/// The characters of the normalised text, produced lazily: lower-cased, with the HTML line
/// breaks IMDB reviews contain (`<br />`, `<br/>`, `<br>`, any case) turned into a space.
/// Each comes with the byte range of the original character it was made from (a whole
/// `<br />` for its space; the same range for every character of a lower-case expansion,
/// as `İ` → `i̇`). Every function of this module reads raw text through this one iterator,
/// so they cannot disagree.
#[derive(Debug, Clone)]
struct NormChars<'a> {
    text: &'a str,
    /// Byte offset of the first character not read yet.
    pos: usize,
    pending: std::char::ToLowercase,
    /// Byte range of the character whose lower case `pending` holds.
    pending_at: (usize, usize),
}

impl<'a> NormChars<'a> {
    fn new(text: &'a str) -> Self {
        let mut pending = 'x'.to_lowercase();
        pending.next();
        Self {
            text,
            pos: 0,
            pending,
            pending_at: (0, 0),
        }
    }
}

impl Iterator for NormChars<'_> {
    /// A normalised character and the byte range of the original it comes from.
    type Item = (char, usize, usize);

    #[inline]
    fn next(&mut self) -> Option<Self::Item> {
        if let Some(c) = self.pending.next() {
            return Some((c, self.pending_at.0, self.pending_at.1));
        }
        let start = self.pos;
        let rest = &self.text.as_bytes()[start..];
        let b = *rest.first()?;
        if b < 0x80 {
            if b == b'<'
                && let Some(t) = BREAKS.iter().find(|t| {
                    rest.len() >= t.len() && rest[..t.len()].eq_ignore_ascii_case(t.as_bytes())
                })
            {
                self.pos += t.len();
                return Some((' ', start, self.pos));
            }
            self.pos += 1;
            return Some((b.to_ascii_lowercase() as char, start, self.pos));
        }
        let c = self.text[start..].chars().next()?;
        self.pos += c.len_utf8();
        self.pending = c.to_lowercase();
        self.pending_at = (start, self.pos);
        self.pending.next().map(|l| (l, start, self.pos))
    }
}

/// Lower-cases the text and turns the HTML line breaks IMDB reviews contain (`<br />`) into
/// spaces.
pub fn normalize(text: &str) -> String {
    NormChars::new(text).map(|(c, _, _)| c).collect()
}

/// What the scanner reports while reading normalised characters.
enum Event {
    /// A character of the current token.
    TokenChar(char),
    /// The current token is complete: its byte range in the text read and its hash.
    Token { start: usize, end: usize, hash: u64 },
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

/// The scanner, where every token of this module comes from. Words are runs of letters and
/// digits (an apostrophe between two of them stays inside, so "don't" is one token); `!`
/// and `?` are tokens of their own because they carry sentiment; everything else separates
/// tokens. Each token's hash is the 64-bit FNV-1a of its UTF-8 (a fixed,
/// platform-independent token hash), and its byte range spans the characters it was read
/// from.
#[inline]
fn scan(chars: impl Iterator<Item = (char, usize, usize)>, mut emit: impl FnMut(Event)) {
    let mut chars = chars.peekable();
    // The current word: whether there is one, its byte range so far, its hash so far.
    let (mut in_word, mut word_start, mut word_end, mut h) = (false, 0, 0, FNV_OFFSET);
    while let Some((c, start, end)) = chars.next() {
        let word_char = c.is_alphanumeric()
            || (c == '\'' && in_word && chars.peek().is_some_and(|n| n.0.is_alphanumeric()));
        if word_char {
            if !in_word {
                (in_word, word_start, h) = (true, start, FNV_OFFSET);
            }
            word_end = end;
            h = fnv_char(h, c);
            emit(Event::TokenChar(c));
            continue;
        }
        if in_word {
            in_word = false;
            emit(Event::Token {
                start: word_start,
                end: word_end,
                hash: h,
            });
        }
        if c == '!' || c == '?' {
            emit(Event::TokenChar(c));
            emit(Event::Token {
                start,
                end,
                hash: fnv_char(FNV_OFFSET, c),
            });
        }
    }
    if in_word {
        emit(Event::Token {
            start: word_start,
            end: word_end,
            hash: h,
        });
    }
}

/// Splits normalised text into tokens (see [`scan`] for the rules).
pub fn tokenize(normalized: &str) -> Vec<String> {
    let mut tokens = Vec::new();
    let mut word = String::new();
    let chars = normalized
        .char_indices()
        .map(|(i, c)| (c, i, i + c.len_utf8()));
    scan(chars, |e| match e {
        Event::TokenChar(c) => word.push(c),
        Event::Token { .. } => tokens.push(std::mem::take(&mut word)),
    });
    tokens
}

/// The token hashes of raw text in one pass: normalise, tokenise and hash without building
/// any string. Equal to the hashes of the tokens of `tokenize(&normalize(text))`.
fn token_hashes(text: &str, out: &mut Vec<u64>) {
    if text.is_ascii() {
        return ascii_token_hashes(text.as_bytes(), out);
    }
    scan(NormChars::new(text), |e| {
        if let Event::Token { hash, .. } = e {
            out.push(hash)
        }
    });
}

/// [`token_hashes`] of ASCII text, byte by byte: the same rules as [`NormChars`] and
/// [`scan`] (a test pins the two together), without decoding characters or asking Unicode
/// tables. Most reviews are ASCII, and the trainer and the aggregator featurise every
/// review of their files each round, so this is most of their featurising time.
fn ascii_token_hashes(text: &[u8], out: &mut Vec<u64>) {
    // Every token takes at least one byte, so the text's length bounds their number. Writing
    // into a slice of that size keeps the running hash in a register; a `push`, which may
    // reallocate, makes the compiler store it to memory at every byte.
    let at = out.len();
    out.resize(at + text.len(), 0);
    let slots = &mut out[at..];
    let (mut i, mut n, mut in_word, mut h) = (0, 0, false, FNV_OFFSET);
    while i < text.len() {
        let b = text[i];
        i += 1;
        let class = ASCII_CLASS[b as usize];
        if class == WORD
            || (class == APOSTROPHE
                && in_word
                && text
                    .get(i)
                    .is_some_and(|&n| ASCII_CLASS[n as usize] == WORD))
        {
            if !in_word {
                (in_word, h) = (true, FNV_OFFSET);
            }
            h = (h ^ b.to_ascii_lowercase() as u64).wrapping_mul(FNV_PRIME);
            continue;
        }
        if class == OPEN
            && let Some(t) = BREAKS.iter().find(|t| {
                text.len() - i + 1 >= t.len()
                    && text[i - 1..i - 1 + t.len()].eq_ignore_ascii_case(t.as_bytes())
            })
        {
            // A break reads as a space: it ends a word and is no token itself.
            i += t.len() - 1;
        }
        if in_word {
            in_word = false;
            slots[n] = h;
            n += 1;
        }
        if class == MARK {
            slots[n] = (FNV_OFFSET ^ b as u64).wrapping_mul(FNV_PRIME);
            n += 1;
        }
    }
    if in_word {
        slots[n] = h;
        n += 1;
    }
    out.truncate(at + n);
}

/// What an ASCII byte is to [`ascii_token_hashes`]: one table lookup instead of a chain of
/// comparisons per byte.
const ASCII_CLASS: [u8; 256] = {
    let mut t = [SEPARATOR; 256];
    let mut b = 0;
    while b < 128 {
        if (b as u8).is_ascii_alphanumeric() {
            t[b] = WORD;
        }
        b += 1;
    }
    t[b'\'' as usize] = APOSTROPHE;
    t[b'!' as usize] = MARK;
    t[b'?' as usize] = MARK;
    t[b'<' as usize] = OPEN;
    t
};
/// Ends a word, is no token.
const SEPARATOR: u8 = 0;
/// A letter or digit.
const WORD: u8 = 1;
/// Inside a word when a letter or digit is on both sides, else a separator.
const APOSTROPHE: u8 = 2;
/// `!` and `?`: tokens of their own.
const MARK: u8 = 3;
/// `<`: maybe the start of a line break, else a separator.
const OPEN: u8 = 4;

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

/// Sorts `buckets` (each below `2^bits`) in place, `spare` and `bins` being scratch space.
///
/// A review has several hundred n-gram buckets and every review of a shard and of the test
/// set is featurised again each round, in the trainers and the aggregator, so this sort is
/// a large part of a round. Buckets are hashes, spread evenly over `0..2^bits`: one
/// counting pass and one scatter by their top bits, into about as many bins as there are
/// values, leave each value in its bin in order of bins, and a bin holds one value or
/// none on average. An insertion pass then only swaps values within a bin (repeats of one
/// bucket, which are common, do not move). A comparison sort pays for ordering what the
/// hash has already spread out; a full radix sort pays for clearing and summing more
/// bins than there are values. Either way the result is the same sorted list.
fn sort_buckets(buckets: &mut Vec<u32>, spare: &mut Vec<u32>, bins: &mut Vec<u32>, bits: u32) {
    let n = buckets.len();
    if n < 64 {
        buckets.sort_unstable();
        return;
    }
    // 2^k bins, the smallest power of two at least `n`, and never more than values exist.
    let k = (usize::BITS - (n - 1).leading_zeros()).min(bits);
    let shift = bits - k;
    bins.clear();
    bins.resize(1 << k, 0);
    for &x in buckets.iter() {
        bins[(x >> shift) as usize] += 1;
    }
    // Each bin's count becomes its start; the running sum stays in a register.
    let mut sum = 0;
    for b in bins.iter_mut() {
        (*b, sum) = (sum, sum + *b);
    }
    spare.clear();
    spare.resize(n, 0);
    for &x in buckets.iter() {
        let at = &mut bins[(x >> shift) as usize];
        spare[*at as usize] = x;
        *at += 1;
    }
    // Text chosen to crowd one bin (the server featurises what anyone sends) would make the
    // insertion pass quadratic: past a few moves per value, the comparison sort finishes.
    let mut moves = 0;
    for i in 1..n {
        let x = spare[i];
        let mut j = i;
        while j > 0 && spare[j - 1] > x {
            spare[j] = spare[j - 1];
            j -= 1;
        }
        spare[j] = x;
        moves += i - j;
        if moves > 8 * n {
            spare.sort_unstable();
            break;
        }
    }
    std::mem::swap(buckets, spare);
}

/// Reusable featurizer: holds scratch buffers so featurising many documents allocates little.
#[derive(Debug, Clone)]
pub struct Featurizer {
    config: FeaturizerConfig,
    hashes: Vec<u64>,
    /// The bucket sort's second buffer and its bins.
    spare: Vec<u32>,
    bins: Vec<u32>,
}

impl Featurizer {
    pub fn new(config: FeaturizerConfig) -> Self {
        Self {
            config,
            hashes: Vec::new(),
            spare: Vec::new(),
            bins: Vec::new(),
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
        sort_buckets(out, &mut self.spare, &mut self.bins, self.config.hash_bits);
        out.dedup();
    }

    /// The sorted, distinct buckets of `text`'s n-grams.
    pub fn features(&mut self, text: &str) -> Vec<u32> {
        let mut out = Vec::new();
        self.features_into(text, &mut out);
        out
    }
}

/// The tokens of a text from one pass of the scanner, each with its place in the original
/// text, its normalised text and its hash: what the featurizer reads, laid open for
/// explaining a prediction (the server highlights tokens where the user wrote them).
#[derive(Debug, Clone, Default)]
pub struct Tokens {
    /// Byte range of each token in the original text.
    spans: Vec<(usize, usize)>,
    hashes: Vec<u64>,
    /// The normalised tokens back to back; token `i` ends at `ends[i]`.
    text: String,
    ends: Vec<usize>,
}

impl Tokens {
    /// Normalises, tokenises and hashes `text` in one pass.
    pub fn new(text: &str) -> Self {
        let mut t = Self::default();
        scan(NormChars::new(text), |e| match e {
            Event::TokenChar(c) => t.text.push(c),
            Event::Token { start, end, hash } => {
                t.spans.push((start, end));
                t.hashes.push(hash);
                t.ends.push(t.text.len());
            }
        });
        t
    }

    /// Number of tokens.
    pub fn len(&self) -> usize {
        self.hashes.len()
    }

    pub fn is_empty(&self) -> bool {
        self.hashes.is_empty()
    }

    /// Token `i`'s byte range in the original text, on character boundaries. A token that
    /// ends inside a character's lower-case expansion (`i` of `İ` → `i̇`) covers the whole
    /// character.
    pub fn span(&self, i: usize) -> std::ops::Range<usize> {
        let (start, end) = self.spans[i];
        start..end
    }

    /// Token `i` as the featurizer reads it: `tokenize(&normalize(text))[i]`.
    pub fn text(&self, i: usize) -> &str {
        let start = if i == 0 { 0 } else { self.ends[i - 1] };
        &self.text[start..self.ends[i]]
    }

    /// Calls `f(n, start, bucket)` for every n-gram occurrence (n = 1..=max_ngram, starting
    /// at token `start`): the buckets [`Featurizer`] makes of the same text, with where they
    /// stand.
    pub fn for_each_ngram(&self, cfg: &FeaturizerConfig, f: impl FnMut(usize, usize, u32)) {
        for_each_ngram(&self.hashes, cfg, f);
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
    let scanned = Tokens::new(text);
    let tokens: Vec<String> = (0..scanned.len())
        .map(|i| scanned.text(i).to_owned())
        .collect();
    let mut ngrams = Vec::new();
    scanned.for_each_ngram(cfg, |n, start, bucket| {
        ngrams.push(NGram {
            text: tokens[start..start + n].join(" "),
            n,
            start,
            bucket,
        });
    });
    Preprocessed {
        normalized: normalize(text),
        tokens,
        ngrams,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The bucket sort sorts as the comparison sort does: for lists short (the comparison
    /// sort itself) and long, with more bins than values can exist (10 bits), with repeats,
    /// and with values crowded into a few bins (the list of 700, whose values are below
    /// 2^bits / 64), where the insertion pass gives up and the comparison sort finishes.
    #[test]
    fn bucket_sort_sorts() {
        let mut state = 0x2545_f491_4f6c_dd1d_u64;
        let (mut spare, mut bins) = (Vec::new(), Vec::new());
        for bits in [10, 11, 12, 22, 28] {
            for len in [0, 1, 63, 64, 65, 255, 256, 257, 700, 5000] {
                let mut v: Vec<u32> = (0..len)
                    .map(|_| {
                        state ^= state << 13;
                        state ^= state >> 7;
                        state ^= state << 17;
                        (state % (1u64 << bits)) as u32 / if len == 700 { 64 } else { 1 }
                    })
                    .collect();
                let mut want = v.clone();
                want.sort_unstable();
                sort_buckets(&mut v, &mut spare, &mut bins, bits);
                assert_eq!(v, want, "{bits} bits, {len} values");
            }
        }
    }

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

    /// Texts where normalising and tokenising are easy to get wrong: breaks in any case,
    /// apostrophes, lower-case expansions (`İ` → `i̇`, a token ending inside a character),
    /// ligatures, emoji, an unfinished tag.
    const TRICKY: [&str; 9] = [
        "Plain ascii, with <BR/>breaks<br>and<br />marks!? don't 'quote'",
        "Ünïcödé İstanbul ǅemal straße ΣΑΣ don't 'quote' rock'n'roll",
        "trailing apostrophe' and <b>tags</b> <br",
        "",
        "   ...   ",
        "x<br /><br />y<Br>z!!",
        "İİİ a'b'c ''d'' 10/10",
        "emoji 🎬 great!! ǈ ẞ ﬁne",
        "İ'a İ!x",
    ];

    /// 64-bit FNV-1a of a token's UTF-8 bytes: the token hash by its definition.
    fn token_hash(token: &str) -> u64 {
        token.chars().fold(FNV_OFFSET, fnv_char)
    }

    #[test]
    fn the_ascii_scanner_equals_the_general_one() {
        let general = |t: &str| {
            let mut out = Vec::new();
            scan(NormChars::new(t), |e| {
                if let Event::Token { hash, .. } = e {
                    out.push(hash)
                }
            });
            out
        };
        // Every string of up to 3 pieces from an alphabet of the scanner's special cases.
        let pieces = [
            "a", "Z", "7", "'", "!", "?", " ", ".", "<", "<br />", "<BR/>", "<Br>", "<br", "<b>",
            "don't", "'x'", "x'", "\t",
        ];
        let mut texts: Vec<String> = TRICKY
            .iter()
            .filter(|t| t.is_ascii())
            .map(|t| t.to_string())
            .collect();
        for a in pieces {
            for b in pieces {
                for c in pieces {
                    texts.push(format!("{a}{b}{c}"));
                }
            }
        }
        for t in &texts {
            let mut fast = Vec::new();
            ascii_token_hashes(t.as_bytes(), &mut fast);
            assert_eq!(fast, general(t), "{t:?}");
        }
    }

    #[test]
    fn one_pass_hashing_equals_hashing_the_tokens() {
        for t in TRICKY {
            let mut fast = Vec::new();
            token_hashes(t, &mut fast);
            let slow: Vec<u64> = tokenize(&normalize(t))
                .iter()
                .map(|w| token_hash(w))
                .collect();
            assert_eq!(fast, slow, "{t}");
        }
    }

    /// The tokens with their places are the featurizer's tokens: the same text, hashes and
    /// buckets, at increasing character-boundary ranges of the original text.
    #[test]
    fn tokens_with_places_are_the_featurizers_tokens() {
        let cfg = FeaturizerConfig {
            hash_bits: 12,
            max_ngram: 3,
        };
        for t in TRICKY {
            let tokens = Tokens::new(t);
            let texts: Vec<&str> = (0..tokens.len()).map(|i| tokens.text(i)).collect();
            assert_eq!(texts, tokenize(&normalize(t)), "{t:?}");
            let hashes: Vec<u64> = texts.iter().map(|w| token_hash(w)).collect();
            assert_eq!(tokens.hashes, hashes, "{t:?}");
            let mut prev_end = 0;
            for i in 0..tokens.len() {
                let s = tokens.span(i);
                assert!(
                    prev_end <= s.start
                        && s.start < s.end
                        && t.is_char_boundary(s.start)
                        && t.is_char_boundary(s.end),
                    "{t:?} {s:?}"
                );
                prev_end = s.end;
            }
            let mut buckets = Vec::new();
            tokens.for_each_ngram(&cfg, |_, _, b| buckets.push(b));
            buckets.sort_unstable();
            buckets.dedup();
            assert_eq!(buckets, Featurizer::new(cfg).features(t), "{t:?}");
        }
        let text = "Great<br />FILM! İ'a";
        let tokens = Tokens::new(text);
        let places: Vec<&str> = (0..tokens.len()).map(|i| &text[tokens.span(i)]).collect();
        assert_eq!(places, ["Great", "FILM", "!", "İ", "a"]);
        assert_eq!(tokens.span(1), 11..15);
        assert_eq!(tokens.text(3), "i");
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
