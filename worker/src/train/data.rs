//! Training data: a CSV or Parquet table read into a dense feature matrix and a
//! target, standardisation statistics computed once over the whole table (so that
//! every shard scales its rows the same way), and each rank's share of the rows.
//!
//! Both formats are only a source of cells: [`read_csv`] and [`read_parquet`] hand
//! each row's cells (text, integer, real or null) to one `TableBuilder`, which
//! picks the columns, turns features into numbers and the labels into a target, so
//! both formats mean the same thing by the same table.
//!
//! The task follows the label column: text labels, or integer labels with at most
//! [`MAX_INTEGER_CLASSES`] distinct values, make a classification (classes in sorted
//! order, so every rank numbers them alike); any other numeric label a regression.
//! A Parquet integer or boolean label counts as an integer label, a float or double
//! one as a real (so a regression, even where every value is whole, just as a CSV
//! label written `1.0` is).

use std::borrow::Cow;
use std::collections::{BTreeMap, BTreeSet};
use std::io::Read;
use std::ops::Range;

use parquet::file::reader::{ChunkReader, FileReader, SerializedFileReader};
use parquet::record::Field;

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

/// Why a table could not be read. Rows are numbered as the source shows them: CSV
/// lines (the header is line 1), Parquet rows from 1.
#[derive(Debug, thiserror::Error, PartialEq)]
pub enum DataError {
    #[error("the CSV has no header row")]
    NoHeader,
    #[error("column {0} is not in the table (its columns: {1})")]
    MissingColumn(String, String),
    #[error("row {row}, column {column}: '{value}' is not a number")]
    NotANumber {
        row: usize,
        column: String,
        value: String,
    },
    #[error("row {row}, column {column}: {value} is not a finite number (NaN and infinities poison training)")]
    NotFinite {
        row: usize,
        column: String,
        value: String,
    },
    #[error("row {row}, column {column}: the value is missing (null)")]
    Null { row: usize, column: String },
    #[error("row {row}, column {column}: a {kind} value is neither a number nor text")]
    Unsupported {
        row: usize,
        column: String,
        kind: &'static str,
    },
    #[error("row {row}: {message}")]
    Malformed { row: usize, message: String },
    #[error("the Parquet file cannot be read: {0}")]
    Parquet(String),
    #[error("the table has no rows")]
    Empty,
    #[error("its columns ({0}) are not the first file's ({1})")]
    Columns(String, String),
    /// An error found after every file was read, in file `file` (counted from
    /// 0, in the order read) of a dataset of several.
    #[error("{error}")]
    InSource { file: usize, error: Box<DataError> },
}

/// One file of a dataset, in its format.
#[derive(Debug)]
pub enum Source {
    Csv(bytes::Bytes),
    Parquet(bytes::Bytes),
}

/// Reads the files of a dataset, in the order given, as one table: every file must
/// have the same columns (in any order); rows follow one another. `features`
/// empty means every column but the label. Each file is loaded as the iterator
/// comes to it (an error loading it ends the read), so only one file's bytes are
/// held at a time. With more than one file an error names the file.
pub fn read_tables<I>(files: I, label: &str, features: &[String]) -> Result<Dataset, String>
where
    I: IntoIterator<Item = Result<(String, Source), String>>,
    I::IntoIter: ExactSizeIterator,
{
    let files = files.into_iter();
    let many = files.len() > 1;
    let mut table = None;
    let mut names = Vec::with_capacity(files.len());
    for file in files {
        let (name, source) = file?;
        names.push(name.clone());
        let read = match source {
            Source::Csv(bytes) => csv_rows(bytes.as_ref(), &mut table, label, features),
            Source::Parquet(bytes) => parquet_rows(bytes, &mut table, label, features),
        };
        read.map_err(|e| {
            if many {
                format!("{name}: {e}")
            } else {
                e.to_string()
            }
        })?;
    }
    table
        .ok_or_else(|| "the dataset has no file".to_string())?
        .finish()
        .map_err(|e| match e {
            DataError::InSource { file, error } => match names.get(file) {
                Some(name) => format!("{name}: {error}"),
                None => error.to_string(),
            },
            other => other.to_string(),
        })
}

