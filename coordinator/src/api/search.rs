//! MLflow's search semantics for the MLflow-compatible REST API: the `filter`
//! string, the `order_by` list and the page token of runs/search,
//! experiments/search, registered-models/search, model-versions/search and
//! logged-models/search. Pure logic: text in, a [`Filter`] or [`OrderKey`]s out;
//! the caller supplies the records through [`Searchable`] and maps every `Err`
//! message to `INVALID_PARAMETER_VALUE`.
//!
//! The filter grammar (keywords case-insensitive, as in `mlflow/utils/search_utils.py`):
//!
//! ```text
//! filter     := "" | clause ("AND" clause)*           -- OR is refused
//! clause     := entity comparator value
//! entity     := [prefix "."] key                       -- no prefix: an attribute
//! prefix     := metric(s) | param(s) | parameter(s) | tag(s)
//!             | attribute(s) | attr | run | dataset(s)
//! key        := bare-word | "quoted" | `quoted`        -- quoted keys may hold spaces, dots
//! comparator := = | != | > | >= | < | <= | LIKE | ILIKE | IN | NOT IN | IS NULL | IS NOT NULL
//! value      := number | 'text' | "text" | "(" 'text' ("," 'text')* ")"
//! ```
//!
//! What each entity accepts is a [`Scope`], one per searched thing: metrics and
//! numeric attributes take numbers and `= != > >= < <=`; params and tags take
//! quoted strings and `= != LIKE ILIKE IS NULL IS NOT NULL`; string attributes
//! take quoted strings and `= != LIKE ILIKE`, plus `IN`/`NOT IN` where the scope
//! lists them; dataset fields take quoted strings, `IN` and `NOT IN` too. A whole
//! quoted entity such as `` `tags.x` `` is split at a known prefix.
//!
//! Evaluation follows SQL: a missing value matches only `IS NULL` (so `!=` does
//! not match it), and NaN matches nothing. Ordering puts NaN after numbers and
//! missing values after everything, whichever the direction, as MLflow's SQL
//! store does. Every input is bounded (`MAX_*` below).

use std::cmp::Ordering;
use std::fmt;

use Comparator as C;

/// Longest filter accepted, in bytes.
pub const MAX_FILTER_BYTES: usize = 4096;
/// Most `AND`-joined clauses in one filter.
pub const MAX_CLAUSES: usize = 100;
/// Most values in one `IN` or `NOT IN` list.
pub const MAX_IN_VALUES: usize = 1000;
/// Most `order_by` keys in one request.
pub const MAX_ORDER_KEYS: usize = 10;
/// Longest single `order_by` key accepted, in bytes.
pub const MAX_ORDER_KEY_BYTES: usize = 1024;
/// Most decimal digits a page token may hold (a `u64` has at most 20).
const MAX_PAGE_TOKEN_DIGITS: usize = 20;

/// A searchable field, named as the caller's lookup receives it.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub enum Field {
    /// A metric's latest value, by key.
    Metric(String),
    /// A param, by key.
    Param(String),
    /// A tag, by key (`mlflow.runName` included).
    Tag(String),
    /// An attribute such as `status` or `start_time`, exactly as written.
    Attribute(String),
    /// A dataset field: `name`, `digest` or `context`.
    Dataset(String),
}

/// A field's value in one record.
#[derive(Debug, Clone, PartialEq)]
pub enum Value {
    /// A metric or a numeric attribute (timestamps in milliseconds).
    Number(f64),
    /// Anything compared as text.
    Text(String),
}

/// A record the search runs over; the caller implements it for runs,
/// experiments, models and versions.
pub trait Searchable {
    /// Returns the field's value, or `None` when the record lacks it.
    fn value(&self, field: &Field) -> Option<Value>;

    /// Returns every value of the field; a clause matches when any of them does.
    /// Records with several datasets override this for [`Field::Dataset`].
    fn values(&self, field: &Field) -> Vec<Value> {
        self.value(field).into_iter().collect()
    }
}

/// What one kind of search accepts: its attributes and which prefixes apply.
#[derive(Debug, Clone, Copy)]
pub struct Scope {
    /// What is searched, for error messages ("runs").
    pub entity: &'static str,
    /// Attributes compared as quoted strings.
    pub text_attributes: &'static [&'static str],
    /// Attributes compared as numbers.
    pub numeric_attributes: &'static [&'static str],
    /// Text attributes that also take `IN` and `NOT IN`.
    pub list_attributes: &'static [&'static str],
    /// Dataset fields (`datasets.name`); empty when datasets are not searchable.
    pub dataset_fields: &'static [&'static str],
    /// Whether `metrics.` applies.
    pub metrics: bool,
    /// Whether `params.` applies.
    pub params: bool,
    /// Whether `tags.` applies.
    pub tags: bool,
}

impl Scope {
    /// A scope with nothing searchable, the base of the others.
    const NOTHING: Scope = Scope {
        entity: "",
        text_attributes: &[],
        numeric_attributes: &[],
        list_attributes: &[],
        dataset_fields: &[],
        metrics: false,
        params: false,
        tags: false,
    };

    /// Returns the scope of runs/search.
    pub fn runs() -> Self {
        Scope {
            entity: "runs",
            text_attributes: &[
                "run_id",
                "run_name",
                "status",
                "user_id",
                "artifact_uri",
                "lifecycle_stage",
            ],
            numeric_attributes: &["start_time", "end_time", "created"],
            list_attributes: &["run_id"],
            dataset_fields: &["name", "digest", "context"],
            metrics: true,
            params: true,
            tags: true,
        }
    }

    /// Returns the scope of experiments/search.
    pub fn experiments() -> Self {
        Scope {
            entity: "experiments",
            text_attributes: &["name", "experiment_id", "lifecycle_stage"],
            numeric_attributes: &["creation_time", "last_update_time"],
            list_attributes: &["experiment_id"],
            tags: true,
            ..Self::NOTHING
        }
    }

    /// Returns the scope of registered-models/search.
    pub fn registered_models() -> Self {
        Scope {
            entity: "registered models",
            text_attributes: &["name"],
            numeric_attributes: &["creation_timestamp", "last_updated_timestamp"],
            tags: true,
            ..Self::NOTHING
        }
    }

    /// Returns the scope of model-versions/search; `version_number` is numeric,
    /// as in MLflow.
    pub fn model_versions() -> Self {
        Scope {
            entity: "model versions",
            text_attributes: &[
                "name",
                "run_id",
                "source_path",
                "source",
                "current_stage",
                "model_id",
            ],
            numeric_attributes: &[
                "version_number",
                "creation_timestamp",
                "last_updated_timestamp",
            ],
            list_attributes: &["run_id"],
            tags: true,
            ..Self::NOTHING
        }
    }

    /// Returns the scope of logged-models/search.
    pub fn logged_models() -> Self {
        Scope {
            entity: "logged models",
            text_attributes: &["name", "model_id", "source_run_id", "status"],
            numeric_attributes: &[
                "creation_timestamp",
                "creation_time",
                "last_updated_timestamp",
            ],
            metrics: true,
            params: true,
            tags: true,
            ..Self::NOTHING
        }
    }

