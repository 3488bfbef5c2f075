//! Who may call what.
//!
//! With TLS, a caller is either a cluster node (a client certificate the cluster CA
//! signed; rustls verified it at the handshake) or a person or program holding a
//! bearer token (`authorization: Bearer kt.<name>.<secret>`). Tokens carry a role;
//! the cluster keeps only a salted BLAKE3 hash of each secret, in the replicated
//! state, so every coordinator checks tokens locally and a revocation holds on a
//! coordinator as soon as it has applied it. Without TLS (`--insecure`) nothing is
//! checked.

use kiln_common::{Error, Result};
use kiln_proto::v1::{Role, TokenRecord};
use rand::RngCore;

use crate::state::reader::StateReader;

/// Prefix of every kiln bearer token.
pub const TOKEN_PREFIX: &str = "kt.";
/// Longest token name.
const MAX_NAME_BYTES: usize = 64;
/// Bytes of randomness in a token secret and its salt.
const SECRET_BYTES: usize = 32;
const SALT_BYTES: usize = 16;

/// What a call needs.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Permission {
    /// Reading cluster state.
    Read,
    /// Changing data: writes, jobs, artifacts, deployments.
    Write,
    /// Membership and tokens.
    Admin,
}

/// Who made a call.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Caller {
    /// No TLS: nothing is known and nothing is checked.
    Insecure,
    /// A cluster node, by its certificate.
    Node,
    /// A token holder.
    Token { name: String, role: Role },
}

impl Caller {
    /// Returns the name the audit trail and logs use for this caller.
    pub fn name(&self) -> String {
        match self {
            Caller::Insecure => "insecure".into(),
            Caller::Node => "node".into(),
            Caller::Token { name, .. } => format!("token:{name}"),
        }
    }
}

/// Returns true when `role` grants `need`.
pub fn allows(role: Role, need: Permission) -> bool {
    match role {
        Role::Admin => true,
        Role::Operator => matches!(need, Permission::Read | Permission::Write),
        Role::Viewer => need == Permission::Read,
        Role::Inference | Role::Unspecified => false,
    }
}

/// Checks a token name: 1 to 64 letters, digits, '-' or '_'.
pub fn validate_name(name: &str) -> Result<()> {
    let ok = !name.is_empty()
        && name.len() <= MAX_NAME_BYTES
        && name
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || c == '-' || c == '_');
    if ok {
        Ok(())
    } else {
        Err(Error::InvalidArgument(format!(
            "token name '{name}' must be 1 to {MAX_NAME_BYTES} letters, digits, '-' or '_'"
        )))
    }
}

fn digest(salt: &[u8], secret: &str) -> blake3::Hash {
    let mut hasher = blake3::Hasher::new();
    hasher.update(salt);
    hasher.update(secret.as_bytes());
    hasher.finalize()
}

/// Makes a new token: returns the bearer text (shown once) and the record to keep.
pub fn mint(
    name: &str,
    role: Role,
    created_at_ms: u64,
    expires_at_ms: u64,
) -> (String, TokenRecord) {
    let mut rng = rand::thread_rng();
    let mut secret = [0u8; SECRET_BYTES];
    rng.fill_bytes(&mut secret);
    let mut salt = [0u8; SALT_BYTES];
    rng.fill_bytes(&mut salt);
    let secret: String = secret.iter().map(|b| format!("{b:02x}")).collect();
    let record = TokenRecord {
        name: name.to_string(),
        role: role as i32,
        salt: salt.to_vec(),
        hash: digest(&salt, &secret).as_bytes().to_vec(),
        created_at_ms,
        expires_at_ms,
    };
    (format!("{TOKEN_PREFIX}{name}.{secret}"), record)
}

/// Splits a bearer token into its name and secret.
fn parse(token: &str) -> Option<(&str, &str)> {
    token.strip_prefix(TOKEN_PREFIX)?.rsplit_once('.')
}

/// Returns the token name a request claims, unverified (for the audit log).
pub fn claimed_name<T>(request: &tonic::Request<T>) -> Option<String> {
    let header = request.metadata().get("authorization")?.to_str().ok()?;
    let (name, _) = parse(header.strip_prefix("Bearer ")?)?;
    validate_name(name).ok()?;
    Some(name.to_string())
}

