//! Training data: a CSV table read into a dense feature matrix and a target,
//! standardisation statistics computed once over the whole table (so that every
//! shard scales its rows the same way), and each rank's share of the rows.
//!
//! The task follows the label column: text labels, or integer labels with at most
//! [`MAX_INTEGER_CLASSES`] distinct values, make a classification (classes in sorted
//! order, so every rank numbers them alike); any other numeric label a regression.

use std::collections::BTreeSet;
use std::io::Read;
use std::ops::Range;

/// Integer labels with at most this many distinct values are classes.
pub const MAX_INTEGER_CLASSES: usize = 100;

/// What the model predicts.
#[derive(Debug, Clone, PartialEq)]
pub enum Target {
    /// Class indices into `names`.
    Classes { names: Vec<String>, y: Vec<u32> },
    /// Real values.
    Values(Vec<f32>),
}

/// A table of `rows` examples with `features.len()` features each.
#[derive(Debug, Clone, PartialEq)]
pub struct Dataset {
    pub features: Vec<String>,
    pub label: String,
    /// Row-major: `rows × features.len()`.
    pub x: Vec<f32>,
    pub target: Target,
    pub rows: usize,
}

/// Why a table could not be read.
#[derive(Debug, thiserror::Error, PartialEq)]
pub enum DataError {
    #[error("the CSV has no header row")]
    NoHeader,
    #[error("column {0} is not in the CSV (its columns: {1})")]
    MissingColumn(String, String),
    #[error("row {row}, column {column}: '{value}' is not a number")]
    NotANumber {
        row: usize,
        column: String,
        value: String,
    },
    #[error("row {row}: {message}")]
    Malformed { row: usize, message: String },
    #[error("the table has no rows")]
    Empty,
}

/// Reads a CSV with a header; `features` empty means every column but the label.
pub fn read_csv(source: impl Read, label: &str, features: &[String]) -> Result<Dataset, DataError> {
    let mut reader = csv::ReaderBuilder::new()
        .has_headers(true)
        .from_reader(source);
    let header: Vec<String> = reader
        .headers()
        .map_err(|e| DataError::Malformed {
            row: 0,
            message: e.to_string(),
        })?
        .iter()
        .map(|h| h.trim().to_string())
        .collect();
    if header.is_empty() || header.iter().all(String::is_empty) {
        return Err(DataError::NoHeader);
    }
    let index = |name: &str| {
        header
            .iter()
            .position(|h| h == name)
            .ok_or_else(|| DataError::MissingColumn(name.to_string(), header.join(", ")))
    };
    let label_at = index(label)?;
    let features: Vec<String> = if features.is_empty() {
        header.iter().filter(|h| *h != label).cloned().collect()
    } else {
        features.to_vec()
    };
    let feature_at: Vec<usize> = features
        .iter()
        .map(|f| index(f))
        .collect::<Result<_, _>>()?;

    let mut x = Vec::new();
    let mut labels = Vec::new();
    let mut rows = 0;
    for (i, record) in reader.records().enumerate() {
        let row = i + 2; // 1-based, after the header
        let record = record.map_err(|e| DataError::Malformed {
            row,
            message: e.to_string(),
        })?;
        for (&at, name) in feature_at.iter().zip(&features) {
            let text = record.get(at).unwrap_or("").trim();
            let value: f32 = text.parse().map_err(|_| DataError::NotANumber {
                row,
                column: name.clone(),
                value: text.to_string(),
            })?;
            x.push(value);
        }
        labels.push(record.get(label_at).unwrap_or("").trim().to_string());
        rows += 1;
    }
    if rows == 0 {
        return Err(DataError::Empty);
    }
    Ok(Dataset {
        target: target_of(&labels, label)?,
        features,
        label: label.to_string(),
        x,
        rows,
    })
}

fn target_of(labels: &[String], column: &str) -> Result<Target, DataError> {
    let integers = labels.iter().all(|l| l.parse::<i64>().is_ok());
    let numbers: Option<Vec<f32>> = labels.iter().map(|l| l.parse::<f32>().ok()).collect();
    let distinct: BTreeSet<&String> = labels.iter().collect();
    match numbers {
        Some(values) if !(integers && distinct.len() <= MAX_INTEGER_CLASSES) => {
            Ok(Target::Values(values))
        }
        _ => {
            if labels.iter().any(String::is_empty) {
                let row = labels.iter().position(String::is_empty).unwrap_or(0) + 2;
                return Err(DataError::Malformed {
                    row,
                    message: format!("the label {column} is empty"),
                });
            }
            let mut names: Vec<String> = distinct.into_iter().cloned().collect();
            if integers {
                names.sort_by_key(|n| n.parse::<i64>().unwrap_or(0));
            }
            let y = labels
                .iter()
                .map(|l| names.iter().position(|n| n == l).unwrap_or(0) as u32)
                .collect();
            Ok(Target::Classes { names, y })
        }
    }
}

/// Per-feature mean and standard deviation, frozen at training time (a constant
/// feature gets a deviation of 1, so scaling leaves it at 0).
#[derive(Debug, Clone, PartialEq)]
pub struct Standardizer {
    pub mean: Vec<f32>,
    pub std: Vec<f32>,
}

