//! The round table both executors print: one row per round with what its trainers and its
//! aggregator did, built from the steps' outcome records (`fedimdb::outcome`), and the test
//! accuracy. `pipeline local` and `pipeline k8s` print it the same way, row by row as the
//! rounds finish and whole at the end.

use fedimdb::outcome::{Outcome, Status};

/// One line for a step's succeeded runs (`unit`: `pods` or `workers`): up to date,
/// computed or a mix, the test accuracy an aggregator recorded, and how many left no
/// record. `None` for no runs.
pub fn summarize(records: &[Option<Outcome>], unit: &str) -> Option<String> {
    if records.is_empty() {
        return None;
    }
    let known: Vec<&Outcome> = records.iter().flatten().collect();
    let fresh = known
        .iter()
        .filter(|o| o.status == Status::UpToDate)
        .count();
    let computed = known.len() - fresh;
    let mut line = match (fresh, computed) {
        (0, 0) => "outcome unknown".to_owned(),
        (_, 0) => "up to date, nothing recomputed".to_owned(),
        (0, _) => "computed".to_owned(),
        _ => format!(
            "{fresh} of {} {unit} up to date, {computed} computed",
            known.len()
        ),
    };
    if let Some(acc) = known.iter().find_map(|o| o.test_accuracy) {
        line.push_str(&format!(", test accuracy {:.2}%", acc * 100.0));
    }
    let unknown = records.len() - known.len();
    if unknown > 0 && !known.is_empty() {
        line.push_str(&format!(" ({unknown} {unit} left no outcome record)"));
    }
    Some(line)
}

/// One row of the round table: what a round's trainers and aggregator did.
#[derive(Debug, Clone, PartialEq)]
pub struct RoundRow {
    pub round: u32,
    pub trainers: String,
    pub aggregator: String,
    pub accuracy: Option<f64>,
    pub seconds: f64,
}

impl RoundRow {
    /// The trainers' cell: how many of the round's `workers` succeeded, and what they did.
    pub fn trainers_cell(records: &[Option<Outcome>], workers: usize, unit: &str) -> String {
        let line = summarize(records, unit).unwrap_or_else(|| "none succeeded".to_owned());
        format!("{}/{workers} {line}", records.len())
    }

    /// The aggregator's cell: its summary without the accuracy, which has its own column.
    pub fn aggregator_cell(summary: &str) -> String {
        summary
            .split(", test accuracy")
            .next()
            .unwrap_or_default()
            .to_owned()
    }
}

/// The round table's header and one line per row.
pub fn round_table(rows: &[RoundRow]) -> Vec<String> {
    let mut lines = vec![format!(
        "{:>5}  {:<36}  {:<30}  {:>8}  {:>7}",
        "round", "trainers", "aggregator", "test acc", "seconds"
    )];
    for r in rows {
        let acc = r
            .accuracy
            .map_or("-".to_string(), |a| format!("{:.2}%", a * 100.0));
        lines.push(format!(
            "{:>5}  {:<36}  {:<30}  {:>8}  {:>7.0}",
            r.round, r.trainers, r.aggregator, acc, r.seconds
        ));
    }
    lines
}