/// Starts the table with `header`, or goes on with the next source of it.
fn begin<'t>(
    table: &'t mut Option<TableBuilder>,
    header: &[String],
    label: &str,
    features: &[String],
    first_row: usize,
) -> Result<&'t mut TableBuilder, DataError> {
    match table {
        Some(t) => {
            t.next_source(header, first_row)?;
            Ok(t)
        }
        None => Ok(table.insert(TableBuilder::new(header, label, features, first_row)?)),
    }
}

/// Reads a CSV with a header; `features` empty means every column but the label.
pub fn read_csv(source: impl Read, label: &str, features: &[String]) -> Result<Dataset, DataError> {
    let mut table = None;
    csv_rows(source, &mut table, label, features)?;
    table.ok_or(DataError::NoHeader)?.finish()
}

/// Adds a CSV's rows to `table` (started from its header when there is none yet).
fn csv_rows(
    source: impl Read,
    table: &mut Option<TableBuilder>,
    label: &str,
    features: &[String],
) -> Result<(), DataError> {
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
    let table = begin(table, &header, label, features, 2)?;
    for record in reader.records() {
        let record = record.map_err(|e| DataError::Malformed {
            row: table.next_row(),
            message: e.to_string(),
        })?;
        table.push_row(|at| Cell::Text(record.get(at).unwrap_or("").trim()))?;
    }
    Ok(())
}

/// Reads a Parquet file (any compression the `parquet` crate was built with: snappy,
/// zstd) through its record API; `features` empty means every top-level column but
/// the label. Features may be integers, floats, doubles or booleans (0 and 1), or
/// text that reads as a number as in a CSV; labels any of those or text.
pub fn read_parquet<R: ChunkReader + 'static>(
    source: R,
    label: &str,
    features: &[String],
) -> Result<Dataset, DataError> {
    let mut table = None;
    parquet_rows(source, &mut table, label, features)?;
    table.ok_or(DataError::Empty)?.finish()
}

/// Adds a Parquet file's rows to `table` (started from its schema when there is
/// none yet).
fn parquet_rows<R: ChunkReader + 'static>(
    source: R,
    table: &mut Option<TableBuilder>,
    label: &str,
    features: &[String],
) -> Result<(), DataError> {
    let parquet = |e: parquet::errors::ParquetError| DataError::Parquet(e.to_string());
    let reader = SerializedFileReader::new(source).map_err(parquet)?;
    let header: Vec<String> = reader
        .metadata()
        .file_metadata()
        .schema_descr()
        .root_schema()
        .get_fields()
        .iter()
        .map(|f| f.name().to_string())
        .collect();
    let table = begin(table, &header, label, features, 1)?;
    for record in reader.get_row_iter(None).map_err(parquet)? {
        let record = record.map_err(|e| DataError::Malformed {
            row: table.next_row(),
            message: e.to_string(),
        })?;
        let columns = record.into_columns();
        table.push_row(|at| {
            columns
                .get(at)
                .map_or(Cell::Null, |(_, field)| parquet_cell(field))
        })?;
    }
    Ok(())
}