impl Standardizer {
    /// Computes the statistics of every feature over the whole table (in f64).
    pub fn fit(data: &Dataset) -> Standardizer {
        let d = data.features.len();
        let mut sum = vec![0f64; d];
        let mut sq = vec![0f64; d];
        for row in data.x.chunks(d.max(1)) {
            for (j, v) in row.iter().enumerate() {
                sum[j] += f64::from(*v);
                sq[j] += f64::from(*v) * f64::from(*v);
            }
        }
        let n = data.rows as f64;
        let mean: Vec<f64> = sum.iter().map(|s| s / n).collect();
        let std = sq
            .iter()
            .zip(&mean)
            .map(|(s, m)| {
                let var = (s / n - m * m).max(0.0);
                if var > 1e-12 {
                    var.sqrt() as f32
                } else {
                    1.0
                }
            })
            .collect();
        Standardizer {
            mean: mean.iter().map(|m| *m as f32).collect(),
            std,
        }
    }

    /// Scales row-major rows in place: `(x - mean) / std`.
    pub fn apply(&self, x: &mut [f32]) {
        let d = self.mean.len().max(1);
        for row in x.chunks_mut(d) {
            for (j, v) in row.iter_mut().enumerate() {
                *v = (*v - self.mean[j]) / self.std[j];
            }
        }
    }
}

/// The rows rank `rank` of `world` trains on: contiguous, sizes differing by at
/// most one, covering every row once.
pub fn partition(rows: usize, rank: usize, world: usize) -> Range<usize> {
    let world = world.max(1);
    let base = rows / world;
    let extra = rows % world;
    let start = rank * base + rank.min(extra);
    let len = base + usize::from(rank < extra);
    start.min(rows)..(start + len).min(rows)
}

#[cfg(test)]
mod tests {
    use super::*;

    const IRIS: &str = "sepal,petal,species\n5.1,1.4,setosa\n7.0,4.7,versicolor\n6.3,6.0,virginica\n4.9,1.4,setosa\n";

    #[test]
    fn a_csv_becomes_features_and_classes() {
        let data = read_csv(IRIS.as_bytes(), "species", &[]).expect("read");
        assert_eq!(data.features, vec!["sepal", "petal"]);
        assert_eq!(data.rows, 4);
        assert_eq!(data.x[..2], [5.1, 1.4]);
        match &data.target {
            Target::Classes { names, y } => {
                assert_eq!(names, &vec!["setosa", "versicolor", "virginica"]);
                assert_eq!(y, &vec![0, 1, 2, 0]);
            }
            other => panic!("expected classes, got {other:?}"),
        }
        let only = read_csv(IRIS.as_bytes(), "species", &["petal".into()]).expect("read");
        assert_eq!(only.x, vec![1.4, 4.7, 6.0, 1.4]);
    }

    #[test]
    fn numeric_labels_pick_the_task() {
        let reg = read_csv("a,y\n1,0.5\n2,1.5\n".as_bytes(), "y", &[]).expect("read");
        assert_eq!(reg.target, Target::Values(vec![0.5, 1.5]));
        let cls = read_csv("a,y\n1,10\n2,2\n3,10\n".as_bytes(), "y", &[]).expect("read");
        assert_eq!(
            cls.target,
            Target::Classes {
                names: vec!["2".into(), "10".into()],
                y: vec![1, 0, 1]
            },
            "integer classes sort numerically"
        );
    }

    #[test]
    fn bad_tables_name_the_problem() {
        let e = read_csv(IRIS.as_bytes(), "label", &[]).expect_err("no label");
        assert!(
            e.to_string().contains("column label is not in the CSV"),
            "{e}"
        );
        let e = read_csv("a,y\n1,x\nfoo,y\n".as_bytes(), "y", &[]).expect_err("text");
        assert_eq!(
            e,
            DataError::NotANumber {
                row: 3,
                column: "a".into(),
                value: "foo".into()
            }
        );
        assert_eq!(
            read_csv("a,y\n".as_bytes(), "y", &[]),
            Err(DataError::Empty)
        );
        let e = read_csv("a,y\n1,x\n2\n".as_bytes(), "y", &[]).expect_err("short row");
        assert!(matches!(e, DataError::Malformed { row: 3, .. }), "{e}");
    }

    #[test]
    fn standardised_features_have_zero_mean_and_unit_deviation() {
        let mut data =
            read_csv("a,b,y\n1,5,0\n2,5,1\n3,5,0\n4,5,1\n".as_bytes(), "y", &[]).expect("read");
        let s = Standardizer::fit(&data);
        assert_eq!(s.std[1], 1.0, "a constant feature keeps a deviation of 1");
        s.apply(&mut data.x);
        let a: Vec<f32> = data.x.chunks(2).map(|r| r[0]).collect();
        let mean: f32 = a.iter().sum::<f32>() / 4.0;
        let var: f32 = a.iter().map(|v| (v - mean) * (v - mean)).sum::<f32>() / 4.0;
        assert!(mean.abs() < 1e-6 && (var - 1.0).abs() < 1e-5, "{a:?}");
        assert!(data.x.chunks(2).all(|r| r[1] == 0.0));
    }

    #[test]
    fn partitions_cover_every_row_once() {
        for rows in [0, 1, 7, 100, 101] {
            for world in 1..=5 {
                let mut covered = Vec::new();
                for rank in 0..world {
                    let r = partition(rows, rank, world);
                    assert!(r.len() <= rows / world + 1);
                    covered.extend(r);
                }
                assert_eq!(
                    covered,
                    (0..rows).collect::<Vec<_>>(),
                    "{rows} rows, {world} ranks"
                );
            }
        }
    }
}
