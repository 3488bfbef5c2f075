//! `kiln certs`: the cluster CA and node certificates signed by it.
//!
//! `init` makes `ca.pem` and `ca-key.pem` in a directory; `issue` signs a node
//! certificate (`NAME.pem`, `NAME-key.pem`) for the names and addresses it will be
//! reached at, usable both as a TLS server and as a TLS client (mutual TLS).
//! Private keys are written with mode 0600 and never overwritten.

use std::io::Write as _;
use std::os::unix::fs::OpenOptionsExt as _;
use std::path::{Path, PathBuf};

use anyhow::{bail, Context as _};
use rcgen::{
    BasicConstraints, CertificateParams, DnType, ExtendedKeyUsagePurpose, IsCa, KeyPair,
    KeyUsagePurpose,
};

/// File name of the CA certificate.
pub const CA_CERT: &str = "ca.pem";
/// File name of the CA key.
pub const CA_KEY: &str = "ca-key.pem";
/// Common name of every kiln cluster CA; issuing rebuilds the issuer from it.
const CA_NAME: &str = "kiln cluster CA";
/// Validity of the CA and of node certificates, in days.
const CA_VALID_DAYS: i64 = 3650;
const NODE_VALID_DAYS: i64 = 825;

/// Paths of one certificate and its key.
#[derive(Debug, Clone)]
pub struct Issued {
    pub cert: PathBuf,
    pub key: PathBuf,
}

fn ca_params(days: i64) -> anyhow::Result<CertificateParams> {
    let mut params = CertificateParams::new(Vec::<String>::new()).context("make CA parameters")?;
    params.distinguished_name.push(DnType::CommonName, CA_NAME);
    params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    params.key_usages = vec![
        KeyUsagePurpose::KeyCertSign,
        KeyUsagePurpose::CrlSign,
        KeyUsagePurpose::DigitalSignature,
    ];
    set_validity(&mut params, days);
    Ok(params)
}

fn set_validity(params: &mut CertificateParams, days: i64) {
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_secs() as i64);
    let day = now / 86_400;
    let (y, m, d) = civil_from_days(day - 1);
    params.not_before = rcgen::date_time_ymd(y, m, d);
    let (y, m, d) = civil_from_days(day + days);
    params.not_after = rcgen::date_time_ymd(y, m, d);
}

/// Converts days since 1970-01-01 to a (year, month, day) civil date.
fn civil_from_days(days: i64) -> (i32, u8, u8) {
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z.rem_euclid(146_097);
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let d = (doy - (153 * mp + 2) / 5 + 1) as u8;
    let m = if mp < 10 { mp + 3 } else { mp - 9 } as u8;
    let y = yoe + era * 400 + i64::from(m <= 2);
    (y as i32, m, d)
}

/// Writes a new file with `mode`; refuses to replace one.
pub fn write_new(path: &Path, contents: &str, mode: u32) -> anyhow::Result<()> {
    let mut file = std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(mode)
        .open(path)
        .with_context(|| format!("create {} (it must not exist yet)", path.display()))?;
    file.write_all(contents.as_bytes())
        .and_then(|()| file.sync_all())
        .with_context(|| format!("write {}", path.display()))
}

/// Makes a new cluster CA in `dir`; refuses if one is there already.
pub fn init(dir: &Path) -> anyhow::Result<Issued> {
    let cert = dir.join(CA_CERT);
    let key = dir.join(CA_KEY);
    if cert.exists() || key.exists() {
        bail!("a cluster CA exists already in {}", dir.display());
    }
    std::fs::create_dir_all(dir).with_context(|| format!("create {}", dir.display()))?;
    let key_pair = KeyPair::generate().context("generate CA key")?;
    let ca = ca_params(CA_VALID_DAYS)?
        .self_signed(&key_pair)
        .context("sign CA certificate")?;
    write_new(&key, &key_pair.serialize_pem(), 0o600)?;
    write_new(&cert, &ca.pem(), 0o644)?;
    Ok(Issued { cert, key })
}