    /// Returns the error for an attribute this scope lacks, listing those it has.
    fn unknown_attribute(&self, name: &str) -> String {
        let allowed: Vec<&str> = self
            .text_attributes
            .iter()
            .chain(self.numeric_attributes)
            .copied()
            .collect();
        format!(
            "unknown attribute '{name}' for {}; allowed: {}",
            self.entity,
            allowed.join(", ")
        )
    }
}

/// A comparison a clause makes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Comparator {
    Eq,
    Ne,
    Gt,
    Ge,
    Lt,
    Le,
    Like,
    ILike,
    In,
    NotIn,
    IsNull,
    IsNotNull,
}

impl fmt::Display for Comparator {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        use Comparator::*;
        let text = match self {
            Eq => "=",
            Ne => "!=",
            Gt => ">",
            Ge => ">=",
            Lt => "<",
            Le => "<=",
            Like => "LIKE",
            ILike => "ILIKE",
            In => "IN",
            NotIn => "NOT IN",
            IsNull => "IS NULL",
            IsNotNull => "IS NOT NULL",
        };
        f.write_str(text)
    }
}

/// The right-hand side of a clause, already checked against its field.
#[derive(Debug, Clone, PartialEq)]
pub enum Operand {
    /// For `IS NULL` and `IS NOT NULL`.
    None,
    Number(f64),
    Text(String),
    /// For `IN` and `NOT IN`.
    List(Vec<String>),
}

/// One `entity comparator value` clause.
#[derive(Debug, Clone, PartialEq)]
pub struct Clause {
    pub field: Field,
    pub comparator: Comparator,
    pub operand: Operand,
}

impl Clause {
    /// Returns whether the record satisfies this clause (SQL semantics: a
    /// missing value satisfies only `IS NULL`).
    pub fn matches(&self, item: &dyn Searchable) -> bool {
        let values = item.values(&self.field);
        match self.comparator {
            Comparator::IsNull => values.is_empty(),
            Comparator::IsNotNull => !values.is_empty(),
            _ => values.iter().any(|v| self.holds_for(v)),
        }
    }

    /// Returns whether one present value satisfies the comparison.
    fn holds_for(&self, value: &Value) -> bool {
        match (&self.operand, value) {
            (Operand::Number(want), Value::Number(have)) => {
                numbers_hold(self.comparator, *have, *want)
            }
            (Operand::Text(want), Value::Text(have)) => texts_hold(self.comparator, have, want),
            (Operand::List(list), Value::Text(have)) => {
                let listed = list.iter().any(|w| w == have);
                listed == (self.comparator == Comparator::In)
            }
            _ => false,
        }
    }
}

/// Returns the numeric comparison's result; NaN on either side gives `false`.
fn numbers_hold(comparator: Comparator, have: f64, want: f64) -> bool {
    let Some(ord) = have.partial_cmp(&want) else {
        return false;
    };
    match comparator {
        Comparator::Eq => ord == Ordering::Equal,
        Comparator::Ne => ord != Ordering::Equal,
        Comparator::Gt => ord == Ordering::Greater,
        Comparator::Ge => ord != Ordering::Less,
        Comparator::Lt => ord == Ordering::Less,
        Comparator::Le => ord != Ordering::Greater,
        _ => false,
    }
}

/// Returns the text comparison's result.
fn texts_hold(comparator: Comparator, have: &str, want: &str) -> bool {
    match comparator {
        Comparator::Eq => have == want,
        Comparator::Ne => have != want,
        Comparator::Like => like(have, want, false),
        Comparator::ILike => like(have, want, true),
        _ => false,
    }
}

/// Returns whether `text` matches the SQL LIKE `pattern` (`%` any run, `_` one
/// character), folding case when `fold` is set. Backtracks to the last `%`
/// only, so it runs in O(text × pattern) at worst.
fn like(text: &str, pattern: &str, fold: bool) -> bool {
    let prepare = |s: &str| -> Vec<char> {
        if fold {
            s.to_lowercase().chars().collect()
        } else {
            s.chars().collect()
        }
    };
    let (text, pattern) = (prepare(text), prepare(pattern));
    let (mut ti, mut pi) = (0, 0);
    let mut resume: Option<(usize, usize)> = None;
    while let Some(&c) = text.get(ti) {
        match pattern.get(pi) {
            Some('%') => {
                pi += 1;
                resume = Some((pi, ti));
            }
            Some(&p) if p == '_' || p == c => {
                pi += 1;
                ti += 1;
            }
            _ => match resume {
                Some((after_percent, from)) => {
                    pi = after_percent;
                    ti = from + 1;
                    resume = Some((after_percent, from + 1));
                }
                None => return false,
            },
        }
    }
    pattern
        .get(pi..)
        .is_some_and(|rest| rest.iter().all(|&p| p == '%'))
}

/// A parsed filter: clauses that must all hold.
#[derive(Debug, Clone, PartialEq, Default)]
pub struct Filter {
    clauses: Vec<Clause>,
}

impl Filter {
    /// Parses `text` under `scope`; an empty or blank filter matches everything.
    pub fn parse(text: &str, scope: &Scope) -> Result<Filter, String> {
        if text.len() > MAX_FILTER_BYTES {
            return Err(format!(
                "filter is {} bytes; the most accepted is {MAX_FILTER_BYTES}",
                text.len()
            ));
        }
        let mut parser = Parser::new(text, scope)?;
        let clauses = parser.filter()?;
        Ok(Filter { clauses })
    }

    /// Returns the clauses, for callers that narrow a scan with them.
    pub fn clauses(&self) -> &[Clause] {
        &self.clauses
    }

    /// Returns whether the record satisfies every clause.
    pub fn matches(&self, item: &dyn Searchable) -> bool {
        self.clauses.iter().all(|c| c.matches(item))
    }
}

/// One `order_by` key.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct OrderKey {
    pub field: Field,
    pub ascending: bool,
}

/// Parses `order_by` strings such as `metrics.rmse DESC` or `name` under
/// `scope`; a key without a direction is ascending.
pub fn parse_order_by<S: AsRef<str>>(keys: &[S], scope: &Scope) -> Result<Vec<OrderKey>, String> {
    if keys.len() > MAX_ORDER_KEYS {
        return Err(format!(
            "order_by has {} keys; the most accepted is {MAX_ORDER_KEYS}",
            keys.len()
        ));
    }
    keys.iter().map(|k| order_key(k.as_ref(), scope)).collect()
}

