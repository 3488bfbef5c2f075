//! Who may call what: bearer tokens, roles and per-caller rate limits, shared by
//! every kiln server (coordinator gRPC and HTTP, worker gRPC and HTTP).
//!
//! With TLS, a caller is either a cluster node (a client certificate the cluster CA
//! signed; rustls verified it at the handshake) or a person or program holding a
//! bearer token (`authorization: Bearer kt.<name>.<secret>`). Tokens carry a role;
//! the cluster keeps only a salted BLAKE3 hash of each secret, in the replicated
//! state. Coordinators check tokens against their state; workers against a
//! [`TokenBook`] the leader refreshes with every heartbeat, so that a worker keeps
//! checking tokens while the coordinators are away and a revocation reaches it
//! within one heartbeat; a token it does not hold makes it ask for a heartbeat at
//! once ([`TokenBook::verify_fresh`]). Without TLS (`--insecure`) nothing is checked.

use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Mutex, RwLock};
use std::time::{Duration, Instant};

use kiln_proto::v1::{Role, TokenRecord};
use rand::RngCore;

use crate::{Error, Result};

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
    /// Calling model endpoints.
    Infer,
    /// Reading cluster state.
    Read,
    /// Changing data: writes, jobs, artifacts, deployments.
    Write,
    /// Membership and tokens.
    Admin,
}

impl Permission {
    fn describe(self) -> &'static str {
        match self {
            Permission::Infer => "call model endpoints",
            Permission::Read => "read cluster state",
            Permission::Write => "change data",
            Permission::Admin => "administer the cluster",
        }
    }
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
        Role::Operator => need != Permission::Admin,
        Role::Viewer => need == Permission::Read,
        Role::Inference => need == Permission::Infer,
        // Only through a scoped check (`verify_bearer_scoped`).
        Role::Job | Role::Unspecified => false,
    }
}

/// Returns the lowercase name of a role, as the CLI spells it.
pub fn role_name(role: Role) -> String {
    role.as_str_name()
        .trim_start_matches("ROLE_")
        .to_lowercase()
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
        ..TokenRecord::default()
    };
    (format!("{TOKEN_PREFIX}{name}.{secret}"), record)
}

/// Splits a bearer token into its name and secret.
fn parse(token: &str) -> Option<(&str, &str)> {
    token.strip_prefix(TOKEN_PREFIX)?.rsplit_once('.')
}

/// Returns the `authorization` header of a gRPC request, when it is text.
pub fn grpc_authorization<T>(request: &tonic::Request<T>) -> Option<&str> {
    request.metadata().get("authorization")?.to_str().ok()
}

/// Returns the token name an `authorization` header claims, unverified (for the
/// audit log).
pub fn claimed_name(authorization: Option<&str>) -> Option<String> {
    let (name, _) = parse(authorization?.strip_prefix("Bearer ")?)?;
    validate_name(name).ok()?;
    Some(name.to_string())
}

/// The one answer for an unknown token name and for a known name with another
/// secret, so that names cannot be probed.
const INVALID_TOKEN: &str = "invalid or revoked token";

