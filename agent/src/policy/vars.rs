//! Policy variables: `${HOME}`, `${USER}`, `${UID}`.
//!
//! Their values come from the account database entry of the user who
//! launched the server (`getpwuid`), never from the server's environment:
//! an attacker who controls `HOME` must not widen the policy.
use nix::unistd::{Uid, User};

use super::PolicyError;

/// Values substituted for `${HOME}`, `${USER}` and `${UID}`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Vars {
    pub home: String,
    pub user: String,
    pub uid: u32,
}

#[cfg(test)]
impl Vars {
    /// The user the unit tests expand policies for.
    pub(crate) fn ann() -> Self {
        Self {
            home: "/home/ann".into(),
            user: "ann".into(),
            uid: 1000,
        }
    }
}

/// Names a policy may use inside `${...}`.
pub const KNOWN_VARS: [&str; 3] = ["HOME", "USER", "UID"];

impl Vars {
    /// Look `uid` up in the account database (`/etc/passwd`, NSS).
    pub fn for_uid(uid: u32) -> Result<Vars, PolicyError> {
        match User::from_uid(Uid::from_raw(uid)) {
            Ok(Some(u)) => {
                let home = u
                    .dir
                    .to_str()
                    .ok_or(PolicyError::Account {
                        uid,
                        reason: "home directory is not UTF-8".to_string(),
                    })?
                    .to_string();
                // "/home/ann/" -> "/home/ann", so "${HOME}" is never a
                // path with a trailing '/'.
                let trimmed = home.trim_end_matches('/');
                let home = if trimmed.is_empty() { "/" } else { trimmed }.to_string();
                Ok(Vars {
                    home,
                    user: u.name,
                    uid,
                })
            }
            Ok(None) => Err(PolicyError::Account {
                uid,
                reason: "no such user in the account database".to_string(),
            }),
            Err(e) => Err(PolicyError::Account {
                uid,
                reason: e.to_string(),
            }),
        }
    }

    fn get(&self, name: &str) -> Option<String> {
        match name {
            "HOME" => Some(self.home.clone()),
            "USER" => Some(self.user.clone()),
            "UID" => Some(self.uid.to_string()),
            _ => None,
        }
    }
}

/// A problem at byte offset `at` of the template.
#[derive(Debug, PartialEq, Eq)]
pub(crate) struct ExpandError {
    pub at: usize,
    pub message: String,
}

/// Byte ranges of every `${...}` reference in `s` (including the braces).
/// An unterminated `${` is reported as an error.
pub(crate) fn var_refs(s: &str) -> Result<Vec<std::ops::Range<usize>>, ExpandError> {
    let mut out = Vec::new();
    let mut i = 0;
    while let Some(rel) = s[i..].find("${") {
        let start = i + rel;
        match s[start + 2..].find('}') {
            Some(end_rel) => {
                let end = start + 2 + end_rel + 1;
                out.push(start..end);
                i = end;
            }
            None => {
                return Err(ExpandError {
                    at: start,
                    message: "unterminated `${` (variables are written ${HOME}, ${USER}, ${UID})"
                        .to_string(),
                })
            }
        }
    }
    Ok(out)
}

/// Replace every `${NAME}` in `s`. A `$` not followed by `{` is literal.
pub(crate) fn expand(s: &str, vars: &Vars) -> Result<String, ExpandError> {
    let refs = var_refs(s)?;
    let mut out = String::with_capacity(s.len());
    let mut last = 0;
    for r in refs {
        out.push_str(&s[last..r.start]);
        let name = &s[r.start + 2..r.end - 1];
        match vars.get(name) {
            Some(v) => out.push_str(&v),
            None => {
                return Err(ExpandError {
                    at: r.start,
                    message: format!(
                        "unknown variable `${{{name}}}` (known: ${{HOME}}, ${{USER}}, ${{UID}})"
                    ),
                })
            }
        }
        last = r.end;
    }
    out.push_str(&s[last..]);
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn v() -> Vars {
        Vars {
            home: "/home/ann".into(),
            user: "ann".into(),
            uid: 1000,
        }
    }

    #[test]
    fn expands_known() {
        assert_eq!(
            expand("${HOME}/x/${USER}-${UID}", &v()).unwrap(),
            "/home/ann/x/ann-1000"
        );
        assert_eq!(expand("/a$b/${UID}", &v()).unwrap(), "/a$b/1000");
    }

    #[test]
    fn unknown_and_unterminated() {
        let e = expand("/x/${PATH}", &v()).unwrap_err();
        assert_eq!(e.at, 3);
        assert!(e.message.contains("${PATH}"), "{}", e.message);
        let e = expand("/x/${HOME", &v()).unwrap_err();
        assert_eq!(e.at, 3);
    }

    #[test]
    fn root_from_account_db() {
        let r = Vars::for_uid(0).unwrap();
        assert_eq!(r.uid, 0);
        assert_eq!(r.user, "root");
        assert!(r.home.starts_with('/'));
    }
}
