//! A list of every problem found in one go (parsing or validating), never empty when
//! returned as an error: users fix them all at once rather than one per attempt.

use std::fmt;

/// Every problem found, in the order found.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ErrorList<E>(pub Vec<E>);

impl<E> ErrorList<E> {
    /// The individual errors.
    pub fn iter(&self) -> impl Iterator<Item = &E> {
        self.0.iter()
    }

    /// Number of errors.
    pub fn len(&self) -> usize {
        self.0.len()
    }

    /// True when there are none.
    pub fn is_empty(&self) -> bool {
        self.0.is_empty()
    }
}

/// One error per line.
impl<E: fmt::Display> fmt::Display for ErrorList<E> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        for (i, e) in self.0.iter().enumerate() {
            if i > 0 {
                f.write_str("\n")?;
            }
            write!(f, "{e}")?;
        }
        Ok(())
    }
}

impl<E: fmt::Display + fmt::Debug> std::error::Error for ErrorList<E> {}

impl<E> From<E> for ErrorList<E> {
    fn from(e: E) -> Self {
        Self(vec![e])
    }
}

impl<E> IntoIterator for ErrorList<E> {
    type Item = E;
    type IntoIter = std::vec::IntoIter<E>;
    fn into_iter(self) -> Self::IntoIter {
        self.0.into_iter()
    }
}