/// What a job's token (`ROLE_JOB`) may touch, named by the endpoint that is
/// called: its own run (read and write), or its run's experiment (read).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Scope<'a> {
    Run(&'a str),
    Experiment(&'a str),
}

/// Returns the caller that an `authorization` header names, or an error when
/// the token is unknown, wrong, expired, or its role may not do `need`. A job's
/// token may do nothing here: see [`verify_bearer_scoped`].
pub fn verify_bearer(
    authorization: Option<&str>,
    lookup: impl FnOnce(&str) -> Result<Option<TokenRecord>>,
    need: Permission,
    now_ms: u64,
) -> Result<Caller> {
    verify_bearer_scoped(authorization, lookup, need, None, now_ms)
}

/// [`verify_bearer`] for an endpoint about one run or experiment (`scope`): a
/// job's token passes when the run is its job's own (or, to read, when the
/// experiment is its run's).
pub fn verify_bearer_scoped(
    authorization: Option<&str>,
    lookup: impl FnOnce(&str) -> Result<Option<TokenRecord>>,
    need: Permission,
    scope: Option<Scope<'_>>,
    now_ms: u64,
) -> Result<Caller> {
    let header = authorization.ok_or_else(|| {
        Error::Unauthenticated("a bearer token is required: pass --token or set KILN_TOKEN".into())
    })?;
    let token = header.strip_prefix("Bearer ").ok_or_else(|| {
        Error::Unauthenticated("the authorization header is not 'Bearer <token>'".into())
    })?;
    let (name, secret) =
        parse(token).ok_or_else(|| Error::Unauthenticated("malformed token".into()))?;
    let record = lookup(name)?
        // One answer for unknown and revoked names, so names cannot be probed.
        .ok_or_else(|| Error::Unauthenticated(INVALID_TOKEN.into()))?;
    let expected = blake3::Hash::from_bytes(
        record
            .hash
            .as_slice()
            .try_into()
            .map_err(|_| Error::Internal(format!("token record {name} has a bad hash")))?,
    );
    // blake3::Hash compares in constant time.
    if digest(&record.salt, secret) != expected {
        return Err(Error::Unauthenticated(INVALID_TOKEN.into()));
    }
    if record.expires_at_ms != 0 && now_ms >= record.expires_at_ms {
        return Err(Error::Unauthenticated(format!("token {name} has expired")));
    }
    let role = Role::try_from(record.role).unwrap_or(Role::Unspecified);
    let allowed = match role {
        Role::Job => match (scope, need) {
            (Some(Scope::Run(run)), Permission::Read | Permission::Write) => {
                !run.is_empty() && run == record.run_id
            }
            (Some(Scope::Experiment(experiment)), Permission::Read) => {
                !experiment.is_empty() && experiment == record.experiment_id
            }
            _ => false,
        },
        _ => allows(role, need),
    };
    if !allowed {
        return Err(Error::PermissionDenied(if role == Role::Job {
            format!(
                "token {name} is job {}'s own: it may read and write run {} (and read its experiment) through MLflow's API, nothing else",
                record.job_id, record.run_id
            )
        } else {
            format!(
                "token {name} has role {} which may not {}",
                role_name(role),
                need.describe()
            )
        }));
    }
    Ok(Caller::Token {
        name: name.to_string(),
        role,
    })
}

/// The token records a worker checks callers against: a copy of the replicated
/// ones, replaced whole whenever the leader sends a newer version.
///
/// A well-formed token the records do not accept may be newer than them (made or
/// rotated since the last heartbeat): [`TokenBook::verify_fresh`] then asks the
/// agent for a heartbeat at once and checks again with its answer, so a token
/// works on every worker as soon as `kiln token create` returns.
#[derive(Debug)]
pub struct TokenBook {
    inner: RwLock<(u64, HashMap<String, TokenRecord>)>,
    /// Callers wait for a heartbeat started after they asked for one.
    wanted: tokio::sync::Notify,
    /// Sequence number of the last heartbeat started.
    started: AtomicU64,
    /// Sequence number of the last heartbeat answered (records replaced by then).
    answered: tokio::sync::watch::Sender<u64>,
}

impl Default for TokenBook {
    fn default() -> TokenBook {
        TokenBook {
            inner: RwLock::default(),
            wanted: tokio::sync::Notify::new(),
            started: AtomicU64::new(0),
            answered: tokio::sync::watch::Sender::new(0),
        }
    }
}

/// Longest a caller waits for a heartbeat to bring newer token records.
pub const TOKEN_REFRESH_WAIT: Duration = Duration::from_secs(2);

impl TokenBook {
    /// Returns the version of the records held (0: none received yet).
    pub fn version(&self) -> u64 {
        self.inner.read().map(|g| g.0).unwrap_or(0)
    }

    /// Replaces the records with `records` at `version`.
    pub fn replace(&self, version: u64, records: Vec<TokenRecord>) {
        let map = records.into_iter().map(|r| (r.name.clone(), r)).collect();
        if let Ok(mut guard) = self.inner.write() {
            *guard = (version, map);
        }
    }

    /// Checks a bearer header like [`TokenBook::verify`]; when the records do not
    /// hold the token's name or secret, waits (at most [`TOKEN_REFRESH_WAIT`]) for a
    /// heartbeat started after this call and checks again with its records.
    pub async fn verify_fresh(
        &self,
        authorization: Option<&str>,
        need: Permission,
        now_ms: impl Fn() -> u64,
    ) -> Result<Caller> {
        let first = self.verify(authorization, need, now_ms());
        // Only a well-formed token these records hold no match for (an unknown
        // name, or a known name with another secret) may be newer than them.
        let unmatched = matches!(&first, Err(Error::Unauthenticated(m)) if m == INVALID_TOKEN);
        if !unmatched || claimed_name(authorization).is_none() {
            return first;
        }
        let mut answered = self.answered.subscribe();
        let after = self.started.load(Ordering::Acquire);
        self.wanted.notify_one();
        let fresh = answered.wait_for(|&seq| seq > after);
        if tokio::time::timeout(TOKEN_REFRESH_WAIT, fresh)
            .await
            .is_err()
        {
            return first;
        }
        self.verify(authorization, need, now_ms())
    }

    /// Waits until a caller asks for a heartbeat (see [`TokenBook::verify_fresh`]).
    pub async fn refresh_wanted(&self) {
        self.wanted.notified().await;
    }

    /// Records that a heartbeat starts; returns its sequence number for
    /// [`TokenBook::heartbeat_answered`].
    pub fn heartbeat_started(&self) -> u64 {
        self.started.fetch_add(1, Ordering::AcqRel) + 1
    }

    /// Records that heartbeat `seq` was answered and its records (if any) applied.
    pub fn heartbeat_answered(&self, seq: u64) {
        self.answered.send_if_modified(|last| {
            let newer = seq > *last;
            if newer {
                *last = seq;
            }
            newer
        });
    }

    /// Checks a bearer header as [`verify_bearer`] does, against these records.
    pub fn verify(
        &self,
        authorization: Option<&str>,
        need: Permission,
        now_ms: u64,
    ) -> Result<Caller> {
        verify_bearer(
            authorization,
            |name| {
                let guard = self
                    .inner
                    .read()
                    .map_err(|_| Error::Internal("token book lock poisoned".into()))?;
                Ok(guard.1.get(name).cloned())
            },
            need,
            now_ms,
        )
    }
}

/// Token-bucket rate limits per caller: each caller may make `burst` calls at once
/// and `per_sec` a second after that. Callers are token names, so the table is
/// bounded by the tokens that exist; it is also capped at `MAX_CALLERS`, past which
/// the oldest-refilled buckets are dropped (a dropped bucket starts full again).
#[derive(Debug)]
pub struct RateLimiter {
    per_sec: f64,
    burst: f64,
    buckets: Mutex<HashMap<String, (f64, Instant)>>,
    refused: std::sync::atomic::AtomicU64,
}

/// Most callers a [`RateLimiter`] remembers.
const MAX_CALLERS: usize = 10_000;

impl RateLimiter {
    /// Makes a limiter; `per_sec == 0` means no limit.
    pub fn new(per_sec: u32, burst: u32) -> RateLimiter {
        RateLimiter {
            per_sec: f64::from(per_sec),
            burst: f64::from(burst.max(1)),
            buckets: Mutex::new(HashMap::new()),
            refused: std::sync::atomic::AtomicU64::new(0),
        }
    }

    /// Returns how many calls this limiter has refused.
    pub fn refused(&self) -> u64 {
        self.refused.load(std::sync::atomic::Ordering::Relaxed)
    }

    /// Takes one call from `caller`'s bucket, or says how long until one is free.
    pub fn check(&self, caller: &str) -> Result<()> {
        if self.per_sec == 0.0 {
            return Ok(());
        }
        let now = Instant::now();
        let mut buckets = self
            .buckets
            .lock()
            .map_err(|_| Error::Internal("rate limiter lock poisoned".into()))?;
        if buckets.len() >= MAX_CALLERS && !buckets.contains_key(caller) {
            let oldest = buckets
                .iter()
                .min_by_key(|(_, (_, at))| *at)
                .map(|(k, _)| k.clone());
            if let Some(oldest) = oldest {
                buckets.remove(&oldest);
            }
        }
        let (tokens, at) = buckets
            .entry(caller.to_string())
            .or_insert((self.burst, now));
        *tokens = (*tokens + now.duration_since(*at).as_secs_f64() * self.per_sec).min(self.burst);
        *at = now;
        if *tokens >= 1.0 {
            *tokens -= 1.0;
            Ok(())
        } else {
            self.refused
                .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
            let wait_ms = ((1.0 - *tokens) / self.per_sec * 1000.0).ceil() as u64;
            Err(Error::ResourceExhausted(format!(
                "rate limit: {caller} may make {} state-changing calls a second \
                 (bursts of {}); retry in {wait_ms} ms",
                self.per_sec, self.burst
            )))
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn roles_grant_what_the_issue_says() {
        use Permission::*;
        assert!([Admin, Write, Read, Infer]
            .iter()
            .all(|p| allows(Role::Admin, *p)));
        assert!(allows(Role::Operator, Write) && allows(Role::Operator, Read));
        assert!(allows(Role::Operator, Infer) && !allows(Role::Operator, Admin));
        assert!(allows(Role::Viewer, Read) && !allows(Role::Viewer, Write));
        assert!(!allows(Role::Viewer, Infer));
        assert!(allows(Role::Inference, Infer) && !allows(Role::Inference, Read));
    }

    /// An agent stand-in: at each wanted refresh, installs the next of `versions`
    /// (the last one stays) and answers; returns how many heartbeats it made once
    /// `stop` fires.
    fn agent(
        book: std::sync::Arc<TokenBook>,
        versions: Vec<Vec<TokenRecord>>,
        mut stop: tokio::sync::oneshot::Receiver<()>,
    ) -> tokio::task::JoinHandle<usize> {
        tokio::spawn(async move {
            let mut beats = 0usize;
            loop {
                tokio::select! {
                    _ = book.refresh_wanted() => {}
                    _ = &mut stop => return beats,
                }
                let seq = book.heartbeat_started();
                let records = &versions[beats.min(versions.len() - 1)];
                book.replace(beats as u64 + 2, records.clone());
                book.heartbeat_answered(seq);
                beats += 1;
            }
        })
    }

    #[tokio::test]
    async fn a_token_newer_than_the_records_passes_after_one_early_heartbeat() {
        let book = std::sync::Arc::new(TokenBook::default());
        let (old, old_record) = mint("old", Role::Viewer, 1, 0);
        let (new, new_record) = mint("new", Role::Viewer, 1, 0);
        // "old" rotated: same name, another secret.
        let (rotated, rotated_record) = mint("old", Role::Viewer, 1, 0);
        book.replace(1, vec![old_record.clone()]);
        let (stop, stopped) = tokio::sync::oneshot::channel();
        let beats = agent(
            std::sync::Arc::clone(&book),
            vec![
                vec![old_record, new_record.clone()],
                vec![new_record, rotated_record],
            ],
            stopped,
        );
        let bearer = |t: &str| format!("Bearer {t}");
        let now = || 10;

        // Known and right: no heartbeat asked for.
        book.verify_fresh(Some(&bearer(&old)), Permission::Read, now)
            .await
            .expect("old token");
        // Unknown name: one heartbeat brings it.
        book.verify_fresh(Some(&bearer(&new)), Permission::Read, now)
            .await
            .expect("a token made since the last heartbeat");
        // Known name, other secret (rotated since): the refreshed records hold it.
        book.verify_fresh(Some(&bearer(&rotated)), Permission::Read, now)
            .await
            .expect("a rotated token");
        // Still wrong after the refresh: refused, after one more heartbeat.
        let forged = format!("Bearer {TOKEN_PREFIX}new.{}", "0".repeat(43));
        let err = book
            .verify_fresh(Some(&forged), Permission::Read, now)
            .await
            .expect_err("forged");
        assert!(matches!(err, Error::Unauthenticated(_)), "{err}");
        // Malformed, or a right token lacking the permission: no heartbeat.
        assert!(book
            .verify_fresh(Some("Bearer nope"), Permission::Read, now)
            .await
            .is_err());
        let err = book
            .verify_fresh(Some(&bearer(&new)), Permission::Admin, now)
            .await
            .expect_err("a viewer may not administer");
        assert!(matches!(err, Error::PermissionDenied(_)), "{err}");
        stop.send(()).expect("agent running");
        assert_eq!(beats.await.expect("agent"), 3);
    }

    #[tokio::test]
    async fn with_no_heartbeat_an_unknown_token_is_refused_after_the_bounded_wait() {
        let book = TokenBook::default();
        let (token, _) = mint("late", Role::Viewer, 1, 0);
        let started = std::time::Instant::now();
        let err = book
            .verify_fresh(Some(&format!("Bearer {token}")), Permission::Read, || 10)
            .await
            .expect_err("no records");
        assert!(matches!(err, Error::Unauthenticated(_)), "{err}");
        let waited = started.elapsed();
        assert!(
            waited >= TOKEN_REFRESH_WAIT && waited < TOKEN_REFRESH_WAIT * 2,
            "waited {waited:?}"
        );
    }

    #[test]
    fn a_jobs_token_reaches_its_own_run_and_experiment_and_nothing_else() {
        let (token, mut record) = mint("job-7", Role::Job, 1, 0);
        record.run_id = "r1".into();
        record.experiment_id = "3".into();
        record.job_id = 7;
        let header = format!("Bearer {token}");
        let check = |need, scope| {
            verify_bearer_scoped(Some(&header), |_| Ok(Some(record.clone())), need, scope, 10)
        };
        use Permission::*;
        assert!(check(Write, Some(Scope::Run("r1"))).is_ok());
        assert!(check(Read, Some(Scope::Run("r1"))).is_ok());
        assert!(check(Read, Some(Scope::Experiment("3"))).is_ok());
        for (need, scope) in [
            (Write, Some(Scope::Run("r2"))),
            (Read, Some(Scope::Run("r2"))),
            (Read, Some(Scope::Run(""))),
            (Write, Some(Scope::Experiment("3"))),
            (Read, Some(Scope::Experiment("4"))),
            (Read, None),
            (Write, None),
            (Infer, None),
            (Admin, None),
            (Admin, Some(Scope::Run("r1"))),
        ] {
            let err = check(need, scope).expect_err("refused");
            assert!(
                matches!(err, Error::PermissionDenied(_)),
                "{need:?} {scope:?}: {err}"
            );
            assert!(err.to_string().contains("job 7's own"), "{err}");
        }
        // Other roles ignore the scope.
        let (viewer, viewer_record) = mint("v", Role::Viewer, 1, 0);
        let header = format!("Bearer {viewer}");
        assert!(verify_bearer_scoped(
            Some(&header),
            |_| Ok(Some(viewer_record.clone())),
            Read,
            Some(Scope::Run("anything")),
            10
        )
        .is_ok());
        assert!(!allows(Role::Job, Read) && !allows(Role::Job, Write));
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

    #[test]
    fn a_token_book_checks_and_forgets() {
        let book = TokenBook::default();
        let (token, record) = mint("svc", Role::Inference, 1, 0);
        let header = format!("Bearer {token}");
        assert!(matches!(
            book.verify(Some(&header), Permission::Infer, 2),
            Err(Error::Unauthenticated(_))
        ));
        book.replace(7, vec![record]);
        assert_eq!(book.version(), 7);
        let caller = book
            .verify(Some(&header), Permission::Infer, 2)
            .expect("valid");
        assert_eq!(caller.name(), "token:svc");
        assert!(matches!(
            book.verify(Some(&header), Permission::Write, 2),
            Err(Error::PermissionDenied(_))
        ));
        // Revoked: the next version no longer holds it.
        book.replace(8, vec![]);
        assert!(matches!(
            book.verify(Some(&header), Permission::Infer, 2),
            Err(Error::Unauthenticated(_))
        ));
    }

    #[test]
    fn a_rate_limiter_allows_bursts_then_the_rate() {
        let limiter = RateLimiter::new(10, 5);
        for _ in 0..5 {
            limiter.check("a").expect("within the burst");
        }
        let e = limiter.check("a").expect_err("burst spent");
        assert!(matches!(e, Error::ResourceExhausted(_)), "{e}");
        limiter.check("b").expect("each caller has its own bucket");
        std::thread::sleep(std::time::Duration::from_millis(120));
        limiter.check("a").expect("refilled at 10/s");
        assert!(
            RateLimiter::new(0, 0).check("x").is_ok(),
            "0 means no limit"
        );
    }
}