/// Parses one `order_by` key.
fn order_key(text: &str, scope: &Scope) -> Result<OrderKey, String> {
    if text.len() > MAX_ORDER_KEY_BYTES {
        return Err(format!(
            "order_by key is {} bytes; the most accepted is {MAX_ORDER_KEY_BYTES}",
            text.len()
        ));
    }
    let mut parser = Parser::new(text, scope)?;
    if parser.peek().is_none() {
        return Err("order_by key is empty".to_string());
    }
    let field = parser.entity()?;
    if let Field::Dataset(_) = field {
        return Err(format!("order_by '{text}': datasets cannot order results"));
    }
    parser.check_field(&field, &parser.span_text(0, parser.pos))?;
    let ascending = match parser.next_word() {
        None => true,
        Some(w) if w.eq_ignore_ascii_case("asc") => true,
        Some(w) if w.eq_ignore_ascii_case("desc") => false,
        Some(w) => {
            return Err(format!(
                "order_by '{text}': expected ASC or DESC after the name, found '{w}'"
            ))
        }
    };
    if let Some(extra) = parser.peek() {
        let extra = parser.token_text(extra);
        return Err(format!(
            "order_by '{text}': unexpected '{extra}' at the end"
        ));
    }
    Ok(OrderKey { field, ascending })
}

/// Orders two records by `keys`; missing values sort last and NaN just before
/// them, whichever the direction. Equal records give `Equal`: the caller adds
/// its own tiebreak.
pub fn compare(a: &dyn Searchable, b: &dyn Searchable, keys: &[OrderKey]) -> Ordering {
    keys.iter()
        .map(|k| compare_values(a.value(&k.field), b.value(&k.field), k.ascending))
        .find(|o| o.is_ne())
        .unwrap_or(Ordering::Equal)
}

/// Orders two values of one key.
fn compare_values(a: Option<Value>, b: Option<Value>, ascending: bool) -> Ordering {
    let (ra, rb) = (null_rank(&a), null_rank(&b));
    if ra != rb || ra != 0 {
        return ra.cmp(&rb);
    }
    let ord = match (&a, &b) {
        (Some(Value::Number(x)), Some(Value::Number(y))) => {
            x.partial_cmp(y).unwrap_or(Ordering::Equal)
        }
        (Some(Value::Text(x)), Some(Value::Text(y))) => x.cmp(y),
        (Some(Value::Number(_)), Some(Value::Text(_))) => Ordering::Less,
        (Some(Value::Text(_)), Some(Value::Number(_))) => Ordering::Greater,
        _ => Ordering::Equal,
    };
    if ascending {
        ord
    } else {
        ord.reverse()
    }
}

/// Returns 0 for an ordinary value, 1 for NaN, 2 for a missing one.
fn null_rank(v: &Option<Value>) -> u8 {
    match v {
        None => 2,
        Some(Value::Number(x)) if x.is_nan() => 1,
        Some(_) => 0,
    }
}

/// Returns the page token that resumes a listing at `offset`.
pub fn page_token(offset: usize) -> String {
    offset.to_string()
}

/// Parses a page token this server issued; an empty token starts at 0.
pub fn parse_page_token(token: &str) -> Result<usize, String> {
    if token.is_empty() {
        return Ok(0);
    }
    let well_formed =
        token.len() <= MAX_PAGE_TOKEN_DIGITS && token.bytes().all(|b| b.is_ascii_digit());
    let offset = well_formed.then(|| token.parse::<usize>().ok()).flatten();
    offset.ok_or_else(|| {
        let shown: String = token.chars().take(40).collect();
        format!("invalid page_token '{shown}': not a token this server issued")
    })
}

/// Returns at most `max` items from `offset`, and the next page's token when
/// items remain after them. A `max` of 0 returns nothing and no token.
pub fn page<T>(items: Vec<T>, offset: usize, max: usize) -> (Vec<T>, Option<String>) {
    let total = items.len();
    let end = offset.saturating_add(max);
    let next = (max > 0 && end < total).then(|| page_token(end));
    (items.into_iter().skip(offset).take(max).collect(), next)
}

/// A lexical token's kind.
#[derive(Debug, Clone, PartialEq)]
enum Tok {
    /// A bare run of characters: a key, a number or a keyword.
    Word(String),
    /// Text in quotes; `quote` is `'`, `"` or `` ` ``.
    Quoted {
        quote: char,
        text: String,
    },
    /// `=`, `!=`, `>`, `>=`, `<`, `<=`.
    Op(Comparator),
    Open,
    Close,
    Comma,
}

/// A token and the byte range of the input it came from.
#[derive(Debug, Clone)]
struct Token {
    tok: Tok,
    start: usize,
    end: usize,
}

/// Characters that end a bare word.
fn ends_word(c: char) -> bool {
    c.is_whitespace() || "=!<>(),'\"`".contains(c)
}

/// Splits `src` into tokens.
fn tokenize(src: &str) -> Result<Vec<Token>, String> {
    let mut tokens = Vec::new();
    let mut chars = src.char_indices().peekable();
    while let Some(&(start, c)) = chars.peek() {
        if c.is_whitespace() {
            chars.next();
            continue;
        }
        chars.next();
        let tok = match c {
            '(' => Tok::Open,
            ')' => Tok::Close,
            ',' => Tok::Comma,
            '\'' | '"' | '`' => Tok::Quoted {
                quote: c,
                text: quoted(&mut chars, c, start)?,
            },
            '=' => Tok::Op(Comparator::Eq),
            '!' | '>' | '<' => {
                let eq = chars.next_if(|&(_, n)| n == '=').is_some();
                Tok::Op(match (c, eq) {
                    ('!', true) => Comparator::Ne,
                    ('>', false) => Comparator::Gt,
                    ('>', true) => Comparator::Ge,
                    ('<', false) => Comparator::Lt,
                    ('<', true) => Comparator::Le,
                    _ => return Err(format!("'!' at byte {start} must be followed by '='")),
                })
            }
            _ => {
                let mut word = c.to_string();
                while let Some((_, n)) = chars.next_if(|&(_, n)| !ends_word(n)) {
                    word.push(n);
                }
                Tok::Word(word)
            }
        };
        let end = chars.peek().map_or(src.len(), |&(i, _)| i);
        tokens.push(Token { tok, start, end });
    }
    Ok(tokens)
}

/// Reads quoted text after its opening `quote`; a backslash escapes the next
/// character and a doubled quote stands for one.
fn quoted(
    chars: &mut std::iter::Peekable<std::str::CharIndices<'_>>,
    quote: char,
    start: usize,
) -> Result<String, String> {
    let mut text = String::new();
    loop {
        match chars.next() {
            None => {
                return Err(format!(
                    "unterminated {quote} quote starting at byte {start}"
                ))
            }
            Some((_, '\\')) => match chars.next() {
                Some((_, escaped)) => text.push(escaped),
                None => {
                    return Err(format!(
                        "unterminated {quote} quote starting at byte {start}"
                    ))
                }
            },
            Some((_, c)) if c == quote => {
                if chars.next_if(|&(_, n)| n == quote).is_none() {
                    return Ok(text);
                }
                text.push(quote);
            }
            Some((_, c)) => text.push(c),
        }
    }
}

