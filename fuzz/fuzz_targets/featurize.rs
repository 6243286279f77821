//! The featurizer on arbitrary text, and the server's explanations that must follow it.
//!
//! Input: 3 bytes of settings (hash bits 10..=28, longest n-gram 1..=5, explanation top-k
//! and highlight), then the text (invalid UTF-8 replaced, as no caller can pass it).
//! Checks, beyond "no panic":
//! - `Featurizer::features_into`: buckets sorted, distinct, below 2^hash_bits; the same as
//!   the distinct buckets of `preprocess` and of `Tokens::for_each_ngram`;
//! - `preprocess`: normalised text and tokens equal `normalize` / `tokenize`; tokens are
//!   words (letters, digits, inner apostrophes) or `!`/`?`; one n-gram per token position
//!   and length, in order;
//! - `Tokens` (the featurizer's tokens with their places) at increasing character-boundary
//!   ranges of the original text;
//! - `server::explain::explain` (a 2^10-bucket model): the logit of the review's features,
//!   to the bit; each class's top n-grams push toward it (positive weights), at most top-k, by
//!   decreasing weight; highlight spans in range, adding up to the logit.

#![no_main]

use std::sync::OnceLock;

use fedimdb::featurize::{Featurizer, FeaturizerConfig, Tokens, normalize, preprocess, tokenize};
use fedimdb::model::{ModelConfig, Scorer};
use libfuzzer_sys::fuzz_target;
use server::explain::explain;

/// A small model per longest n-gram, with fixed pseudo-random weights of both signs.
fn scorers() -> &'static [Scorer] {
    static S: OnceLock<Vec<Scorer>> = OnceLock::new();
    S.get_or_init(|| {
        (1..=5)
            .map(|max_ngram| {
                let cfg = ModelConfig {
                    featurizer: FeaturizerConfig {
                        hash_bits: 10,
                        max_ngram,
                    },
                    ..ModelConfig::default()
                };
                let dim = cfg.dim();
                let weight: Vec<f32> = (0..dim)
                    .map(|i| ((i * 7919 % 17) as f32 - 8.0) / 4.0)
                    .collect();
                let ratio: Vec<f32> = (0..dim).map(|i| 0.5 + (i % 5) as f32 / 4.0).collect();
                Scorer::new(cfg, &weight, &[0.25], &ratio)
            })
            .collect()
    })
}

fuzz_target!(
    init: fedimdb_fuzz::init("featurize"),
    |data: &[u8]| {
        let [bits, ngram, ex, rest @ ..] = data else { return };
        let text = String::from_utf8_lossy(rest);
        let cfg = FeaturizerConfig { hash_bits: 10 + (*bits as u32 % 19), max_ngram: 1 + (*ngram as u32 % 5) };
        cfg.validate().expect("the harness builds valid configs");

        let mut f = Featurizer::new(cfg);
        let mut feats = vec![u32::MAX; 3]; // features_into must replace what is there
        f.features_into(&text, &mut feats);
        assert!(feats.windows(2).all(|w| w[0] < w[1]), "buckets not sorted and distinct: {feats:?}");
        assert!(feats.iter().all(|&b| (b as usize) < cfg.buckets()), "bucket out of range");

        let p = preprocess(&text, &cfg);
        assert_eq!(p.normalized, normalize(&text));
        assert_eq!(p.tokens, tokenize(&p.normalized));
        for t in &p.tokens {
            let word = t.chars().all(|c| c.is_alphanumeric() || c == '\'')
                && !t.starts_with('\'')
                && !t.ends_with('\'')
                && !t.contains("''");
            assert!(word || t == "!" || t == "?", "odd token {t:?}");
        }
        let n_tokens = p.tokens.len();
        let max_n = cfg.max_ngram as usize;
        let expected: usize = (1..=max_n).map(|n| (n_tokens + 1).saturating_sub(n)).sum();
        assert_eq!(p.ngrams.len(), expected, "n-gram count for {n_tokens} tokens");
        let tokens = Tokens::new(&text);
        let mut fast = Vec::with_capacity(p.ngrams.len());
        tokens.for_each_ngram(&cfg, |n, start, bucket| fast.push((n, start, bucket)));
        let slow: Vec<(usize, usize, u32)> = p.ngrams.iter().map(|g| (g.n, g.start, g.bucket)).collect();
        assert_eq!(fast, slow, "the n-grams of Tokens differ from preprocess");
        for g in &p.ngrams {
            assert_eq!(g.text, p.tokens[g.start..g.start + g.n].join(" "));
        }
        let mut distinct: Vec<u32> = slow.iter().map(|x| x.2).collect();
        distinct.sort_unstable();
        distinct.dedup();
        assert_eq!(distinct, feats, "features differ from preprocess");

        assert_eq!(tokens.len(), n_tokens);
        let mut prev_end = 0;
        for i in 0..tokens.len() {
            let s = tokens.span(i);
            assert!(prev_end <= s.start && s.start < s.end && s.end <= text.len(), "{s:?}");
            assert!(text.is_char_boundary(s.start) && text.is_char_boundary(s.end), "{s:?}");
            prev_end = s.end;
        }

        // Explanations, with the model of this max_ngram (2^10 buckets: any hash_bits would
        // do, the explanation only uses the scorer's own config).
        let scorer = &scorers()[max_n - 1];
        let top_k = (*ex % 8) as usize;
        let highlight = ex & 8 != 0;
        let (logits, e) = explain(&text, scorer, top_k, 2, highlight);
        let logit = logits[0];
        let feats = Featurizer::new(scorer.config.featurizer).features(&text);
        assert_eq!(logit.to_bits(), scorer.logits(&feats)[0].to_bits(), "explained logit differs");
        for class in 0..2 {
            let words = e.words(class).unwrap_or(&[]);
            assert!(words.len() <= top_k);
            assert!(words.iter().all(|w| w.weight > 0.0), "{words:?}");
            assert!(words.windows(2).all(|w| w[0].weight >= w[1].weight), "{words:?}");
            assert!(words.iter().all(|w| (1..=max_n).contains(&w.n) && w.text.split(' ').count() == w.n), "{words:?}");
        }
        match (&e.highlight, highlight) {
            (None, false) => {}
            (Some(h), true) => {
                assert_eq!(h.len(), n_tokens);
                let chars = text.chars().count();
                assert!(h.iter().all(|s| s.start < s.end && s.end <= chars), "{h:?}");
                let total: f32 = h.iter().map(|s| s.weight).sum();
                let scale: f32 = feats.iter().map(|&b| scorer.contribution(1, b, feats.len()).abs()).sum::<f32>() + 1.0;
                assert!((total + scorer.bias[0] - logit).abs() <= 1e-4 * scale, "{total} + {} vs {logit}", scorer.bias[0]);
            }
            (h, _) => panic!("highlight {h:?} when asked {highlight}"),
        }
    }
);
