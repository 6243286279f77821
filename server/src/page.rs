//! The web page: one self-contained HTML file (inline CSS and JS, no CDN, no fonts to fetch),
//! compiled into the binary so the server needs no static folder beside it.
//!
//! Its wording comes from the served model's card ([`Wording`]): the task and the label
//! names, and "movie review" only when the task is IMDB's. The server fills the template's
//! `{{…}}` places when it serves the page; the script reads the same facts from
//! `/api/model` and the predictions' label names.

use std::sync::Arc;

use axum::extract::State;
use axum::http::header;
use axum::response::{IntoResponse, Response};

use crate::AppState;
use crate::state::LoadedModel;

/// The page template, from `server/static/index.html`.
pub const INDEX_HTML: &str = include_str!("../static/index.html");

/// What the page calls things, for one model.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Wording {
    /// The `<title>`'s subject.
    pub title: String,
    /// The sentence under the heading.
    pub lead: String,
    /// What is classified: `review` (IMDB) or `text`.
    pub item: &'static str,
    /// The task, as the card names it (empty before a model loads).
    pub task: String,
    /// The class names in class order (empty before a model loads).
    pub labels: Vec<String>,
}

/// `a`, `a or b`, `a, b or c`; past `max` names, the first ones and `…`.
fn name_list(labels: &[String], max: usize) -> String {
    match labels {
        [] => String::new(),
        [one] => one.clone(),
        _ if labels.len() > max => format!("{}, …", labels[..max].join(", ")),
        [rest @ .., last] => format!("{} or {last}", rest.join(", ")),
    }
}

impl Wording {
    /// The wording for `model`, or a neutral one while none serves.
    pub fn of(model: Option<&LoadedModel>) -> Self {
        match model {
            Some(m) => Self::new(&m.task, &m.labels),
            None => Self::none(),
        }
    }

    /// The wording while no model serves.
    fn none() -> Self {
        Self {
            title: "text classification".into(),
            lead: "A model trained by federated averaging classifies texts, and shows which words decided. No model is loaded yet.".into(),
            item: "text",
            task: String::new(),
            labels: Vec::new(),
        }
    }

    /// The wording for a model of `task` with classes `labels`.
    pub fn new(task: &str, labels: &[String]) -> Self {
        let sentiment = task == fedimdb::labels::Task::Sentiment.title()
            && labels == fedimdb::labels::SENTIMENT;
        let (title, lead, item) = if sentiment {
            (
                "movie review sentiment".to_owned(),
                "Is a movie review positive or negative? A model trained by federated averaging on IMDB reviews answers, and shows which words decided.".to_owned(),
                "review",
            )
        } else if task.starts_with("IMDB") {
            (
                task.to_owned(),
                format!(
                    "{task}: which of {} fits a movie review? A model trained by federated averaging on IMDB reviews answers, and shows which words decided.",
                    name_list(labels, 10)
                ),
                "review",
            )
        } else {
            (
                task.to_owned(),
                format!(
                    "{task}: which of {} fits a text? A model trained by federated averaging answers, and shows which words decided.",
                    name_list(labels, 10)
                ),
                "text",
            )
        };
        Self {
            title,
            lead,
            item,
            task: task.to_owned(),
            labels: labels.to_vec(),
        }
    }

    /// The page with this wording.
    pub fn render(&self) -> String {
        let item = self.item;
        let (capital, field) = if item == "review" {
            ("Review", "Review text")
        } else {
            ("Text", "Text")
        };
        let placeholder = if item == "review" {
            "Type or paste a movie review…"
        } else {
            "Type or paste a text…"
        };
        let labels = serde_json::to_string(&self.labels).unwrap_or_else(|_| "[]".into());
        INDEX_HTML
            .replace("{{title}}", &esc(&self.title))
            .replace("{{lead}}", &esc(&self.lead))
            .replace("{{Item}}", capital)
            .replace("{{field}}", field)
            .replace("{{item}}", item)
            .replace("{{placeholder}}", placeholder)
            .replace("{{task}}", &esc(&self.task))
            .replace("{{labels}}", &esc(&labels))
    }
}

/// Escapes text for HTML content and double- or single-quoted attributes.
fn esc(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    for c in s.chars() {
        match c {
            '&' => out.push_str("&amp;"),
            '<' => out.push_str("&lt;"),
            '>' => out.push_str("&gt;"),
            '"' => out.push_str("&quot;"),
            '\'' => out.push_str("&#39;"),
            c => out.push(c),
        }
    }
    out
}

/// `GET /`.
pub async fn index(State(state): State<Arc<AppState>>) -> Response {
    let page = Wording::of(state.models.current().as_deref()).render();
    (
        [
            (header::CONTENT_TYPE, "text/html; charset=utf-8"),
            // Everything is inline; nothing may be loaded from elsewhere.
            (
                header::CONTENT_SECURITY_POLICY,
                "default-src 'none'; script-src 'unsafe-inline'; style-src 'unsafe-inline'; connect-src 'self'; img-src 'self' data:",
            ),
        ],
        page,
    )
        .into_response()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_are_listed_for_people() {
        let l = |v: &[&str]| v.iter().map(|s| (*s).to_owned()).collect::<Vec<_>>();
        assert_eq!(name_list(&l(&["a", "b"]), 10), "a or b");
        assert_eq!(name_list(&l(&["a", "b", "c"]), 10), "a, b or c");
        assert_eq!(name_list(&l(&["a", "b", "c"]), 2), "a, b, …");
    }

    #[test]
    fn wording_follows_the_task_and_labels() {
        let l = |v: &[&str]| v.iter().map(|s| (*s).to_owned()).collect::<Vec<_>>();
        let imdb = Wording::new("IMDB sentiment", &l(&["neg", "pos"]));
        assert_eq!(imdb.title, "movie review sentiment");
        assert!(
            imdb.lead
                .starts_with("Is a movie review positive or negative?")
        );
        let rating = Wording::new("IMDB rating", &fedimdb::labels::Task::Rating.labels());
        assert_eq!(
            (rating.title.as_str(), rating.item),
            ("IMDB rating", "review")
        );
        assert!(
            rating.lead.starts_with(
                "IMDB rating: which of 1, 2, 3, 4, 7, 8, 9 or 10 fits a movie review?"
            ),
            "{}",
            rating.lead
        );
        let spam = Wording::new("spam.csv", &l(&["ham", "spam"]));
        assert_eq!(spam.item, "text");
        assert!(
            spam.lead
                .starts_with("spam.csv: which of ham or spam fits a text?")
        );
        let page = spam.render();
        assert!(!page.to_lowercase().contains("movie review"));
        // Card text is escaped where it lands.
        let page = Wording::new("<b>\"x\"</b>", &l(&["a", "b"])).render();
        assert!(page.contains("&lt;b&gt;&quot;x&quot;&lt;/b&gt;") && !page.contains("<b>"));
    }

    #[test]
    fn the_template_has_no_unfilled_places() {
        let page = Wording::of(None).render();
        assert!(!page.contains("{{"), "unfilled place in the page");
        assert_eq!(
            esc("<a href='x'>&\""),
            "&lt;a href=&#39;x&#39;&gt;&amp;&quot;"
        );
    }
}