/// Signs a certificate for node `name`, valid for `sans` (DNS names or IP
/// addresses), with the CA in `dir`.
pub fn issue(dir: &Path, name: &str, sans: &[String]) -> anyhow::Result<Issued> {
    if name.is_empty()
        || !name
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || c == '-' || c == '_' || c == '.')
    {
        bail!("node name '{name}' must be letters, digits, '-', '_' or '.'");
    }
    if sans.is_empty() {
        bail!("give at least one --san: the host names or addresses the node is reached at");
    }
    let ca_key_pem = std::fs::read_to_string(dir.join(CA_KEY)).with_context(|| {
        format!(
            "read CA key {} (run kiln certs init)",
            dir.join(CA_KEY).display()
        )
    })?;
    let ca_key = KeyPair::from_pem(&ca_key_pem).context("parse CA key")?;
    // The issuer is identified by its name and key, both fixed for a kiln CA.
    let issuer = ca_params(CA_VALID_DAYS)?
        .self_signed(&ca_key)
        .context("rebuild CA issuer")?;
    let mut params = CertificateParams::new(sans.to_vec())
        .with_context(|| format!("subject alternative names {sans:?}"))?;
    params.distinguished_name.push(DnType::CommonName, name);
    params.key_usages = vec![
        KeyUsagePurpose::DigitalSignature,
        KeyUsagePurpose::KeyEncipherment,
    ];
    params.extended_key_usages = vec![
        ExtendedKeyUsagePurpose::ServerAuth,
        ExtendedKeyUsagePurpose::ClientAuth,
    ];
    set_validity(&mut params, NODE_VALID_DAYS);
    let key_pair = KeyPair::generate().context("generate node key")?;
    let cert = params
        .signed_by(&key_pair, &issuer, &ca_key)
        .context("sign node certificate")?;
    let out = Issued {
        cert: dir.join(format!("{name}.pem")),
        key: dir.join(format!("{name}-key.pem")),
    };
    write_new(&out.key, &key_pair.serialize_pem(), 0o600)?;
    write_new(&out.cert, &cert.pem(), 0o644)?;
    Ok(out)
}

/// Makes what is missing in `dir`: the CA, then a certificate for each of
/// `nodes` valid for its own name and `sans`; returns the files made. Existing
/// files are kept (a node whose certificate or key is there is skipped).
pub fn ensure(dir: &Path, nodes: &[String], sans: &[String]) -> anyhow::Result<Vec<PathBuf>> {
    let mut made = Vec::new();
    let (cert, key) = (dir.join(CA_CERT), dir.join(CA_KEY));
    match (cert.exists(), key.exists()) {
        (true, true) => {}
        (false, false) => {
            let ca = init(dir)?;
            made.extend([ca.cert, ca.key]);
        }
        _ => bail!(
            "{} holds half a CA ({} or {} is missing): restore it or start afresh",
            dir.display(),
            CA_CERT,
            CA_KEY
        ),
    }
    for node in nodes {
        if dir.join(format!("{node}.pem")).exists() || dir.join(format!("{node}-key.pem")).exists()
        {
            continue;
        }
        let names: Vec<String> = std::iter::once(node.clone())
            .chain(sans.iter().filter(|s| *s != node).cloned())
            .collect();
        let issued = issue(dir, node, &names)?;
        made.extend([issued.cert, issued.key]);
    }
    Ok(made)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn civil_dates() {
        assert_eq!(civil_from_days(0), (1970, 1, 1));
        assert_eq!(civil_from_days(20_698), (2026, 9, 2));
        assert_eq!(civil_from_days(11_016), (2000, 2, 29));
        assert_eq!(civil_from_days(-1), (1969, 12, 31));
    }

    #[test]
    fn init_then_issue_and_refuse_to_overwrite() {
        let dir = tempfile::tempdir().expect("temp dir");
        let ca = init(dir.path()).expect("init");
        assert!(
            init(dir.path()).is_err(),
            "a second init must not replace the CA"
        );
        let node = issue(
            dir.path(),
            "node-1",
            &["127.0.0.1".into(), "localhost".into()],
        )
        .expect("issue");
        let mode = std::fs::metadata(&node.key).expect("key").permissions();
        assert_eq!(
            std::os::unix::fs::PermissionsExt::mode(&mode) & 0o777,
            0o600
        );
        assert!(std::fs::read_to_string(&ca.cert)
            .expect("ca")
            .contains("BEGIN CERTIFICATE"));
        assert!(
            issue(dir.path(), "node-1", &["127.0.0.1".into()]).is_err(),
            "no overwrite"
        );
        assert!(issue(dir.path(), "bad/name", &["x".into()]).is_err());
        assert!(issue(dir.path(), "n2", &[]).is_err());
    }

    #[test]
    fn ensure_makes_only_what_is_missing() {
        let dir = tempfile::tempdir().expect("temp dir");
        let nodes = ["c-1".to_string(), "w-1".to_string()];
        let made = ensure(dir.path(), &nodes, &["localhost".into()]).expect("ensure");
        assert_eq!(made.len(), 6, "{made:?}");
        let ca = std::fs::read(dir.path().join(CA_CERT)).expect("ca");
        let c1 = std::fs::read(dir.path().join("c-1.pem")).expect("c-1");
        let again = ["c-1".to_string(), "w-1".to_string(), "w-2".to_string()];
        let made = ensure(dir.path(), &again, &["localhost".into()]).expect("ensure again");
        assert_eq!(
            made,
            vec![dir.path().join("w-2.pem"), dir.path().join("w-2-key.pem")]
        );
        assert_eq!(std::fs::read(dir.path().join(CA_CERT)).expect("ca"), ca);
        assert_eq!(std::fs::read(dir.path().join("c-1.pem")).expect("c-1"), c1);
        std::fs::remove_file(dir.path().join(CA_KEY)).expect("remove the CA key");
        let error = ensure(dir.path(), &nodes, &[]).expect_err("half a CA");
        assert!(error.to_string().contains("half a CA"), "{error}");
    }
}
