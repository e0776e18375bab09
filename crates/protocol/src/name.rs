//! [`NodeName`]: a node's human-readable name, carried in its heartbeats.

use std::fmt;

/// Most bytes of a [`NodeName`] (UTF-8).
pub const MAX_NODE_NAME: usize = 64;

/// A node's name for people (logs, `chorus members`, metrics labels): 1 to
/// [`MAX_NODE_NAME`] bytes of UTF-8, printable (no control characters, no line breaks or tabs,
/// no leading or trailing space). Unlike the node id it is not an identity: two nodes may
/// share a name, and a node may change it between heartbeats.
///
/// # Examples
///
/// ```
/// use chorus_protocol::NodeName;
/// assert_eq!(NodeName::new("web-1").expect("valid").as_str(), "web-1");
/// assert!(NodeName::new("").is_err());
/// assert!(NodeName::new("a\nb").is_err());
/// assert!(NodeName::new(&"x".repeat(65)).is_err());
/// ```
#[derive(Clone, PartialEq, Eq, PartialOrd, Ord, Hash, Debug)]
pub struct NodeName(String);

/// Why a string is no [`NodeName`].
#[derive(Clone, Copy, PartialEq, Eq, Debug, thiserror::Error)]
pub enum NodeNameError {
    /// It is empty (or only spaces).
    #[error("a node name must not be empty")]
    Empty,
    /// It is longer than [`MAX_NODE_NAME`] bytes.
    #[error("a node name has at most {MAX_NODE_NAME} bytes, this one {0}")]
    TooLong(usize),
    /// It is not UTF-8 (only from the wire).
    #[error("a node name must be UTF-8")]
    NotUtf8,
    /// It holds a control character, a line break, a tab or leading/trailing space.
    #[error(
        "a node name must be printable (no control characters, line breaks, tabs or surrounding spaces)"
    )]
    NotPrintable,
}

impl NodeName {
    /// Checks `name`.
    ///
    /// # Errors
    ///
    /// A [`NodeNameError`] saying what is wrong with it.
    pub fn new(name: &str) -> Result<NodeName, NodeNameError> {
        if name.len() > MAX_NODE_NAME {
            return Err(NodeNameError::TooLong(name.len()));
        }
        if name.trim().is_empty() {
            return Err(NodeNameError::Empty);
        }
        let printable = name.trim() == name
            && !name
                .chars()
                .any(|c| c.is_control() || (c.is_whitespace() && c != ' '));
        if !printable {
            return Err(NodeNameError::NotPrintable);
        }
        Ok(NodeName(name.to_owned()))
    }

    /// Checks a name as it came in a heartbeat (`bytes`, so that a bad one is refused here
    /// rather than by the decoder for the whole datagram).
    ///
    /// # Errors
    ///
    /// As [`NodeName::new`], and [`NodeNameError::NotUtf8`].
    pub fn from_wire(bytes: &[u8]) -> Result<NodeName, NodeNameError> {
        if bytes.len() > MAX_NODE_NAME {
            return Err(NodeNameError::TooLong(bytes.len()));
        }
        let text = std::str::from_utf8(bytes).map_err(|_| NodeNameError::NotUtf8)?;
        NodeName::new(text)
    }

    /// The name.
    pub fn as_str(&self) -> &str {
        &self.0
    }
}

impl fmt::Display for NodeName {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

impl std::str::FromStr for NodeName {
    type Err = NodeNameError;

    fn from_str(s: &str) -> Result<NodeName, NodeNameError> {
        NodeName::new(s)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_are_bounded_utf8_and_printable() {
        for good in [
            "a",
            "web-1.example.org",
            "café",
            "two words",
            &"x".repeat(64),
        ] {
            assert_eq!(NodeName::new(good).map(|n| n.0), Ok(good.to_owned()));
        }
        assert_eq!(
            NodeName::new(&"é".repeat(33)),
            Err(NodeNameError::TooLong(66))
        );
        assert_eq!(NodeName::new("  "), Err(NodeNameError::Empty));
        for bad in ["a\tb", " a", "a ", "a\u{7}", "a\u{2028}b", "\r"] {
            assert!(NodeName::new(bad).is_err(), "{bad:?}");
        }
        assert_eq!(
            NodeName::from_wire(b"\xff\xfe"),
            Err(NodeNameError::NotUtf8)
        );
        assert_eq!(
            NodeName::from_wire(&[b'a'; 1000]),
            Err(NodeNameError::TooLong(1000))
        );
        assert_eq!(NodeName::from_wire(b"ok").map(|n| n.0), Ok("ok".to_owned()));
    }
}
