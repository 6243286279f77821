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

use std::collections::HashMap;

use fedimdb::featurize::preprocess;
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

/// A token of the original text: its normalised form and byte range.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TokenSpan {
    pub text: String,
    pub start: usize,
    pub end: usize,
}

const BREAKS: [&str; 3] = ["<br />", "<br/>", "<br>"];

/// The tokens of `text` with their byte ranges in it, by the rules of
/// `fedimdb::featurize::{normalize, tokenize}`.
pub fn token_spans(text: &str) -> Vec<TokenSpan> {
    // Normalised characters, each with the byte range of the original it came from.
    let mut chars: Vec<(char, usize, usize)> = Vec::with_capacity(text.len());
    let bytes = text.as_bytes();
    let mut i = 0;
    while i < text.len() {
        if bytes[i] == b'<'
            && let Some(t) = BREAKS.iter().find(|t| bytes.len() - i >= t.len() && bytes[i..i + t.len()].eq_ignore_ascii_case(t.as_bytes()))
        {
            chars.push((' ', i, i + t.len()));
            i += t.len();
            continue;
        }
        let c = text[i..].chars().next().unwrap_or(' ');
        let end = i + c.len_utf8();
        for l in c.to_lowercase() {
            chars.push((l, i, end));
        }
        i = end;
    }
    let mut tokens = Vec::new();
    let mut word: Option<TokenSpan> = None;
    for k in 0..chars.len() {
        let (c, s, e) = chars[k];
        let word_char =
            c.is_alphanumeric() || (c == '\'' && word.is_some() && chars.get(k + 1).is_some_and(|n| n.0.is_alphanumeric()));
        if word_char {
            match &mut word {
                Some(w) => {
                    w.text.push(c);
                    w.end = e;
                }
                None => word = Some(TokenSpan { text: c.to_string(), start: s, end: e }),
            }
            continue;
        }
        if let Some(w) = word.take() {
            tokens.push(w);
        }
        if c == '!' || c == '?' {
            tokens.push(TokenSpan { text: c.to_string(), start: s, end: e });
        }
    }
    tokens.extend(word);
    tokens
}

/// Explains the scorer's logit for `text`: the `top_k` n-grams pushing each way and, if
/// asked, per-token weights with their code-point ranges in `text`.
pub fn explain(text: &str, scorer: &Scorer, top_k: usize, highlight: bool) -> Explanation {
    let p = preprocess(text, &scorer.config.featurizer);
    // Distinct buckets, each with its first n-gram (for its text) and number of occurrences.
    let mut buckets: HashMap<u32, (usize, u32)> = HashMap::with_capacity(p.ngrams.len());
    for (i, g) in p.ngrams.iter().enumerate() {
        buckets.entry(g.bucket).or_insert((i, 0)).1 += 1;
    }
    let n_distinct = buckets.len();
    let contribution = |b: u32| scorer.contribution(b, n_distinct);
    let mut scored: Vec<(f32, usize)> = buckets.iter().map(|(&b, &(first, _))| (contribution(b), first)).collect();
    // Ties broken by position, so the answer does not depend on hash-map order.
    scored.sort_by(|a, b| b.0.total_cmp(&a.0).then(a.1.cmp(&b.1)));
    let word = |&(w, i): &(f32, usize)| Word { text: p.ngrams[i].text.clone(), n: p.ngrams[i].n, weight: w };
    let top_positive = scored.iter().take_while(|s| s.0 > 0.0).take(top_k).map(word).collect();
    let mut neg: Vec<&(f32, usize)> = scored.iter().rev().take_while(|s| s.0 < 0.0).take(top_k).collect();
    neg.sort_by(|a, b| a.0.total_cmp(&b.0).then(a.1.cmp(&b.1)));
    let top_negative = neg.into_iter().map(word).collect();
    let highlight = highlight.then(|| {
        let mut weights = vec![0f32; p.tokens.len()];
        for g in &p.ngrams {
            let share = contribution(g.bucket) / buckets[&g.bucket].1 as f32 / g.n as f32;
            for w in &mut weights[g.start..g.start + g.n] {
                *w += share;
            }
        }
        let spans = token_spans(text);
        if spans.len() != weights.len() {
            // Cannot happen while token_spans follows the featurizer (tested); if it ever
            // does, give no highlight rather than a wrong one.
            tracing::warn!("token spans and featurizer tokens disagree; no highlight");
            return Vec::new();
        }
        // Byte offsets to code-point offsets, in one pass over the text.
        let mut cp_at = vec![0usize; text.len() + 1];
        let mut cp = 0;
        for (b, _) in text.char_indices() {
            cp_at[b] = cp;
            cp += 1;
        }
        cp_at[text.len()] = cp;
        spans.iter().zip(weights).map(|(s, w)| Span { start: cp_at[s.start], end: cp_at[s.end], weight: w }).collect()
    });
    Explanation { top_positive, top_negative, highlight }
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
            let spans = token_spans(t);
            let texts: Vec<&str> = spans.iter().map(|s| s.text.as_str()).collect();
            assert_eq!(texts, tokenize(&normalize(t)), "{t:?}");
            for s in &spans {
                assert!(t.is_char_boundary(s.start) && t.is_char_boundary(s.end) && s.start < s.end, "{t:?} {s:?}");
            }
        }
        let s = token_spans("Great<br />FILM!");
        assert_eq!((s[1].start, s[1].end), (11, 15));
        assert_eq!(&"Great<br />FILM!"[s[1].start..s[1].end], "FILM");
    }

    fn scorer() -> Scorer {
        let cfg = ModelConfig { featurizer: FeaturizerConfig { hash_bits: 12, max_ngram: 2 }, nb_smoothing: 1.0 };
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
        assert!(e.top_positive.iter().all(|w| w.weight > 0.0) && e.top_negative.iter().all(|w| w.weight < 0.0));
        let spans = e.highlight.unwrap();
        let chars: Vec<char> = text.chars().collect();
        let first: String = chars[spans[1].start..spans[1].end].iter().collect();
        assert_eq!(first, "GREAT");
        let total: f32 = spans.iter().map(|s| s.weight).sum();
        let logit = s.logit(&Featurizer::new(s.config.featurizer).features(text));
        assert!((total + s.bias - logit).abs() < 1e-5, "{total} + {} vs {logit}", s.bias);
    }

    #[test]
    fn code_point_offsets_with_multibyte_text() {
        let s = scorer();
        let text = "Ça 🎬 great";
        let spans = explain(text, &s, 1, true).highlight.unwrap();
        let chars: Vec<char> = text.chars().collect();
        let last = spans.last().unwrap();
        assert_eq!(chars[last.start..last.end].iter().collect::<String>(), "great");
        assert!(explain("", &s, 3, true).highlight.unwrap().is_empty());
        assert!(explain("", &s, 3, false).top_positive.is_empty());
    }
}