/// The kind a prefix names.
#[derive(Debug, Clone, Copy)]
enum Kind {
    Metric,
    Param,
    Tag,
    Attribute,
    Dataset,
}

/// Returns the kind a prefix such as `metrics` names, ignoring case.
fn prefix_kind(prefix: &str) -> Option<Kind> {
    let kind = match prefix.to_ascii_lowercase().as_str() {
        "metric" | "metrics" => Kind::Metric,
        "param" | "params" | "parameter" | "parameters" => Kind::Param,
        "tag" | "tags" => Kind::Tag,
        "attribute" | "attributes" | "attr" | "run" => Kind::Attribute,
        "dataset" | "datasets" => Kind::Dataset,
        _ => return None,
    };
    Some(kind)
}

/// Returns the field of `kind` named `key`.
fn field(kind: Kind, key: String) -> Field {
    match kind {
        Kind::Metric => Field::Metric(key),
        Kind::Param => Field::Param(key),
        Kind::Tag => Field::Tag(key),
        Kind::Attribute => Field::Attribute(key),
        Kind::Dataset => Field::Dataset(key),
    }
}

/// Splits `name` at a known prefix; without one, the whole name is an attribute.
fn split_prefix(name: &str) -> (Kind, &str) {
    match name.split_once('.') {
        Some((prefix, key)) => match prefix_kind(prefix) {
            Some(kind) => (kind, key),
            None => (Kind::Attribute, name),
        },
        None => (Kind::Attribute, name),
    }
}

/// What a field accepts.
struct Rule {
    noun: &'static str,
    numeric: bool,
    comparators: &'static [Comparator],
}

const NUMERIC_OPS: &[Comparator] = &[C::Eq, C::Ne, C::Gt, C::Ge, C::Lt, C::Le];
const TEXT_OPS: &[Comparator] = &[C::Eq, C::Ne, C::Like, C::ILike];
const NULLABLE_OPS: &[Comparator] = &[C::Eq, C::Ne, C::Like, C::ILike, C::IsNull, C::IsNotNull];
const LIST_OPS: &[Comparator] = &[C::Eq, C::Ne, C::Like, C::ILike, C::In, C::NotIn];

impl Rule {
    const fn new(noun: &'static str, numeric: bool, comparators: &'static [Comparator]) -> Self {
        Rule {
            noun,
            numeric,
            comparators,
        }
    }
}

/// A value as written, before it is checked against its field.
enum Scalar {
    Number(f64),
    Text(String),
    /// A bare word that is not a number, or a backticked name.
    Other,
}

/// Returns the finite number a bare word spells, if it spells one.
fn number(word: &str) -> Option<f64> {
    let plausible = word.bytes().any(|b| b.is_ascii_digit())
        && word
            .bytes()
            .all(|b| b.is_ascii_digit() || b"+-.eE".contains(&b));
    let value = plausible.then(|| word.parse::<f64>().ok()).flatten()?;
    value.is_finite().then_some(value)
}

/// A recursive-descent parser over one filter's or order key's tokens.
struct Parser<'a> {
    src: &'a str,
    tokens: Vec<Token>,
    pos: usize,
    scope: &'a Scope,
}

impl<'a> Parser<'a> {
    fn new(src: &'a str, scope: &'a Scope) -> Result<Self, String> {
        Ok(Parser {
            src,
            tokens: tokenize(src)?,
            pos: 0,
            scope,
        })
    }

    fn peek(&self) -> Option<&Token> {
        self.tokens.get(self.pos)
    }

    fn advance(&mut self) -> Option<Token> {
        let token = self.tokens.get(self.pos).cloned();
        self.pos += usize::from(token.is_some());
        token
    }

    /// Consumes and returns the next token if it is a bare word.
    fn next_word(&mut self) -> Option<String> {
        match self.peek().map(|t| &t.tok) {
            Some(Tok::Word(w)) => {
                let w = w.clone();
                self.pos += 1;
                Some(w)
            }
            _ => None,
        }
    }

    /// Consumes the next token if it is the keyword `kw`.
    fn keyword(&mut self, kw: &str) -> bool {
        let found =
            matches!(self.peek().map(|t| &t.tok), Some(Tok::Word(w)) if w.eq_ignore_ascii_case(kw));
        self.pos += usize::from(found);
        found
    }

    fn token_text(&self, token: &Token) -> String {
        self.src
            .get(token.start..token.end)
            .unwrap_or("?")
            .to_string()
    }

    /// Returns the source text of tokens `from..to`.
    fn span_text(&self, from: usize, to: usize) -> String {
        let start = self.tokens.get(from).map_or(0, |t| t.start);
        let end = to
            .checked_sub(1)
            .and_then(|i| self.tokens.get(i))
            .map_or(start, |t| t.end);
        self.src
            .get(start..end.max(start))
            .unwrap_or("?")
            .to_string()
    }

    /// Describes the next token for an error message.
    fn found(&self) -> String {
        match self.peek() {
            Some(t) => format!("'{}'", self.token_text(t)),
            None => "the end".to_string(),
        }
    }

    /// Parses `clause (AND clause)*`, or nothing.
    fn filter(&mut self) -> Result<Vec<Clause>, String> {
        let mut clauses = Vec::new();
        if self.peek().is_none() {
            return Ok(clauses);
        }
        loop {
            if clauses.len() == MAX_CLAUSES {
                return Err(format!(
                    "filter has more than {MAX_CLAUSES} clauses; the most accepted is {MAX_CLAUSES}"
                ));
            }
            let start = self.pos;
            clauses.push(self.clause()?);
            if self.peek().is_none() {
                return Ok(clauses);
            }
            if self.keyword("and") {
                continue;
            }
            if self.keyword("or") {
                return Err("OR is not supported: join clauses with AND".to_string());
            }
            let clause = self.span_text(start, self.pos);
            return Err(format!(
                "expected AND after '{clause}', found {}",
                self.found()
            ));
        }
    }

    /// Parses `entity comparator value` and checks it against the scope.
    fn clause(&mut self) -> Result<Clause, String> {
        let start = self.pos;
        let field = self.entity()?;
        let name = self.span_text(start, self.pos);
        let rule = self.check_field(&field, &name)?;
        let comparator = self.comparator(&name)?;
        if !rule.comparators.contains(&comparator) {
            return Err(self.comparator_error(&name, &rule, comparator));
        }
        let operand = match comparator {
            Comparator::IsNull | Comparator::IsNotNull => Operand::None,
            Comparator::In | Comparator::NotIn => Operand::List(self.list(&name)?),
            _ => self.scalar(&name, &rule)?,
        };
        Ok(Clause {
            field,
            comparator,
            operand,
        })
    }

