//! Diagnostics: what is wrong with a config (or the text it came from), in English and Chinese,
//! with the field it concerns and a fix. Parsers, decoders and `validate` all speak this type.

use serde::{Deserialize, Serialize};

#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Severity {
    Error,
    Warning,
    Info,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Diagnostic {
    pub severity: Severity,
    /// The config field (flag name), or a pseudo-field such as `shell` or `share` for text errors.
    pub field: String,
    /// Stable machine-readable code, e.g. `nproc_device_mismatch`.
    pub code: String,
    pub message_en: String,
    pub message_zh: String,
    /// What to do, in English.
    pub fix: String,
    /// What to do, in Chinese.
    pub fix_zh: String,
}

impl Diagnostic {
    pub fn new(
        severity: Severity,
        field: impl Into<String>,
        code: impl Into<String>,
        message_en: impl Into<String>,
        message_zh: impl Into<String>,
    ) -> Diagnostic {
        Diagnostic {
            severity,
            field: field.into(),
            code: code.into(),
            message_en: message_en.into(),
            message_zh: message_zh.into(),
            fix: String::new(),
            fix_zh: String::new(),
        }
    }

    pub fn error(
        field: impl Into<String>,
        code: impl Into<String>,
        message_en: impl Into<String>,
        message_zh: impl Into<String>,
    ) -> Diagnostic {
        Diagnostic::new(Severity::Error, field, code, message_en, message_zh)
    }

    pub fn warning(
        field: impl Into<String>,
        code: impl Into<String>,
        message_en: impl Into<String>,
        message_zh: impl Into<String>,
    ) -> Diagnostic {
        Diagnostic::new(Severity::Warning, field, code, message_en, message_zh)
    }

    pub fn info(
        field: impl Into<String>,
        code: impl Into<String>,
        message_en: impl Into<String>,
        message_zh: impl Into<String>,
    ) -> Diagnostic {
        Diagnostic::new(Severity::Info, field, code, message_en, message_zh)
    }

    pub fn with_fix(mut self, fix: impl Into<String>, fix_zh: impl Into<String>) -> Diagnostic {
        self.fix = fix.into();
        self.fix_zh = fix_zh.into();
        self
    }

    pub fn is_error(&self) -> bool {
        self.severity == Severity::Error
    }
}

impl std::fmt::Display for Diagnostic {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let level = match self.severity {
            Severity::Error => "error",
            Severity::Warning => "warning",
            Severity::Info => "info",
        };
        write!(
            f,
            "{level}[{}] {}: {}",
            self.code, self.field, self.message_en
        )?;
        if !self.fix.is_empty() {
            write!(f, "\n  fix: {}", self.fix)?;
        }
        Ok(())
    }
}

/// One diagnostic is an error value too (`whet sft` refuses a job with it).
impl std::error::Error for Diagnostic {}

/// A list of diagnostics returned when input cannot be turned into a config.
#[derive(Debug, Clone, PartialEq, Default, Serialize, Deserialize)]
#[serde(transparent)]
pub struct Diagnostics(pub Vec<Diagnostic>);

impl Diagnostics {
    pub fn has_errors(&self) -> bool {
        self.0.iter().any(Diagnostic::is_error)
    }
    pub fn push(&mut self, d: Diagnostic) {
        self.0.push(d)
    }
    pub fn iter(&self) -> impl Iterator<Item = &Diagnostic> {
        self.0.iter()
    }
    pub fn is_empty(&self) -> bool {
        self.0.is_empty()
    }
    pub fn len(&self) -> usize {
        self.0.len()
    }
}

impl From<Diagnostic> for Diagnostics {
    fn from(d: Diagnostic) -> Self {
        Diagnostics(vec![d])
    }
}

impl From<Vec<Diagnostic>> for Diagnostics {
    fn from(v: Vec<Diagnostic>) -> Self {
        Diagnostics(v)
    }
}

impl std::fmt::Display for Diagnostics {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        for (i, d) in self.0.iter().enumerate() {
            if i > 0 {
                writeln!(f)?;
            }
            write!(f, "{d}")?;
        }
        Ok(())
    }
}

impl std::error::Error for Diagnostics {}

/// The candidate closest to `word` by edit distance, if it is close enough to be a likely typo.
pub fn closest_word<'a>(word: &str, candidates: impl Iterator<Item = &'a str>) -> Option<&'a str> {
    let word = word.to_lowercase();
    let mut best: Option<(f64, &'a str)> = None;
    for candidate in candidates {
        let score = strsim::jaro_winkler(&word, candidate);
        if best.is_none_or(|(s, _)| score > s) {
            best = Some((score, candidate));
        }
    }
    best.filter(|(score, _)| *score >= 0.75).map(|(_, c)| c)
}

/// Cuts a value for display in a message (a 10 MB line must not be echoed whole).
pub fn shorten(text: &str) -> String {
    const MAX: usize = 60;
    if text.chars().count() <= MAX {
        text.to_string()
    } else {
        let head: String = text.chars().take(MAX).collect();
        format!("{head}… ({} characters)", text.chars().count())
    }
}