/// A Parquet value as a table cell.
fn parquet_cell(field: &Field) -> Cell<'_> {
    match field {
        Field::Null => Cell::Null,
        Field::Bool(b) => Cell::Integer(i64::from(*b)),
        Field::Byte(v) => Cell::Integer(i64::from(*v)),
        Field::Short(v) => Cell::Integer(i64::from(*v)),
        Field::Int(v) => Cell::Integer(i64::from(*v)),
        Field::Long(v) => Cell::Integer(*v),
        Field::UByte(v) => Cell::Integer(i64::from(*v)),
        Field::UShort(v) => Cell::Integer(i64::from(*v)),
        Field::UInt(v) => Cell::Integer(i64::from(*v)),
        Field::ULong(v) => i64::try_from(*v).map_or(Cell::Real(*v as f64), Cell::Integer),
        Field::Float16(v) => Cell::Real(f64::from(v.to_f32())),
        Field::Float(v) => Cell::Real(f64::from(*v)),
        Field::Double(v) => Cell::Real(*v),
        Field::Str(s) => Cell::Text(s.trim()),
        Field::Bytes(b) => b
            .as_utf8()
            .map_or(Cell::Unsupported("binary"), |s| Cell::Text(s.trim())),
        Field::Decimal(_) => Cell::Unsupported("decimal"),
        Field::Date(_) => Cell::Unsupported("date"),
        Field::TimeMillis(_)
        | Field::TimeMicros(_)
        | Field::TimestampMillis(_)
        | Field::TimestampMicros(_) => Cell::Unsupported("time"),
        Field::Group(_) => Cell::Unsupported("group"),
        Field::ListInternal(_) => Cell::Unsupported("list"),
        Field::MapInternal(_) => Cell::Unsupported("map"),
    }
}

/// One cell of a table as its format gives it.
#[derive(Debug, Clone, Copy, PartialEq)]
enum Cell<'a> {
    /// Text: every CSV cell, a Parquet string.
    Text(&'a str),
    Integer(i64),
    Real(f64),
    Null,
    /// A value kiln cannot train on, by kind.
    Unsupported(&'static str),
}

/// A label as read, kept until every row is in and the task is known.
#[derive(Debug, Clone, PartialEq)]
enum Label {
    Text(String),
    Integer(i64),
    Real(f64),
}

impl Label {
    fn integer(&self) -> Option<i64> {
        match self {
            Label::Text(s) => s.parse().ok(),
            Label::Integer(i) => Some(*i),
            Label::Real(_) => None,
        }
    }

    fn number(&self) -> Option<f32> {
        match self {
            Label::Text(s) => s.parse().ok(),
            Label::Integer(i) => Some(*i as f32),
            Label::Real(v) => Some(*v as f32),
        }
    }

    /// The class name: the text as written, or the number in decimal.
    fn name(&self) -> Cow<'_, str> {
        match self {
            Label::Text(s) => Cow::Borrowed(s),
            Label::Integer(i) => Cow::Owned(i.to_string()),
            Label::Real(v) => Cow::Owned(v.to_string()),
        }
    }
}

/// Turns rows of cells from any format into a [`Dataset`]: the one place that picks
/// columns, reads features as numbers and decides the task from the labels.
struct TableBuilder {
    label: String,
    label_at: usize,
    features: Vec<String>,
    feature_at: Vec<usize>,
    x: Vec<f32>,
    labels: Vec<Label>,
    /// The source's number for the first data row (see [`DataError`]).
    first_row: usize,
    /// Rows read from earlier sources.
    rows_before: usize,
    /// Each source's `rows_before` and `first_row`, in the order read, so that a
    /// row found wanting after the read is named in its own file's numbering.
    sources: Vec<(usize, usize)>,
    /// The first source's columns, sorted: every later source must have them.
    columns: Vec<String>,
}

impl TableBuilder {
    /// Finds the label and feature columns in `header`; `features` empty means every
    /// column but the label. The source numbers its first data row `first_row`.
    fn new(
        header: &[String],
        label: &str,
        features: &[String],
        first_row: usize,
    ) -> Result<Self, DataError> {
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
        let feature_at = features
            .iter()
            .map(|f| index(f))
            .collect::<Result<_, _>>()?;
        let mut columns = header.to_vec();
        columns.sort();
        Ok(TableBuilder {
            label: label.to_string(),
            label_at,
            features,
            feature_at,
            x: Vec::new(),
            labels: Vec::new(),
            first_row,
            rows_before: 0,
            sources: vec![(0, first_row)],
            columns,
        })
    }

