//! Who may call what: scoped bearer tokens.
//!
//! Callers send `authorization: Bearer <token>`. The tokens file (TOML, named by
//! `FLASHSALE_TOKENS_FILE`) keeps only each token's SHA-256, with a name (for logs, never the
//! token) and its scopes:
//!
//! ```toml
//! [[token]]
//! name = "storefront"
//! sha256 = "<lowercase hex SHA-256 of the token's UTF-8 bytes>"
//! scopes = ["checkout"]
//! ```
//!
//! `checkout` covers every CheckoutService RPC but HandlePaymentWebhook, which takes
//! `payments`; `admin` covers InventoryAdminService. Health and reflection stay open. A
//! presented token is hashed and compared with every known hash in constant time. Without a
//! tokens file every caller may call everything ([`Authorizer::open`]); the command line
//! allows that on loopback addresses only.

use std::path::{Path, PathBuf};
use std::sync::{Arc, RwLock};

use base64::Engine;
use serde::Deserialize;
use sha2::{Digest, Sha256};
use subtle::ConstantTimeEq;

use crate::domain::{Caller, DomainError};

/// What a token may do.
#[derive(
    Debug,
    Clone,
    Copy,
    PartialEq,
    Eq,
    Hash,
    Deserialize,
    strum::EnumString,
    strum::IntoStaticStr,
    strum::Display,
)]
#[serde(rename_all = "snake_case")]
#[strum(serialize_all = "snake_case")]
pub enum Scope {
    /// Every CheckoutService RPC except HandlePaymentWebhook.
    Checkout,
    /// HandlePaymentWebhook: what the payment adapter sends.
    Payments,
    /// InventoryAdminService.
    Admin,
}

/// One entry of the tokens file.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct TokenEntry {
    name: String,
    sha256: String,
    scopes: Vec<Scope>,
}

/// The tokens file.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct TokensFile {
    #[serde(default)]
    token: Vec<TokenEntry>,
}

/// Longest token name, in bytes.
const MAX_NAME_BYTES: usize = 64;

/// A known token: its name, its hash, its scopes.
#[derive(Debug, Clone)]
struct KnownToken {
    /// Its name: the caller its holder is, shown in logs (the token itself never is) and
    /// owning the keys its holder sends.
    caller: Caller,
    /// SHA-256 of the token's bytes.
    digest: [u8; 32],
    /// What it may do.
    scopes: Vec<Scope>,
}

/// Why a tokens file was refused.
#[derive(Debug, thiserror::Error)]
pub enum TokensFileError {
    #[error("cannot read the tokens file {path}: {source}")]
    Read {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("the tokens file {path} is not valid: {reason}")]
    Invalid { path: PathBuf, reason: String },
}

/// The set of known tokens, as read from one version of the file.
#[derive(Debug, Clone, Default)]
pub struct TokenSet {
    /// Every token of the file.
    tokens: Vec<KnownToken>,
}

impl TokenSet {
    /// Reads and checks a tokens file.
    pub fn load(path: &Path) -> Result<TokenSet, TokensFileError> {
        let text = std::fs::read_to_string(path).map_err(|source| TokensFileError::Read {
            path: path.to_owned(),
            source,
        })?;
        TokenSet::parse(&text).map_err(|reason| TokensFileError::Invalid {
            path: path.to_owned(),
            reason,
        })
    }

    /// Parses the file's text; the reason names the entry at fault.
    fn parse(text: &str) -> Result<TokenSet, String> {
        let file: TokensFile = toml::from_str(text).map_err(|error| error.to_string())?;
        let mut tokens: Vec<KnownToken> = Vec::with_capacity(file.token.len());
        for entry in file.token {
            let name = parse_token_name(&entry.name)?;
            if tokens.iter().any(|t| t.caller.name() == name) {
                return Err(format!("token name {name:?} is repeated"));
            }
            if entry.scopes.is_empty() {
                return Err(format!("token {:?} has no scopes", entry.name));
            }
            let digest = parse_digest(&entry.sha256).ok_or_else(|| {
                format!(
                    "token {:?}: sha256 must be 64 lowercase hex digits",
                    entry.name
                )
            })?;
            tokens.push(KnownToken {
                caller: Caller::named(&name),
                digest,
                scopes: entry.scopes,
            });
        }
        Ok(TokenSet { tokens })
    }

    /// The token presented, if known: every known hash is compared, in constant time.
    fn find(&self, presented: &str) -> Option<&KnownToken> {
        let digest: [u8; 32] = Sha256::digest(presented.as_bytes()).into();
        let mut found = None;
        for token in &self.tokens {
            if bool::from(token.digest.ct_eq(&digest)) {
                found = Some(token);
            }
        }
        found
    }

    /// How many tokens it knows.
    pub fn len(&self) -> usize {
        self.tokens.len()
    }

    /// Whether it knows none.
    pub fn is_empty(&self) -> bool {
        self.tokens.is_empty()
    }
}

/// A token's name as the tokens file and `flashsale token --name` accept it: not blank, at
/// most [`MAX_NAME_BYTES`], no control characters (it appears in logs).
pub fn parse_token_name(name: &str) -> Result<String, String> {
    if name.trim().is_empty() {
        return Err("a token name must not be empty".into());
    }
    if name.len() > MAX_NAME_BYTES || name.chars().any(char::is_control) {
        return Err(format!(
            "token name {name:?} must be at most {MAX_NAME_BYTES} bytes, without control characters"
        ));
    }
    Ok(name.to_owned())
}