    /// Parses an entity: `prefix.key`, `prefix."quoted key"`, a bare attribute
    /// or a whole quoted name split at a known prefix.
    fn entity(&mut self) -> Result<Field, String> {
        let found = self.found();
        let Some(token) = self.advance() else {
            return Err(format!(
                "expected a name such as metrics.rmse, found {found}"
            ));
        };
        match token.tok {
            Tok::Word(word) => self.word_entity(&word),
            Tok::Quoted { quote, text } if quote != '\'' => {
                let (kind, key) = split_prefix(&text);
                Ok(field(kind, key.to_string()))
            }
            _ => Err(format!(
                "expected a name such as metrics.rmse (quote names with \" or `), found {found}"
            )),
        }
    }

    /// Finishes an entity that starts with a bare word.
    fn word_entity(&mut self, word: &str) -> Result<Field, String> {
        let (kind, key) = split_prefix(word);
        if !key.is_empty() {
            return Ok(field(kind, key.to_string()));
        }
        let quoted_key = match self.peek().map(|t| &t.tok) {
            Some(Tok::Quoted { quote, text }) if *quote != '\'' => Some(text.clone()),
            _ => None,
        };
        match quoted_key {
            Some(key) if !key.is_empty() => {
                self.pos += 1;
                Ok(field(kind, key))
            }
            _ => Err(format!("'{word}' needs a name after the prefix")),
        }
    }

    /// Checks that the scope has `field` and returns what it accepts.
    fn check_field(&self, field: &Field, name: &str) -> Result<Rule, String> {
        let scope = self.scope;
        let (allowed, plural) = match field {
            Field::Metric(_) => (scope.metrics, "metrics"),
            Field::Param(_) => (scope.params, "params"),
            Field::Tag(_) => (scope.tags, "tags"),
            Field::Dataset(_) => (!scope.dataset_fields.is_empty(), "datasets"),
            Field::Attribute(_) => (true, "attributes"),
        };
        if !allowed {
            return Err(format!(
                "{name}: {plural} are not searchable in {}",
                scope.entity
            ));
        }
        match field {
            Field::Metric(_) => Ok(Rule::new("a metric", true, NUMERIC_OPS)),
            Field::Param(_) => Ok(Rule::new("a param", false, NULLABLE_OPS)),
            Field::Tag(_) => Ok(Rule::new("a tag", false, NULLABLE_OPS)),
            Field::Dataset(key) if scope.dataset_fields.contains(&key.as_str()) => {
                Ok(Rule::new("a dataset field", false, LIST_OPS))
            }
            Field::Dataset(key) => Err(format!(
                "unknown dataset field '{key}'; allowed: {}",
                scope.dataset_fields.join(", ")
            )),
            Field::Attribute(key) if scope.numeric_attributes.contains(&key.as_str()) => {
                Ok(Rule::new("a numeric attribute", true, NUMERIC_OPS))
            }
            Field::Attribute(key) if scope.list_attributes.contains(&key.as_str()) => {
                Ok(Rule::new("a string attribute", false, LIST_OPS))
            }
            Field::Attribute(key) if scope.text_attributes.contains(&key.as_str()) => {
                Ok(Rule::new("a string attribute", false, TEXT_OPS))
            }
            Field::Attribute(key) => Err(scope.unknown_attribute(key)),
        }
    }

    /// Returns the error for a comparator the field does not take.
    fn comparator_error(&self, name: &str, rule: &Rule, comparator: Comparator) -> String {
        let ops: Vec<String> = rule.comparators.iter().map(|c| c.to_string()).collect();
        let mut msg = format!(
            "{name}: {} takes {}, not {comparator}",
            rule.noun,
            ops.join(" ")
        );
        let list = self.scope.list_attributes;
        if matches!(comparator, Comparator::In | Comparator::NotIn) && !list.is_empty() {
            msg.push_str(&format!(" (IN and NOT IN work on {})", list.join(", ")));
        }
        msg
    }

    /// Parses a comparator: an operator or a keyword phrase.
    fn comparator(&mut self, name: &str) -> Result<Comparator, String> {
        if let Some(Tok::Op(op)) = self.peek().map(|t| &t.tok) {
            let op = *op;
            self.pos += 1;
            return Ok(op);
        }
        let found = self.found();
        let comparator = if self.keyword("like") {
            Some(Comparator::Like)
        } else if self.keyword("ilike") {
            Some(Comparator::ILike)
        } else if self.keyword("in") {
            Some(Comparator::In)
        } else if self.keyword("not") {
            self.keyword("in").then_some(Comparator::NotIn)
        } else if self.keyword("is") {
            let not = self.keyword("not");
            match (self.keyword("null"), not) {
                (true, false) => Some(Comparator::IsNull),
                (true, true) => Some(Comparator::IsNotNull),
                (false, _) => None,
            }
        } else {
            None
        };
        comparator.ok_or_else(|| {
            format!("{name}: expected a comparator such as = or LIKE, found {found}")
        })
    }

    /// Parses a single value and checks its type against the field.
    fn scalar(&mut self, name: &str, rule: &Rule) -> Result<Operand, String> {
        let found = self.found();
        let Some(token) = self.advance() else {
            return Err(format!("{name}: expected a value, found {found}"));
        };
        let written = self.token_text(&token);
        let value = match token.tok {
            Tok::Word(w) => number(&w).map_or(Scalar::Other, Scalar::Number),
            Tok::Quoted { quote, text } if quote != '`' => Scalar::Text(text),
            Tok::Quoted { .. } => Scalar::Other,
            _ => return Err(format!("{name}: expected a value, found {found}")),
        };
        match (value, rule.numeric) {
            (Scalar::Number(n), true) => Ok(Operand::Number(n)),
            (Scalar::Text(t), false) => Ok(Operand::Text(t)),
            (_, true) => Err(format!(
                "{name}: {} is compared with a number, not {written}",
                rule.noun
            )),
            (_, false) => Err(format!(
                "{name}: {} is compared with a string in quotes, not {written}",
                rule.noun
            )),
        }
    }

