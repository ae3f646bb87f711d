//! Diagnostics for configuration files: where a problem is and what was expected.
//!
//! Broken configuration is data, not a failure: the parsers and the validator
//! collect every problem they find as a [`Diagnostic`] (file, line, column,
//! element, attribute, message), in the spirit of rust-analyzer, so that an
//! operator fixes a file in one pass instead of one error per run.

use std::fmt;
use std::sync::Arc;

/// How bad a diagnostic is.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum Severity {
    /// The configuration must not be applied.
    Error,
    /// The configuration can be applied, but something looks unfinished or odd.
    Warning,
}

/// One problem found in a configuration file.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Diagnostic {
    pub severity: Severity,
    /// The file name as the caller gave it to the parser.
    pub file: Arc<str>,
    /// 1-based line.
    pub line: u32,
    /// 1-based column, counted in characters.
    pub column: u32,
    /// The element the problem is about, without brackets (`heartbeat`).
    pub element: Option<String>,
    /// The attribute the problem is about, if any.
    pub attribute: Option<String>,
    /// What is wrong and what was expected.
    pub message: String,
}

impl Diagnostic {
    /// Whether this diagnostic prevents the configuration from being applied.
    pub fn is_error(&self) -> bool {
        self.severity == Severity::Error
    }
}

impl fmt::Display for Diagnostic {
    /// `file:line:col: element <x> attribute <y>: message`, with `warning: `
    /// after the position for warnings.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}:{}:{}: ", self.file, self.line, self.column)?;
        if self.severity == Severity::Warning {
            f.write_str("warning: ")?;
        }
        if let Some(element) = &self.element {
            write!(f, "element <{element}>")?;
            if let Some(attribute) = &self.attribute {
                write!(f, " attribute {attribute}")?;
            }
            f.write_str(": ")?;
        } else if let Some(attribute) = &self.attribute {
            write!(f, "attribute {attribute}: ")?;
        }
        f.write_str(&self.message)
    }
}

/// Every error (and warning) found in a configuration that cannot be used.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
#[error("{}", render(.diagnostics))]
pub struct ConfigErrors {
    /// Sorted by file, line and column; contains at least one error.
    pub diagnostics: Vec<Diagnostic>,
}

impl ConfigErrors {
    /// Only the diagnostics of severity [`Severity::Error`].
    pub fn errors(&self) -> impl Iterator<Item = &Diagnostic> {
        self.diagnostics
            .iter()
            .filter(|diagnostic| diagnostic.is_error())
    }
}

fn render(diagnostics: &[Diagnostic]) -> String {
    let lines: Vec<String> = diagnostics.iter().map(ToString::to_string).collect();
    lines.join("\n")
}

/// Sorts diagnostics by position, errors first at one position, and drops exact duplicates.
pub fn sort_diagnostics(diagnostics: &mut Vec<Diagnostic>) {
    diagnostics.sort_by(|a, b| {
        (&a.file, a.line, a.column, a.severity, &a.message)
            .cmp(&(&b.file, b.line, b.column, b.severity, &b.message))
    });
    diagnostics.dedup();
}

/// Converts byte offsets of one text into 1-based line and column (in characters).
#[derive(Debug)]
pub(crate) struct LineIndex<'a> {
    text: &'a str,
    /// Byte offset of the start of each line.
    line_starts: Vec<usize>,
}

impl<'a> LineIndex<'a> {
    pub(crate) fn new(text: &'a str) -> Self {
        let mut line_starts = vec![0];
        line_starts.extend(text.match_indices('\n').map(|(offset, _)| offset + 1));
        LineIndex { text, line_starts }
    }