/// 64 lowercase hex digits as 32 bytes.
fn parse_digest(hex: &str) -> Option<[u8; 32]> {
    let bytes = hex.as_bytes();
    if bytes.len() != 64
        || !bytes
            .iter()
            .all(|b| b.is_ascii_digit() || (b'a'..=b'f').contains(b))
    {
        return None;
    }
    let mut digest = [0u8; 32];
    for (i, pair) in bytes.chunks(2).enumerate() {
        digest[i] = u8::from_str_radix(std::str::from_utf8(pair).ok()?, 16).ok()?;
    }
    Some(digest)
}

/// Decides whether a call may proceed; the tokens can be re-read while serving.
pub struct Authorizer {
    /// The tokens file; `None`: the server is open.
    path: Option<PathBuf>,
    /// The tokens currently in force.
    tokens: RwLock<Arc<TokenSet>>,
}

impl Authorizer {
    /// Every caller may call everything.
    pub fn open() -> Authorizer {
        Authorizer {
            path: None,
            tokens: RwLock::new(Arc::default()),
        }
    }

    /// Only holders of the tokens in `path` may call, each within its scopes.
    pub fn from_file(path: &Path) -> Result<Authorizer, TokensFileError> {
        let tokens = TokenSet::load(path)?;
        Ok(Authorizer {
            path: Some(path.to_owned()),
            tokens: RwLock::new(Arc::new(tokens)),
        })
    }

    /// Re-reads the tokens file (on SIGHUP). A file that cannot be read or parsed keeps the
    /// tokens in force; the error says why.
    pub fn reload(&self) -> Result<usize, TokensFileError> {
        let Some(path) = &self.path else {
            return Ok(0);
        };
        let tokens = TokenSet::load(path)?;
        let count = tokens.len();
        *self.tokens.write().unwrap_or_else(|e| e.into_inner()) = Arc::new(tokens);
        Ok(count)
    }

    /// Checks the `authorization` header of a call that needs `scope`; who is calling.
    pub fn authorize(
        &self,
        headers: &http::HeaderMap,
        scope: Scope,
    ) -> Result<Caller, DomainError> {
        if self.path.is_none() {
            return Ok(Caller::anonymous());
        }
        let presented = headers
            .get(http::header::AUTHORIZATION)
            .and_then(|value| value.to_str().ok())
            .and_then(|value| value.strip_prefix("Bearer "))
            .ok_or(DomainError::Unauthenticated)?;
        let tokens = self
            .tokens
            .read()
            .unwrap_or_else(|e| e.into_inner())
            .clone();
        let token = tokens
            .find(presented.trim())
            .ok_or(DomainError::Unauthenticated)?;
        if !token.scopes.contains(&scope) {
            return Err(DomainError::MissingScope {
                token: token.caller.name().to_owned(),
                scope: scope.into(),
            });
        }
        Ok(token.caller.clone())
    }
}

/// A new random token (256 bits, URL-safe base64) and its `[[token]]` entry.
pub fn new_token(name: &str, scopes: &[Scope]) -> Result<(String, String), getrandom::Error> {
    let mut secret = [0u8; 32];
    getrandom::fill(&mut secret)?;
    let token = base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(secret);
    let digest = Sha256::digest(token.as_bytes());
    let hex: String = digest.iter().map(|byte| format!("{byte:02x}")).collect();
    let scopes: Vec<String> = scopes.iter().map(|scope| format!("\"{scope}\"")).collect();
    let entry = format!(
        "[[token]]\nname = {}\nsha256 = \"{hex}\"\nscopes = [{}]\n",
        toml::Value::String(name.to_owned()),
        scopes.join(", ")
    );
    Ok((token, entry))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_new_token_is_found_by_its_own_entry_and_no_other() {
        let (token, entry) = new_token("storefront", &[Scope::Checkout]).unwrap();
        assert!(token.len() >= 43, "at least 256 bits: {token}");
        assert!(
            token
                .chars()
                .all(|c| c.is_ascii_alphanumeric() || c == '-' || c == '_')
        );
        let set = TokenSet::parse(&entry).unwrap();
        let found = set.find(&token).expect("its own token");
        assert_eq!(found.caller.name(), "storefront");
        assert_eq!(found.scopes, vec![Scope::Checkout]);
        assert!(set.find(&format!("{token}x")).is_none());
    }

    #[test]
    fn a_malformed_file_is_refused_naming_the_entry() {
        for (text, fault) in [
            (
                "[[token]]\nname = \"a\"\nsha256 = \"ABC\"\nscopes = [\"checkout\"]\n",
                "sha256",
            ),
            (
                "[[token]]\nname = \"a\"\nsha256 = \"\"\nscopes = []\n",
                "no scopes",
            ),
            (
                "[[token]]\nname = \"a\"\nsha256 = \"\"\nscopes = [\"root\"]\n",
                "root",
            ),
            (
                "[[token]]\nname = \"\"\nsha256 = \"\"\nscopes = [\"admin\"]\n",
                "empty",
            ),
            (
                "[[token]]\nname = \"a\\u0007b\"\nsha256 = \"\"\nscopes = [\"admin\"]\n",
                "control characters",
            ),
        ] {
            let error = TokenSet::parse(text).expect_err(text);
            assert!(error.contains(fault), "{text:?}: {error}");
        }
    }
}
