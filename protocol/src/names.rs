//! Validated names: node ids, app names, versions, release ids. Each is safe to use as a
//! single MQTT topic level and as a single file name, so no caller has to escape it.

use std::fmt;

use serde::{Deserialize, Serialize};

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("invalid {what} {value:?}: use 1 to 64 characters from A-Z a-z 0-9 . _ - , not starting with . or -")]
pub struct NameError {
    pub what: &'static str,
    pub value: String,
}

fn check(what: &'static str, value: &str) -> Result<(), NameError> {
    let ok = (1..=64).contains(&value.len())
        && !value.starts_with(['.', '-'])
        && value
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'.' | b'_' | b'-'));
    if ok {
        Ok(())
    } else {
        Err(NameError {
            what,
            value: value.chars().take(80).collect(),
        })
    }
}

macro_rules! name_type {
    ($(#[$doc:meta])* $name:ident, $what:literal) => {
        $(#[$doc])*
        #[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
        #[serde(try_from = "String", into = "String")]
        pub struct $name(String);

        impl $name {
            pub fn new(value: impl Into<String>) -> Result<Self, NameError> {
                let value = value.into();
                check($what, &value)?;
                Ok($name(value))
            }

            pub fn as_str(&self) -> &str {
                &self.0
            }
        }

        impl TryFrom<String> for $name {
            type Error = NameError;
            fn try_from(value: String) -> Result<Self, NameError> {
                $name::new(value)
            }
        }

        impl From<$name> for String {
            fn from(name: $name) -> String {
                name.0
            }
        }

        impl std::str::FromStr for $name {
            type Err = NameError;
            fn from_str(s: &str) -> Result<Self, NameError> {
                $name::new(s)
            }
        }

        impl fmt::Display for $name {
            fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str(&self.0)
            }
        }
    };
}

name_type!(
    /// A node's identity: its MQTT client id and its topic level.
    NodeId,
    "node id"
);
name_type!(
    /// The name of an application (or content bundle) that releases belong to.
    AppName,
    "app name"
);
name_type!(
    /// A release version, as the operator wrote it (compared for equality, never parsed).
    Version,
    "version"
);

/// One release: an app at a version. Shown as `app@version`.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
pub struct ReleaseId {
    pub app: AppName,
    pub version: Version,
}

impl ReleaseId {
    pub fn new(app: AppName, version: Version) -> Self {
        ReleaseId { app, version }
    }
}

impl fmt::Display for ReleaseId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}@{}", self.app, self.version)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_that_could_escape_a_topic_or_a_directory_are_refused() {
        for bad in [
            "",
            "a/b",
            "+",
            "#",
            "..",
            ".hidden",
            "-x",
            "a b",
            &"x".repeat(65),
        ] {
            assert!(NodeId::new(bad).is_err(), "{bad:?} accepted");
        }
        for good in ["edge-01", "v1.2.3", "A_b.c-9"] {
            assert!(NodeId::new(good).is_ok(), "{good:?} refused");
        }
    }

    #[test]
    fn deserializing_checks_the_name() {
        assert!(serde_json::from_str::<Version>("\"../x\"").is_err());
        assert_eq!(
            serde_json::from_str::<Version>("\"1.0\"").unwrap().as_str(),
            "1.0"
        );
    }
}
