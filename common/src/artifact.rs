//! Names, tags and references of artifacts, checked the same way by the CLI and
//! by the coordinators.
//!
//! A reference is `NAME`, `NAME@latest`, `NAME@7` (a version number) or
//! `NAME@TAG`.

use crate::{Error, Result};

/// Longest artifact name or tag.
pub const MAX_NAME_BYTES: usize = 128;
/// Replicas of each chunk unless the push asks for another number.
pub const DEFAULT_REPLICAS: u32 = 2;
/// Most replicas a push may ask for.
pub const MAX_REPLICAS: u32 = 7;

fn check(what: &str, text: &str) -> Result<()> {
    let ok = !text.is_empty()
        && text.len() <= MAX_NAME_BYTES
        && !text.starts_with('.')
        && text
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || matches!(c, '-' | '_' | '.'));
    if ok {
        Ok(())
    } else {
        Err(Error::InvalidArgument(format!(
            "{what} '{text}' must be 1 to {MAX_NAME_BYTES} letters, digits, '-', '_' or '.', \
             not starting with '.'"
        )))
    }
}

/// Returns the artifact holding the versions of a model (`model.onnx` and
/// `reference.json` each for kiln's trainer; an MLflow model's files for a version
/// registered through MLflow's API).
pub fn model_artifact(model: &str) -> String {
    format!("{model}-model")
}

/// Checks an artifact name.
pub fn validate_name(name: &str) -> Result<()> {
    check("artifact name", name)
}

/// Checks a tag: a name that is not a number (numbers are versions) nor `latest`
/// (which always means the newest version).
pub fn validate_tag(tag: &str) -> Result<()> {
    check("tag", tag)?;
    if tag.bytes().all(|b| b.is_ascii_digit()) {
        return Err(Error::InvalidArgument(format!(
            "tag '{tag}' is a number; numbers name versions"
        )));
    }
    if tag == "latest" {
        return Err(Error::InvalidArgument(
            "'latest' always names the newest version; it cannot be set".into(),
        ));
    }
    Ok(())
}

/// What a reference after `@` names.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Selector {
    Latest,
    Version(u64),
    Tag(String),
}

impl Selector {
    /// Parses the part after `@` (empty: latest).
    pub fn parse(text: &str) -> Result<Selector> {
        if text.is_empty() || text == "latest" {
            return Ok(Selector::Latest);
        }
        if text.bytes().all(|b| b.is_ascii_digit()) {
            let version: u64 = text
                .parse()
                .map_err(|_| Error::InvalidArgument(format!("version '{text}' is too large")))?;
            if version == 0 {
                return Err(Error::InvalidArgument("versions start at 1".into()));
            }
            return Ok(Selector::Version(version));
        }
        validate_tag(text)?;
        Ok(Selector::Tag(text.to_string()))
    }
}

impl std::fmt::Display for Selector {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Selector::Latest => f.write_str("latest"),
            Selector::Version(v) => write!(f, "{v}"),
            Selector::Tag(t) => f.write_str(t),
        }
    }
}

/// Splits `NAME[@REF]` into a checked name and selector.
pub fn parse_reference(text: &str) -> Result<(String, Selector)> {
    let (name, selector) = match text.split_once('@') {
        Some((name, selector)) => (name, Selector::parse(selector)?),
        None => (text, Selector::Latest),
    };
    validate_name(name)?;
    Ok((name.to_string(), selector))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn references_parse() {
        assert_eq!(
            parse_reference("iris").expect("plain"),
            ("iris".into(), Selector::Latest)
        );
        assert_eq!(
            parse_reference("iris@3").expect("version").1,
            Selector::Version(3)
        );
        assert_eq!(
            parse_reference("iris@prod").expect("tag").1,
            Selector::Tag("prod".into())
        );
        assert_eq!(
            parse_reference("iris@latest").expect("latest").1,
            Selector::Latest
        );
        for bad in ["", "@1", "a/b", "iris@0", "iris@", ".hidden", "x@a b"] {
            if bad == "iris@" {
                assert_eq!(
                    parse_reference(bad).expect("empty is latest").1,
                    Selector::Latest
                );
                continue;
            }
            assert!(parse_reference(bad).is_err(), "{bad} should be refused");
        }
    }

    #[test]
    fn tags_are_not_numbers_or_latest() {
        assert!(validate_tag("prod").is_ok());
        assert!(validate_tag("v1.2").is_ok());
        assert!(validate_tag("12").is_err());
        assert!(validate_tag("latest").is_err());
    }
}