    /// Goes on with the next source, whose columns must be the first one's (in
    /// any order).
    fn next_source(&mut self, header: &[String], first_row: usize) -> Result<(), DataError> {
        let mut columns = header.to_vec();
        columns.sort();
        if columns != self.columns {
            return Err(DataError::Columns(
                header.join(", "),
                self.columns.join(", "),
            ));
        }
        let at = |name: &str| header.iter().position(|h| h == name).unwrap_or(0);
        self.label_at = at(&self.label);
        self.feature_at = self.features.iter().map(|f| at(f)).collect();
        self.first_row = first_row;
        self.rows_before = self.labels.len();
        self.sources.push((self.rows_before, first_row));
        Ok(())
    }

    /// The error `error(row)` for the `i`th row read, in its source's numbering;
    /// wrapped with the source when there are several.
    fn at_row(&self, i: usize, error: impl FnOnce(usize) -> DataError) -> DataError {
        let source = self
            .sources
            .iter()
            .rposition(|&(before, _)| before <= i)
            .unwrap_or(0);
        let (before, first_row) = self.sources[source];
        let error = error(first_row + i - before);
        if self.sources.len() > 1 {
            DataError::InSource {
                file: source,
                error: Box::new(error),
            }
        } else {
            error
        }
    }

    /// The source's number for the row that comes next.
    fn next_row(&self) -> usize {
        self.first_row + self.labels.len() - self.rows_before
    }