    /// Parses `( 'a', 'b', ... )`.
    fn list(&mut self, name: &str) -> Result<Vec<String>, String> {
        if !matches!(self.advance().map(|t| t.tok), Some(Tok::Open)) {
            return Err(format!(
                "{name}: IN needs a list in parentheses such as ('a', 'b')"
            ));
        }
        let mut values = Vec::new();
        loop {
            let found = self.found();
            match self.advance().map(|t| t.tok) {
                Some(Tok::Quoted { quote, text }) if quote != '`' => values.push(text),
                _ => {
                    return Err(format!(
                        "{name}: IN lists hold strings in quotes, found {found}"
                    ))
                }
            }
            if values.len() > MAX_IN_VALUES {
                return Err(format!(
                    "{name}: IN lists hold at most {MAX_IN_VALUES} values"
                ));
            }
            let found = self.found();
            match self.advance().map(|t| t.tok) {
                Some(Tok::Comma) => continue,
                Some(Tok::Close) => return Ok(values),
                _ => {
                    return Err(format!(
                        "{name}: expected ',' or ')' in the IN list, found {found}"
                    ))
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::HashMap;

    /// A record with whatever fields a test gives it.
    #[derive(Default)]
    struct Rec {
        fields: HashMap<Field, Value>,
        datasets: Vec<[&'static str; 3]>,
    }

    impl Rec {
        fn with(mut self, field: Field, value: Value) -> Self {
            self.fields.insert(field, value);
            self
        }
        fn metric(self, k: &str, v: f64) -> Self {
            self.with(Field::Metric(k.into()), Value::Number(v))
        }
        fn param(self, k: &str, v: &str) -> Self {
            self.with(Field::Param(k.into()), Value::Text(v.into()))
        }
        fn tag(self, k: &str, v: &str) -> Self {
            self.with(Field::Tag(k.into()), Value::Text(v.into()))
        }
        fn text(self, k: &str, v: &str) -> Self {
            self.with(Field::Attribute(k.into()), Value::Text(v.into()))
        }
        fn num(self, k: &str, v: f64) -> Self {
            self.with(Field::Attribute(k.into()), Value::Number(v))
        }
    }

    impl Searchable for Rec {
        fn value(&self, field: &Field) -> Option<Value> {
            self.fields.get(field).cloned()
        }
        fn values(&self, field: &Field) -> Vec<Value> {
            let column = match field {
                Field::Dataset(k) if k == "name" => 0,
                Field::Dataset(k) if k == "digest" => 1,
                Field::Dataset(_) => 2,
                _ => return self.value(field).into_iter().collect(),
            };
            self.datasets
                .iter()
                .map(|d| Value::Text(d[column].into()))
                .collect()
        }
    }

    fn run() -> Rec {
        Rec::default()
            .metric("acc", 0.5)
            .param("lr", "0.1")
            .tag("mlflow.runName", "Brave-Fox")
            .text("status", "RUNNING")
            .text("run_id", "r1")
            .text("run_name", "Brave-Fox")
            .num("start_time", 1000.0)
    }

    fn hits_in(scope: &Scope, filter: &str, rec: &Rec) -> bool {
        Filter::parse(filter, scope).expect(filter).matches(rec)
    }

    fn hits(filter: &str, rec: &Rec) -> bool {
        hits_in(&Scope::runs(), filter, rec)
    }

    fn error_in(scope: &Scope, filter: &str) -> String {
        Filter::parse(filter, scope).expect_err(filter)
    }

    fn error(filter: &str) -> String {
        error_in(&Scope::runs(), filter)
    }

    #[test]
    fn metrics_and_numeric_attributes_compare_as_numbers() {
        let r = run();
        for (f, want) in [
            ("metrics.acc = 0.5", true),
            ("metrics.acc != 0.5", false),
            ("metrics.acc != 1", true),
            ("metrics.acc > 0.4", true),
            ("metrics.acc > 0.5", false),
            ("metrics.acc >= 0.5", true),
            ("metrics.acc < 0.5", false),
            ("metrics.acc < 1", true),
            ("metrics.acc <= 0.5", true),
            ("metrics.acc = 5e-1", true),
            ("metrics.acc > -1.5E2", true),
            ("metric.acc>=.5", true),
            ("start_time >= 1000", true),
            ("attributes.start_time < 1000", false),
            ("attr.start_time = 1e3", true),
        ] {
            assert_eq!(hits(f, &r), want, "{f}");
        }
    }

    #[test]
    fn params_tags_and_string_attributes_compare_as_strings() {
        let r = run();
        for (f, want) in [
            ("params.lr = '0.1'", true),
            ("param.lr != '0.1'", false),
            ("parameters.lr = \"0.1\"", true),
            ("params.lr LIKE '0.%'", true),
            ("params.lr IS NOT NULL", true),
            ("params.lr IS NULL", false),
            ("params.other IS NULL", true),
            ("tags.`mlflow.runName` = 'Brave-Fox'", true),
            ("tags.\"mlflow.runName\" ILIKE 'brave%'", true),
            ("tags.mlflow.runName LIKE 'brave%'", false),
            ("status = 'RUNNING'", true),
            ("attributes.status != 'RUNNING'", false),
            ("run.run_name ILIKE '%FOX'", true),
            ("run_id IN ('r0', 'r1')", true),
            ("run_id NOT IN ('r0', 'r1')", false),
            ("run_id not in ('r0')", true),
        ] {
            assert_eq!(hits(f, &r), want, "{f}");
        }
    }

    #[test]
    fn like_follows_sql_wildcards() {
        for (text, pattern, want) in [
            ("abc", "abc", true),
            ("abc", "ab", false),
            ("abc", "a_c", true),
            ("abc", "a_", false),
            ("abc", "___", true),
            ("abc", "a%c", true),
            ("a-long-c", "a%c", true),
            ("a-long-d", "a%c", false),
            ("aaab", "%aab", true),
            ("xaybzc", "%a%b%c", true),
            ("", "%", true),
            ("", "_", false),
            ("100%", "100%", true),
            ("naïve", "na_ve", true),
            ("ABC", "abc", false),
        ] {
            assert_eq!(like(text, pattern, false), want, "{text} LIKE {pattern}");
        }
        assert!(like("ABC", "a%", true));
        assert!(!like("ABD", "a_c", true));
    }

    #[test]
    fn names_and_values_may_be_quoted() {
        let r = Rec::default()
            .metric("my metric", 2.0)
            .metric("val/loss", 1.0)
            .param("a-b:c", "it's")
            .tag("x", "say \"hi\"");
        assert!(hits("metrics.\"my metric\" = 2", &r));
        assert!(hits("metrics.`my metric` = 2", &r));
        assert!(hits("`metrics.my metric` = 2", &r));
        assert!(hits("metrics.val/loss < 2", &r));
        assert!(hits("params.a-b:c = 'it\\'s'", &r));
        assert!(hits("params.a-b:c = 'it''s'", &r));
        assert!(hits("tags.x = \"say \\\"hi\\\"\"", &r));
        assert!(hits("tags.x = 'say \"hi\"'", &r));
        let parsed = Filter::parse("\"tags.x\" = 'a'", &Scope::runs()).expect("parses");
        assert_eq!(parsed.clauses()[0].field, Field::Tag("x".into()));
    }

    #[test]
    fn and_joins_clauses_in_any_case_and_or_is_refused() {
        let r = run();
        let f = Filter::parse(
            "metrics.acc > 0 and params.lr = '0.1' AnD status = 'RUNNING'",
            &Scope::runs(),
        )
        .expect("parses");
        assert_eq!(f.clauses().len(), 3);
        assert!(f.matches(&r));
        assert!(!hits("metrics.acc > 0 AND status = 'FINISHED'", &r));
        assert!(error("metrics.acc > 0 OR status = 'FINISHED'").contains("OR is not supported"));
        assert!(error("metrics.acc > 0 or status = 'FINISHED'").contains("OR is not supported"));
        assert!(hits("", &r) && hits("   \n", &r));
        assert!(Filter::default().matches(&r));
    }

    #[test]
    fn types_and_comparators_are_checked_per_field() {
        assert_eq!(
            error("params.lr = 0.1"),
            "params.lr: a param is compared with a string in quotes, not 0.1"
        );
        assert_eq!(
            error("metrics.x = 'a'"),
            "metrics.x: a metric is compared with a number, not 'a'"
        );
        assert!(error("metrics.x LIKE '%'")
            .starts_with("metrics.x: a metric takes = != > >= < <=, not LIKE"));
        assert!(error("metrics.x IS NULL").contains("not IS NULL"));
        assert!(error("start_time = '5'").contains("compared with a number"));
        assert!(error("status = RUNNING").contains("not RUNNING"));
        assert!(error("status > 'A'").contains("not >"));
        assert!(error("tags.t IN ('a')").contains("a tag takes"));
        let e = error("run_name IN ('a')");
        assert!(
            e.contains("not IN") && e.contains("IN and NOT IN work on run_id"),
            "{e}"
        );
        let e = error("colour = 'red'");
        assert!(
            e.contains("unknown attribute 'colour' for runs")
                && e.contains("run_id")
                && e.contains("start_time"),
            "{e}"
        );
        assert!(error("mlflow.runName = 'x'").contains("unknown attribute 'mlflow.runName'"));
        assert!(error("datasets.size = 'x'").contains("unknown dataset field 'size'"));
        assert!(error("metrics.acc = inf").contains("not inf"));
        assert!(error("metrics.acc = 1e999").contains("not 1e999"));
        let exp = Scope::experiments();
        assert!(
            error_in(&exp, "metrics.acc > 1").contains("metrics are not searchable in experiments")
        );
        assert!(error_in(&exp, "params.a = 'b'").contains("params are not searchable"));
        assert!(error_in(&exp, "datasets.name = 'b'").contains("datasets are not searchable"));
        assert!(error_in(&Scope::registered_models(), "run_id = 'x'").contains("unknown attribute"));
    }

    #[test]
    fn malformed_filters_are_refused_with_a_reason() {
        for (f, part) in [
            ("metrics.acc >", "expected a value"),
            ("metrics.acc", "expected a comparator"),
            ("metrics.acc ! 1", "'!' at byte 12"),
            ("metrics.acc == 1", "expected a value"),
            (
                "metrics.acc = 1 params.lr = 'a'",
                "expected AND after 'metrics.acc = 1'",
            ),
            ("metrics.acc = 1 AND", "expected a name"),
            ("AND metrics.acc = 1", "unknown attribute 'AND'"),
            (
                "params.lr = 'abc",
                "unterminated ' quote starting at byte 12",
            ),
            ("metrics. = 1", "'metrics.' needs a name"),
            ("metrics.\"\" = 1", "'metrics.' needs a name"),
            ("'status' = 'x'", "quote names with"),
            ("run_id IN ()", "IN lists hold strings in quotes"),
            ("run_id IN ('a'", "expected ',' or ')'"),
            ("run_id IN 'a'", "list in parentheses"),
            ("run_id IN ('a', 1)", "found '1'"),
            ("params.lr IS NOT 'x'", "expected a comparator"),
            ("params.lr NOT LIKE 'x'", "expected a comparator"),
            ("(status = 'x')", "expected a name"),
        ] {
            let e = error(f);
            assert!(e.contains(part), "{f}: {e}");
        }
    }

    #[test]
    fn missing_values_match_only_is_null_and_nan_matches_nothing() {
        let empty = Rec::default();
        for f in [
            "metrics.acc != 1",
            "metrics.acc < 1",
            "params.lr != 'x'",
            "params.lr LIKE '%'",
            "status != 'RUNNING'",
            "run_id NOT IN ('a')",
            "params.lr IS NOT NULL",
        ] {
            assert!(!hits(f, &empty), "{f}");
        }
        assert!(hits("params.lr IS NULL AND tags.t IS NULL", &empty));
        let nan = Rec::default().metric("acc", f64::NAN);
        for op in ["=", "!=", ">", ">=", "<", "<="] {
            assert!(!hits(&format!("metrics.acc {op} 1"), &nan), "NaN {op} 1");
        }
        let wrong_type = Rec::default().text("start_time", "5");
        assert!(!hits("start_time = 5", &wrong_type));
    }

    #[test]
    fn dataset_clauses_match_any_dataset() {
        let r = Rec {
            datasets: vec![["train", "d1", "training"], ["eval", "d2", "evaluation"]],
            ..Rec::default()
        };
        assert!(hits("datasets.name = 'eval'", &r));
        assert!(hits("dataset.name IN ('x', 'train')", &r));
        assert!(hits("datasets.name NOT IN ('train')", &r));
        assert!(!hits("datasets.name NOT IN ('train', 'eval')", &r));
        assert!(hits(
            "datasets.digest LIKE 'd_' AND datasets.context = 'training'",
            &r
        ));
        assert!(!hits("datasets.name = 'eval'", &Rec::default()));
    }

    #[test]
    fn other_scopes_accept_their_own_attributes() {
        let exp = Rec::default()
            .text("experiment_id", "7")
            .text("name", "Default")
            .num("creation_time", 5.0)
            .tag("team", "ml");
        let scope = Scope::experiments();
        assert!(hits_in(
            &scope,
            "experiment_id IN ('7', '8') AND attributes.name LIKE 'Def%'",
            &exp
        ));
        assert!(hits_in(
            &scope,
            "creation_time > 1 AND tags.team IS NOT NULL",
            &exp
        ));
        let mv = Rec::default()
            .num("version_number", 3.0)
            .text("run_id", "r9");
        let scope = Scope::model_versions();
        assert!(hits_in(
            &scope,
            "version_number >= 3 AND run_id IN ('r9')",
            &mv
        ));
        assert!(error_in(&scope, "version_number = '3'").contains("a number"));
        let lm = Rec::default()
            .metric("rmse", 0.2)
            .text("source_run_id", "r1");
        assert!(hits_in(
            &Scope::logged_models(),
            "metrics.rmse < 0.3 AND source_run_id = 'r1'",
            &lm
        ));
        assert!(
            error_in(&Scope::registered_models(), "metrics.rmse < 1").contains("not searchable")
        );
    }

    fn order(keys: &[&str]) -> Result<Vec<OrderKey>, String> {
        parse_order_by(keys, &Scope::runs())
    }

    #[test]
    fn order_by_keys_parse_per_scope() {
        let keys = order(&[
            "metrics.rmse DESC",
            "params.lr",
            "attributes.start_time ASC",
            "`tags.x` desc",
            "metrics.\"my metric\"",
            "run_name",
        ])
        .expect("parses");
        let want = [
            (Field::Metric("rmse".into()), false),
            (Field::Param("lr".into()), true),
            (Field::Attribute("start_time".into()), true),
            (Field::Tag("x".into()), false),
            (Field::Metric("my metric".into()), true),
            (Field::Attribute("run_name".into()), true),
        ];
        let got: Vec<_> = keys.into_iter().map(|k| (k.field, k.ascending)).collect();
        assert_eq!(got, want);
        let exp =
            parse_order_by(&["name", "creation_time DESC"], &Scope::experiments()).expect("parses");
        assert_eq!(exp.len(), 2);
        for (key, part) in [
            ("", "empty"),
            ("  ", "empty"),
            ("metrics.rmse DOWN", "expected ASC or DESC"),
            ("metrics.rmse DESC x", "unexpected 'x'"),
            ("colour", "unknown attribute 'colour'"),
            ("datasets.name", "datasets cannot order"),
            ("'name'", "quote names with"),
        ] {
            let e = order(&[key]).expect_err(key);
            assert!(e.contains(part), "{key}: {e}");
        }
        assert!(parse_order_by(&["metrics.x"], &Scope::experiments()).is_err());
    }

    #[test]
    fn compare_puts_missing_values_last_in_both_directions() {
        let recs = [
            Rec::default().metric("m", 2.0).text("run_name", "b"),
            Rec::default(),
            Rec::default().metric("m", f64::NAN),
            Rec::default().metric("m", 1.0).text("run_name", "a"),
            Rec::default().metric("m", 3.0).text("run_name", "c"),
        ];
        let sorted = |key: &str| -> Vec<Option<Value>> {
            let keys = order(&[key]).expect("parses");
            let mut refs: Vec<&Rec> = recs.iter().collect();
            refs.sort_by(|a, b| compare(*a, *b, &keys));
            refs.iter().map(|r| r.value(&keys[0].field)).collect()
        };
        let n = |x: f64| Some(Value::Number(x));
        let asc = sorted("metrics.m");
        assert_eq!(asc[..3], [n(1.0), n(2.0), n(3.0)]);
        assert!(matches!(asc[3], Some(Value::Number(x)) if x.is_nan()));
        assert_eq!(asc[4], None);
        let desc = sorted("metrics.m DESC");
        assert_eq!(desc[..3], [n(3.0), n(2.0), n(1.0)]);
        assert_eq!(desc[4], None);
        let t = |s: &str| Some(Value::Text(s.into()));
        assert_eq!(
            sorted("run_name DESC"),
            [t("c"), t("b"), t("a"), None, None]
        );
        assert_eq!(sorted("run_name"), [t("a"), t("b"), t("c"), None, None]);
        let two = order(&["run_name", "metrics.m DESC"]).expect("parses");
        let (x, y) = (
            Rec::default().metric("m", 1.0),
            Rec::default().metric("m", 2.0),
        );
        assert_eq!(compare(&x, &y, &two), Ordering::Greater);
        assert_eq!(compare(&x, &x, &two), Ordering::Equal);
    }

    #[test]
    fn page_tokens_round_trip_and_garbage_is_refused() {
        for offset in [0, 1, 1000, usize::MAX] {
            assert_eq!(parse_page_token(&page_token(offset)), Ok(offset));
        }
        assert_eq!(parse_page_token(""), Ok(0));
        for bad in [
            "abc",
            "-1",
            "1.5",
            " 1",
            "99999999999999999999999",
            "eyJvZmZzZXQiOjF9",
        ] {
            let e = parse_page_token(bad).expect_err(bad);
            assert!(e.contains("invalid page_token"), "{bad}: {e}");
        }
    }

    #[test]
    fn page_returns_a_token_only_while_items_remain() {
        let items: Vec<u32> = (0..5).collect();
        let (first, token) = page(items.clone(), 0, 2);
        assert_eq!((first, token.as_deref()), (vec![0, 1], Some("2")));
        let (second, token) = page(items.clone(), 2, 2);
        assert_eq!((second, token.as_deref()), (vec![2, 3], Some("4")));
        assert_eq!(page(items.clone(), 4, 2), (vec![4], None));
        assert_eq!(page(items.clone(), 3, 2), (vec![3, 4], None));
        assert_eq!(page(items.clone(), 9, 2), (vec![], None));
        assert_eq!(page(items.clone(), 0, 0), (vec![], None));
        assert_eq!(page(items, usize::MAX, usize::MAX), (vec![], None));
    }

    #[test]
    fn every_input_is_bounded() {
        let scope = Scope::runs();
        let clauses = |n: usize| vec!["metrics.a > 1"; n].join(" AND ");
        assert!(Filter::parse(&clauses(MAX_CLAUSES), &scope).is_ok());
        assert!(error(&clauses(MAX_CLAUSES + 1)).contains("more than 100 clauses"));
        let long = format!("params.p = '{}'", "x".repeat(MAX_FILTER_BYTES));
        assert!(error(&long).contains("the most accepted is 4096"));
        let list = |n: usize| format!("run_id IN ({})", vec!["'a'"; n].join(","));
        assert!(Filter::parse(&list(MAX_IN_VALUES), &scope).is_ok());
        assert!(error(&list(MAX_IN_VALUES + 1)).contains("at most 1000 values"));
        let keys = vec!["metrics.a"; MAX_ORDER_KEYS + 1];
        assert!(parse_order_by(&keys[..MAX_ORDER_KEYS], &scope).is_ok());
        assert!(parse_order_by(&keys, &scope)
            .expect_err("11 keys")
            .contains("order_by has 11 keys"));
        let key = format!("metrics.{}", "k".repeat(MAX_ORDER_KEY_BYTES));
        assert!(parse_order_by(&[key], &scope).is_err());
    }

    #[test]
    fn random_input_never_panics() {
        let pieces: Vec<&str> = concat!(
            "metrics.|params.|tags.|datasets.|attr.|run_id|status|start_time|name|x| | AND | OR ",
            "|=|!=|!|>|>=|<|<=| LIKE | ILIKE | IN | NOT | IS | NULL |(|)|,|'|\"|`|\\|'a'|1|-2.5e3",
            "|e|.|%|_|é|🦀|\u{0}|DESC|asc",
        )
        .split('|')
        .collect();
        let mut state: u64 = 0x9E37_79B9_7F4A_7C15;
        let mut next = move || {
            state ^= state << 13;
            state ^= state >> 7;
            state ^= state << 17;
            state
        };
        let scopes = [
            Scope::runs(),
            Scope::experiments(),
            Scope::registered_models(),
            Scope::model_versions(),
            Scope::logged_models(),
        ];
        let rec = run();
        let mut parsed = 0;
        for _ in 0..600 {
            let len = (next() % 12) as usize;
            let text: String = (0..len)
                .map(|_| pieces[(next() % pieces.len() as u64) as usize])
                .collect();
            for scope in &scopes {
                if let Ok(f) = Filter::parse(&text, scope) {
                    parsed += 1;
                    let _ = f.matches(&rec);
                }
                if let Ok(keys) = parse_order_by(&[text.as_str()], scope) {
                    let _ = compare(&rec, &Rec::default(), &keys);
                }
            }
            let _ = parse_page_token(&text);
        }
        assert!(
            parsed > 0,
            "the generator should produce some valid filters"
        );
    }
}