    /// Line and column of `offset`; an offset past the end maps to the end.
    pub(crate) fn line_column(&self, offset: usize) -> (u32, u32) {
        let offset = offset.min(self.text.len());
        let line_idx = match self.line_starts.binary_search(&offset) {
            Ok(idx) => idx,
            Err(idx) => idx - 1,
        };
        let line_start = self.line_starts[line_idx];
        // Offsets from the parser are on character boundaries; be lenient anyway.
        let column = self
            .text
            .get(line_start..offset)
            .map_or(offset - line_start, |prefix| prefix.chars().count());
        (to_u32(line_idx + 1), to_u32(column + 1))
    }
}

fn to_u32(value: usize) -> u32 {
    u32::try_from(value).unwrap_or(u32::MAX)
}

/// Where a model value came from: file, position of its element and of each of
/// its attributes.
///
/// Positions are not part of a configuration's identity: two `Origin`s always
/// compare equal, so a model parsed from a file equals the same model written
/// and parsed again, and a model built in code (with `Origin::default()`)
/// equals a parsed one.
#[derive(Clone, Debug, Default)]
pub struct Origin {
    pub file: Arc<str>,
    pub element: String,
    pub line: u32,
    pub column: u32,
    /// Attribute name, line, column.
    pub attributes: Vec<(String, u32, u32)>,
}

impl PartialEq for Origin {
    fn eq(&self, _other: &Self) -> bool {
        true
    }
}

impl Eq for Origin {}

impl Origin {
    /// A diagnostic about the element itself.
    pub fn diagnostic(&self, severity: Severity, message: impl Into<String>) -> Diagnostic {
        Diagnostic {
            severity,
            file: self.file.clone(),
            line: self.line,
            column: self.column,
            element: (!self.element.is_empty()).then(|| self.element.clone()),
            attribute: None,
            message: message.into(),
        }
    }

    /// A diagnostic about one attribute, placed at the attribute when it was
    /// written in the file and at the element otherwise (a default value).
    pub fn attribute_diagnostic(
        &self,
        severity: Severity,
        attribute: &str,
        message: impl Into<String>,
    ) -> Diagnostic {
        let mut diagnostic = self.diagnostic(severity, message);
        if let Some((_, line, column)) = self
            .attributes
            .iter()
            .find(|(name, _, _)| name == attribute)
        {
            diagnostic.line = *line;
            diagnostic.column = *column;
        }
        diagnostic.attribute = Some(attribute.to_owned());
        diagnostic
    }

    /// Shorthand for an error about the element.
    pub fn error(&self, message: impl Into<String>) -> Diagnostic {
        self.diagnostic(Severity::Error, message)
    }

    /// Shorthand for an error about an attribute.
    pub fn attribute_error(&self, attribute: &str, message: impl Into<String>) -> Diagnostic {
        self.attribute_diagnostic(Severity::Error, attribute, message)
    }

    /// Shorthand for a warning about an attribute.
    pub fn attribute_warning(&self, attribute: &str, message: impl Into<String>) -> Diagnostic {
        self.attribute_diagnostic(Severity::Warning, attribute, message)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn line_and_column_count_characters_from_one() {
        let index = LineIndex::new("ab\n”c\nd");
        assert_eq!(index.line_column(0), (1, 1));
        assert_eq!(index.line_column(3), (2, 1));
        // `”` is three bytes but one column.
        assert_eq!(index.line_column(6), (2, 2));
        assert_eq!(index.line_column(8), (3, 1));
        assert_eq!(index.line_column(100), (3, 2));
    }

    #[test]
    fn diagnostic_renders_as_one_line() {
        let origin = Origin {
            file: "userconfig.xml".into(),
            element: "heart".into(),
            line: 4,
            column: 7,
            attributes: vec![("timeout".into(), 4, 26)],
        };
        assert_eq!(
            origin
                .attribute_error("timeout", "must be greater than pulse")
                .to_string(),
            "userconfig.xml:4:26: element <heart> attribute timeout: must be greater than pulse"
        );
        assert_eq!(
            origin
                .error("expected at least one <heartbeat>")
                .to_string(),
            "userconfig.xml:4:7: element <heart>: expected at least one <heartbeat>"
        );
    }
}
