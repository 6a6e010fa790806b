//! What the configuration errors of this crate hold: what is wrong, and its cause.

use std::error::Error;

/// A reason, and the error it came from (if any), given as the `source` of the public error
/// that wraps it.
#[derive(Debug)]
pub(crate) struct Invalid {
    pub(crate) reason: String,
    source: Option<Box<dyn Error + Send + Sync>>,
}

impl Invalid {
    pub(crate) fn new(reason: impl Into<String>) -> Self {
        Self {
            reason: reason.into(),
            source: None,
        }
    }

    pub(crate) fn because(
        reason: impl Into<String>,
        source: impl Error + Send + Sync + 'static,
    ) -> Self {
        Self {
            reason: reason.into(),
            source: Some(Box::new(source)),
        }
    }

    pub(crate) fn source(&self) -> Option<&(dyn Error + 'static)> {
        self.source.as_deref().map(|e| e as &(dyn Error + 'static))
    }
}

/// An error and its causes on one line (`a: b: c`), for a log line or a config error.
pub(crate) fn chain(error: &dyn Error) -> String {
    let mut out = error.to_string();
    let mut source = error.source();
    while let Some(cause) = source {
        out.push_str(": ");
        out.push_str(&cause.to_string());
        source = cause.source();
    }
    out
}