    /// Adds the next row, whose cell in column `at` is `cell(at)`.
    fn push_row<'a>(&mut self, cell: impl Fn(usize) -> Cell<'a>) -> Result<(), DataError> {
        let row = self.next_row();
        for (&at, column) in self.feature_at.iter().zip(&self.features) {
            let value = match cell(at) {
                Cell::Text(text) => text.parse().map_err(|_| DataError::NotANumber {
                    row,
                    column: column.clone(),
                    value: text.to_string(),
                })?,
                Cell::Integer(v) => v as f32,
                Cell::Real(v) => v as f32,
                other => return Err(Self::unreadable(other, row, column)),
            };
            // Also a finite f64 beyond f32's range, which became an infinity.
            if !value.is_finite() {
                return Err(DataError::NotFinite {
                    row,
                    column: column.clone(),
                    value: match cell(at) {
                        Cell::Text(text) => text.to_string(),
                        Cell::Real(v) => v.to_string(),
                        _ => value.to_string(),
                    },
                });
            }
            self.x.push(value);
        }
        let label = match cell(self.label_at) {
            Cell::Text(text) => Label::Text(text.to_string()),
            Cell::Integer(v) => Label::Integer(v),
            Cell::Real(v) => Label::Real(v),
            other => return Err(Self::unreadable(other, row, &self.label)),
        };
        self.labels.push(label);
        Ok(())
    }

    /// The error for a null or unsupported cell.
    fn unreadable(cell: Cell<'_>, row: usize, column: &str) -> DataError {
        let column = column.to_string();
        match cell {
            Cell::Unsupported(kind) => DataError::Unsupported { row, column, kind },
            _ => DataError::Null { row, column },
        }
    }

    fn finish(self) -> Result<Dataset, DataError> {
        if self.labels.is_empty() {
            return Err(DataError::Empty);
        }
        Ok(Dataset {
            target: self.target()?,
            rows: self.labels.len(),
            features: self.features,
            label: self.label,
            x: self.x,
        })
    }

    /// Classes or values, as the module docs say.
    fn target(&self) -> Result<Target, DataError> {
        let labels = &self.labels;
        let integers = labels.iter().all(|l| l.integer().is_some());
        let numbers: Option<Vec<f32>> = labels.iter().map(Label::number).collect();
        let distinct: BTreeSet<Cow<'_, str>> = labels.iter().map(Label::name).collect();
        match numbers {
            Some(values) if !(integers && distinct.len() <= MAX_INTEGER_CLASSES) => {
                if let Some(i) = values.iter().position(|v| !v.is_finite()) {
                    return Err(self.at_row(i, |row| DataError::NotFinite {
                        row,
                        column: self.label.clone(),
                        value: labels[i].name().into_owned(),
                    }));
                }
                Ok(Target::Values(values))
            }
            _ => {
                if let Some(i) = labels.iter().position(|l| l.name().is_empty()) {
                    return Err(self.at_row(i, |row| DataError::Malformed {
                        row,
                        message: format!("the label {} is empty", self.label),
                    }));
                }
                let mut names: Vec<String> = distinct.into_iter().map(Cow::into_owned).collect();
                if integers {
                    names.sort_by_key(|n| n.parse::<i64>().unwrap_or(0));
                }
                let index: BTreeMap<&str, u32> = names
                    .iter()
                    .enumerate()
                    .map(|(i, n)| (n.as_str(), i as u32))
                    .collect();
                let y = labels
                    .iter()
                    .map(|l| index.get(l.name().as_ref()).copied().unwrap_or(0))
                    .collect();
                Ok(Target::Classes { names, y })
            }
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
    fn a_dataset_in_parts_reads_as_one_table() {
        const FIRST: &str = "sepal,petal,species\n5.1,1.4,setosa\n";
        // part-0.csv with FIRST, then part-1.csv with `second`.
        let parts = |second: &str| {
            [("part-0.csv", FIRST), ("part-1.csv", second)].map(|(name, text)| {
                Ok((
                    name.to_string(),
                    Source::Csv(bytes::Bytes::from(text.to_string())),
                ))
            })
        };
        // The second part has its columns in another order and a class of its own.
        let data = read_tables(
            parts("species,petal,sepal\nvirginica,6.0,6.3\nsetosa,1.4,4.9\n"),
            "species",
            &[],
        )
        .expect("read");
        assert_eq!(data.features, vec!["sepal", "petal"]);
        assert_eq!(data.rows, 3);
        assert_eq!(data.x, vec![5.1, 1.4, 6.3, 6.0, 4.9, 1.4]);
        assert_eq!(
            data.target,
            Target::Classes {
                names: vec!["setosa".into(), "virginica".into()],
                y: vec![0, 1, 0]
            }
        );
        // A part with other columns, or a bad value, is named with its own row.
        let err = read_tables(parts("sepal,species\n6.3,virginica\n"), "species", &[])
            .expect_err("columns differ");
        assert!(
            err.starts_with("part-1.csv: its columns (sepal, species) are not the first file's"),
            "{err}"
        );
        let err = read_tables(
            parts("sepal,petal,species\n6.3,x,virginica\n"),
            "species",
            &[],
        )
        .expect_err("not a number");
        assert_eq!(err, "part-1.csv: row 2, column petal: 'x' is not a number");
        // Rows found wanting after every part was read (the task is known only
        // then) are named in their own part's numbering too.
        let numbers = |second: &str| {
            [
                ("part-0.csv", "a,y\n1,0.5\n2,nan\n"),
                ("part-1.csv", second),
            ]
            .map(|(name, text)| {
                Ok((
                    name.to_string(),
                    Source::Csv(bytes::Bytes::from(text.to_string())),
                ))
            })
        };
        assert_eq!(
            read_tables(numbers("a,y\n3,1.5\n"), "y", &[]).expect_err("nan label"),
            "part-0.csv: row 3, column y: nan is not a finite number (NaN and infinities poison training)"
        );
        let err = read_tables(parts("sepal,petal,species\n6.3,6.0,\n"), "species", &[])
            .expect_err("empty label");
        assert_eq!(err, "part-1.csv: row 2: the label species is empty");
        // A part that cannot be loaded ends the read with its error.
        let [first, _] = parts(FIRST);
        let unreadable = [first, Err("read part-1.csv: permission denied".to_string())];
        assert_eq!(
            read_tables(unreadable, "species", &[]).expect_err("unreadable"),
            "read part-1.csv: permission denied"
        );
        // One file: the error is the file's own, as before.
        let one = [Ok((
            "data.csv".to_string(),
            Source::Csv(bytes::Bytes::from_static(b"a,y\n1,\n")),
        ))];
        assert!(!read_tables(one, "y", &[])
            .expect_err("empty label")
            .starts_with("data.csv"));
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
    fn non_finite_cells_are_refused_with_their_row_and_column() {
        for (csv, row, column, value) in [
            ("a,b,y\n1,2,0\n3,NaN,1\n", 3, "b", "NaN"),
            ("a,b,y\n1,inf,0\n", 2, "b", "inf"),
            ("a,b,y\n-infinity,2,0\n", 2, "a", "-infinity"),
            // Finite as text, an infinity as f32.
            ("a,b,y\n1,1e39,0\n", 2, "b", "1e39"),
            // A regression label.
            ("a,y\n1,0.5\n2,nan\n", 3, "y", "nan"),
        ] {
            let e = read_csv(csv.as_bytes(), "y", &[]).expect_err(csv);
            assert_eq!(
                e,
                DataError::NotFinite {
                    row,
                    column: column.into(),
                    value: value.into()
                },
                "{csv}"
            );
        }
    }

    #[test]
    fn bad_tables_name_the_problem() {
        let e = read_csv(IRIS.as_bytes(), "label", &[]).expect_err("no label");
        assert!(
            e.to_string().contains("column label is not in the table"),
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

    mod parquet_files {
        use super::super::*;
        use bytes::Bytes;
        use parquet::basic::{Compression, ZstdLevel};
        use parquet::data_type::{
            BoolType, ByteArray, ByteArrayType, DoubleType, FloatType, Int32Type, Int64Type,
        };
        use parquet::file::properties::WriterProperties;
        use parquet::file::writer::SerializedFileWriter;
        use parquet::schema::parser::parse_message_type;
        use std::sync::Arc;

        /// One column's values, in the order of the schema's fields.
        enum Column {
            Doubles(Vec<f64>),
            Floats(Vec<f32>),
            Ints(Vec<i32>),
            Longs(Vec<i64>),
            Bools(Vec<bool>),
            Strings(Vec<&'static str>),
            /// An `optional double`: `None` is a null.
            MaybeDoubles(Vec<Option<f64>>),
        }

        fn parquet(schema: &str, columns: Vec<Column>, compression: Compression) -> Bytes {
            let schema = Arc::new(parse_message_type(schema).expect("a schema"));
            let props = Arc::new(
                WriterProperties::builder()
                    .set_compression(compression)
                    .build(),
            );
            let mut out = Vec::new();
            let mut writer = SerializedFileWriter::new(&mut out, schema, props).expect("a writer");
            let mut group = writer.next_row_group().expect("a row group");
            for column in columns {
                let mut col = group
                    .next_column()
                    .expect("next column")
                    .expect("a column per schema field");
                match column {
                    Column::Doubles(v) => col.typed::<DoubleType>().write_batch(&v, None, None),
                    Column::Floats(v) => col.typed::<FloatType>().write_batch(&v, None, None),
                    Column::Ints(v) => col.typed::<Int32Type>().write_batch(&v, None, None),
                    Column::Longs(v) => col.typed::<Int64Type>().write_batch(&v, None, None),
                    Column::Bools(v) => col.typed::<BoolType>().write_batch(&v, None, None),
                    Column::Strings(v) => {
                        let v: Vec<ByteArray> = v.into_iter().map(ByteArray::from).collect();
                        col.typed::<ByteArrayType>().write_batch(&v, None, None)
                    }
                    Column::MaybeDoubles(v) => {
                        let defined: Vec<i16> = v.iter().map(|x| i16::from(x.is_some())).collect();
                        let values: Vec<f64> = v.iter().flatten().copied().collect();
                        col.typed::<DoubleType>()
                            .write_batch(&values, Some(&defined), None)
                    }
                }
                .expect("write a column");
                col.close().expect("close the column");
            }
            group.close().expect("close the row group");
            writer.close().expect("close the file");
            Bytes::from(out)
        }

        const IRIS_SCHEMA: &str = "message iris {
            required double sepal;
            required float petal;
            required int32 leaves;
            required boolean wild;
            required binary species (UTF8);
        }";

        fn iris(compression: Compression) -> Bytes {
            parquet(
                IRIS_SCHEMA,
                vec![
                    Column::Doubles(vec![5.1, 7.0, 6.3, 4.9]),
                    Column::Floats(vec![1.4, 4.7, 6.0, 1.4]),
                    Column::Ints(vec![3, 5, -2, 0]),
                    Column::Bools(vec![true, false, false, true]),
                    Column::Strings(vec!["setosa", "versicolor", "virginica", " setosa "]),
                ],
                compression,
            )
        }

        const IRIS_CSV: &str = "sepal,petal,leaves,wild,species\n\
            5.1,1.4,3,1,setosa\n7.0,4.7,5,0,versicolor\n6.3,6.0,-2,0,virginica\n4.9,1.4,0,1, setosa \n";

        #[test]
        fn a_string_label_reads_as_the_same_classes_as_the_csv() {
            let from_csv = read_csv(IRIS_CSV.as_bytes(), "species", &[]).expect("csv");
            let from_parquet =
                read_parquet(iris(Compression::UNCOMPRESSED), "species", &[]).expect("parquet");
            assert_eq!(from_parquet, from_csv);
            assert_eq!(
                from_parquet.features,
                vec!["sepal", "petal", "leaves", "wild"]
            );
            assert!(
                matches!(from_parquet.target, Target::Classes { ref names, .. } if names.len() == 3)
            );

            let some = vec!["wild".to_string(), "sepal".to_string()];
            assert_eq!(
                read_parquet(iris(Compression::UNCOMPRESSED), "species", &some).expect("parquet"),
                read_csv(IRIS_CSV.as_bytes(), "species", &some).expect("csv"),
            );
        }

        #[test]
        fn parquet_parts_read_as_one_table() {
            let parts = ["a.parquet", "b.parquet"]
                .map(|name| Ok((name.to_string(), Source::Parquet(iris(Compression::SNAPPY)))));
            let data = read_tables(parts, "species", &[]).expect("read");
            let one = read_parquet(iris(Compression::SNAPPY), "species", &[]).expect("read");
            assert_eq!(data.rows, 2 * one.rows);
            assert_eq!(data.x[..one.x.len()], one.x[..]);
            assert_eq!(data.x[one.x.len()..], one.x[..]);
        }

        #[test]
        fn every_compression_reads_the_same() {
            let plain =
                read_parquet(iris(Compression::UNCOMPRESSED), "species", &[]).expect("plain");
            for compression in [Compression::SNAPPY, Compression::ZSTD(ZstdLevel::default())] {
                let bytes = iris(compression);
                assert_eq!(
                    read_parquet(bytes, "species", &[]).expect("compressed"),
                    plain,
                    "{compression:?}"
                );
            }
        }

        #[test]
        fn a_double_label_is_a_regression_even_when_whole() {
            let schema = "message m { required int64 a; required double b; required double y; }";
            let bytes = parquet(
                schema,
                vec![
                    Column::Longs(vec![1, 2, 3]),
                    Column::Doubles(vec![0.25, -1.5, 1e3]),
                    Column::Doubles(vec![1.0, 2.0, 2.0]),
                ],
                Compression::SNAPPY,
            );
            let from_parquet = read_parquet(bytes, "y", &[]).expect("parquet");
            let csv = "a,b,y\n1,0.25,1.0\n2,-1.5,2.0\n3,1000,2.0\n";
            assert_eq!(
                from_parquet,
                read_csv(csv.as_bytes(), "y", &[]).expect("csv")
            );
            assert_eq!(from_parquet.target, Target::Values(vec![1.0, 2.0, 2.0]));
        }

        #[test]
        fn an_integer_label_is_classes_in_numeric_order() {
            let schema = "message m { required double a; required int32 y; }";
            let bytes = parquet(
                schema,
                vec![
                    Column::Doubles(vec![1.0, 2.0, 3.0]),
                    Column::Ints(vec![10, 2, 10]),
                ],
                Compression::SNAPPY,
            );
            let from_parquet = read_parquet(bytes, "y", &[]).expect("parquet");
            assert_eq!(
                from_parquet,
                read_csv("a,y\n1,10\n2,2\n3,10\n".as_bytes(), "y", &[]).expect("csv")
            );
            assert_eq!(
                from_parquet.target,
                Target::Classes {
                    names: vec!["2".into(), "10".into()],
                    y: vec![1, 0, 1]
                }
            );
        }

        #[test]
        fn missing_columns_nulls_and_odd_types_are_named() {
            let e = read_parquet(iris(Compression::SNAPPY), "label", &[]).expect_err("no label");
            assert_eq!(
                e.to_string(),
                "column label is not in the table (its columns: sepal, petal, leaves, wild, species)"
            );
            let e = read_parquet(iris(Compression::SNAPPY), "species", &["stem".into()])
                .expect_err("no feature");
            assert!(
                matches!(e, DataError::MissingColumn(ref c, _) if c == "stem"),
                "{e}"
            );

            let schema = "message m { optional double a; required double y; }";
            let bytes = parquet(
                schema,
                vec![
                    Column::MaybeDoubles(vec![Some(1.0), None, Some(3.0)]),
                    Column::Doubles(vec![0.5, 1.5, 2.5]),
                ],
                Compression::SNAPPY,
            );
            let e = read_parquet(bytes, "y", &[]).expect_err("a null feature");
            assert_eq!(
                e,
                DataError::Null {
                    row: 2,
                    column: "a".into()
                }
            );
            assert_eq!(
                e.to_string(),
                "row 2, column a: the value is missing (null)"
            );

            let schema = "message m { required double a; optional double y; }";
            let bytes = parquet(
                schema,
                vec![
                    Column::Doubles(vec![1.0, 2.0, 3.0]),
                    Column::MaybeDoubles(vec![Some(1.0), Some(2.0), None]),
                ],
                Compression::UNCOMPRESSED,
            );
            assert_eq!(
                read_parquet(bytes, "y", &[]),
                Err(DataError::Null {
                    row: 3,
                    column: "y".into()
                })
            );

            let schema = "message m { required int32 day (DATE); required double y; }";
            let bytes = parquet(
                schema,
                vec![Column::Ints(vec![19000]), Column::Doubles(vec![1.0])],
                Compression::UNCOMPRESSED,
            );
            assert_eq!(
                read_parquet(bytes, "y", &[]).map_err(|e| e.to_string()),
                Err("row 1, column day: a date value is neither a number nor text".into())
            );

            let e = read_parquet(Bytes::from_static(b"not parquet"), "y", &[]).expect_err("junk");
            assert!(matches!(e, DataError::Parquet(_)), "{e}");
        }

        #[test]
        fn text_that_is_not_a_number_is_named_as_in_a_csv() {
            let schema = "message m { required binary a (UTF8); required binary y (UTF8); }";
            let bytes = parquet(
                schema,
                vec![
                    Column::Strings(vec!["1", "foo"]),
                    Column::Strings(vec!["x", "y"]),
                ],
                Compression::UNCOMPRESSED,
            );
            assert_eq!(
                read_parquet(bytes, "y", &[]),
                Err(DataError::NotANumber {
                    row: 2,
                    column: "a".into(),
                    value: "foo".into()
                })
            );
        }
    }
}