/// Returns the caller of `request`, or an error when it may not do `need`.
pub fn authorize<T>(
    request: &tonic::Request<T>,
    tls_enabled: bool,
    reader: &StateReader,
    need: Permission,
    now_ms: u64,
) -> Result<Caller> {
    if !tls_enabled {
        return Ok(Caller::Insecure);
    }
    if kiln_common::tls::is_node(request) {
        return Ok(Caller::Node);
    }
    let header = request
        .metadata()
        .get("authorization")
        .ok_or_else(|| {
            Error::Unauthenticated(
                "a bearer token is required: pass --token or set KILN_TOKEN".into(),
            )
        })?
        .to_str()
        .map_err(|_| Error::Unauthenticated("the authorization header is not text".into()))?;
    let token = header.strip_prefix("Bearer ").ok_or_else(|| {
        Error::Unauthenticated("the authorization header is not 'Bearer <token>'".into())
    })?;
    let (name, secret) =
        parse(token).ok_or_else(|| Error::Unauthenticated("malformed token".into()))?;
    let record = reader
        .token(name)
        .map_err(|e| Error::Internal(e.to_string()))?
        // One answer for unknown and revoked names, so names cannot be probed.
        .ok_or_else(|| Error::Unauthenticated("invalid or revoked token".into()))?;
    let expected = blake3::Hash::from_bytes(
        record
            .hash
            .as_slice()
            .try_into()
            .map_err(|_| Error::Internal(format!("token record {name} has a bad hash")))?,
    );
    // blake3::Hash compares in constant time.
    if digest(&record.salt, secret) != expected {
        return Err(Error::Unauthenticated("invalid or revoked token".into()));
    }
    if record.expires_at_ms != 0 && now_ms >= record.expires_at_ms {
        return Err(Error::Unauthenticated(format!("token {name} has expired")));
    }
    let role = Role::try_from(record.role).unwrap_or(Role::Unspecified);
    if !allows(role, need) {
        return Err(Error::PermissionDenied(format!(
            "token {name} has role {} which may not {}",
            role.as_str_name()
                .trim_start_matches("ROLE_")
                .to_lowercase(),
            match need {
                Permission::Read => "read cluster state",
                Permission::Write => "change data",
                Permission::Admin => "administer the cluster",
            }
        )));
    }
    Ok(Caller::Token {
        name: name.to_string(),
        role,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn roles_grant_what_the_issue_says() {
        use Permission::*;
        assert!(
            allows(Role::Admin, Admin) && allows(Role::Admin, Write) && allows(Role::Admin, Read)
        );
        assert!(allows(Role::Operator, Write) && allows(Role::Operator, Read));
        assert!(!allows(Role::Operator, Admin));
        assert!(allows(Role::Viewer, Read) && !allows(Role::Viewer, Write));
        assert!(!allows(Role::Inference, Read));
    }

    #[test]
    fn minted_tokens_verify_and_keep_no_secret() {
        let (token, record) = mint("ci", Role::Viewer, 1, 0);
        let (name, secret) = parse(&token).expect("parse");
        assert_eq!(name, "ci");
        assert_eq!(
            digest(&record.salt, secret).as_bytes().as_slice(),
            record.hash.as_slice()
        );
        assert_ne!(
            digest(&record.salt, "wrong").as_bytes().as_slice(),
            record.hash.as_slice()
        );
        let encoded = prost::Message::encode_to_vec(&record);
        assert!(
            !encoded
                .windows(secret.len())
                .any(|w| w == secret.as_bytes()),
            "the record must not hold the secret"
        );
        let (other, _) = mint("ci", Role::Viewer, 1, 0);
        assert_ne!(token, other, "secrets are random");
    }

    #[test]
    fn names_are_checked() {
        assert!(validate_name("ci-bot_1").is_ok());
        assert!(validate_name("").is_err());
        assert!(validate_name("a.b").is_err(), "a dot would break parsing");
        assert!(validate_name(&"x".repeat(65)).is_err());
    }
}
