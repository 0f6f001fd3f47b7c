//! Per-cluster rdkafka configuration: the properties shared by every client
//! ([`KafkaProperties`]), locally resolved security profiles
//! ([`SecurityProfiles`]) and [`client_config`], which combines them with a
//! [`ClusterSpec`] into an rdkafka [`ClientConfig`].
//!
//! Secrets never live in the registry: a spec only *names* a profile, and the
//! profile's properties come from a local file or environment variables.

use std::collections::BTreeMap;
use std::fmt;
use std::path::Path;

use rdkafka::error::KafkaError as RdKafkaError;
use rdkafka::ClientConfig;

use crate::kafka::error::KafkaError;
use crate::registry::ClusterSpec;

/// Environment variable naming the security profile file.
pub const PROFILES_FILE_ENV: &str = "FLOTILLA_SECURITY_PROFILES";

/// Prefix of per-property profile environment variables:
/// `FLOTILLA_PROFILE_<NAME>_<PROPERTY>`, e.g. `FLOTILLA_PROFILE_PROD_SASL_PASSWORD`
/// sets `sasl.password` of profile `prod`.
pub const PROFILE_ENV_PREFIX: &str = "FLOTILLA_PROFILE_";

/// Default `client.id` prefix when the base properties set none.
pub const DEFAULT_CLIENT_ID: &str = "flotilla";

/// Flotilla's default for librdkafka's `reconnect.backoff.max.ms` (librdkafka:
/// 10 000), applied to every per-cluster client (producer, consumer, admin)
/// unless the properties or the security profile set it.
///
/// librdkafka doubles the wait between reconnection attempts to a broker from
/// `reconnect.backoff.ms` (100 ms, left as librdkafka has it) up to this cap.
/// After a Kafka cluster restart its clients had backed off to ~10 s, so a
/// route switch right after the restart waited that long for the boundary
/// read and the producers' flush (live chaos run: ~10 s; 0.47 s with 1 s).
/// When `reconnect.backoff.ms` is set above it, the cap is raised to that
/// value (librdkafka refuses a cap below the initial backoff).
pub const DEFAULT_RECONNECT_BACKOFF_MAX_MS: u64 = 1_000;

/// Applies flotilla's librdkafka defaults to `cfg` where it does not set the
/// property itself: [`DEFAULT_RECONNECT_BACKOFF_MAX_MS`].
fn apply_client_defaults(cfg: &mut ClientConfig) {
    if cfg.get("reconnect.backoff.max.ms").is_none() {
        let initial = cfg
            .get("reconnect.backoff.ms")
            .and_then(|v| v.trim().parse::<u64>().ok())
            .unwrap_or(0);
        let max = DEFAULT_RECONNECT_BACKOFF_MAX_MS.max(initial);
        cfg.set("reconnect.backoff.max.ms", max.to_string());
    }
}

/// An ordered map of rdkafka properties (`key → value`), like rdkafka's
/// [`ClientConfig`] but cloneable, comparable and printable without leaking
/// secrets: `Debug` redacts values of keys that look secret.
///
/// Serializes as a JSON object of strings.
#[derive(Clone, Default, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(transparent)]
pub struct KafkaProperties {
    props: BTreeMap<String, String>,
}

impl KafkaProperties {
    /// An empty set of properties.
    pub fn new() -> Self {
        Self::default()
    }

    /// Sets `key` to `value`, replacing any previous value.
    pub fn set(&mut self, key: impl Into<String>, value: impl Into<String>) -> &mut Self {
        self.props.insert(key.into(), value.into());
        self
    }

    /// Builder form of [`KafkaProperties::set`].
    pub fn with(mut self, key: impl Into<String>, value: impl Into<String>) -> Self {
        self.set(key, value);
        self
    }

    /// The value of `key`, if set.
    pub fn get(&self, key: &str) -> Option<&str> {
        self.props.get(key).map(String::as_str)
    }

    /// Removes `key`, returning its value.
    pub fn remove(&mut self, key: &str) -> Option<String> {
        self.props.remove(key)
    }

    /// Number of properties.
    pub fn len(&self) -> usize {
        self.props.len()
    }

    /// Whether no property is set.
    pub fn is_empty(&self) -> bool {
        self.props.is_empty()
    }

    /// The properties in key order.
    pub fn iter(&self) -> impl Iterator<Item = (&str, &str)> {
        self.props.iter().map(|(k, v)| (k.as_str(), v.as_str()))
    }

    /// Sets every property of `other` on `self` (values of `other` win).
    pub fn merge(&mut self, other: &KafkaProperties) -> &mut Self {
        for (k, v) in other.iter() {
            self.set(k, v);
        }
        self
    }

    /// Sets every property on an rdkafka [`ClientConfig`].
    pub fn apply_to(&self, config: &mut ClientConfig) {
        for (k, v) in self.iter() {
            config.set(k, v);
        }
    }

    /// A fresh rdkafka [`ClientConfig`] holding these properties.
    pub fn to_client_config(&self) -> ClientConfig {
        let mut c = ClientConfig::new();
        self.apply_to(&mut c);
        c
    }
}

impl<K: Into<String>, V: Into<String>> FromIterator<(K, V)> for KafkaProperties {
    fn from_iter<I: IntoIterator<Item = (K, V)>>(iter: I) -> Self {
        let mut p = KafkaProperties::new();
        for (k, v) in iter {
            p.set(k, v);
        }
        p
    }
}

/// Whether a property's value must not be printed.
pub fn is_secret_key(key: &str) -> bool {
    let k = key.to_ascii_lowercase();
    [
        "password",
        "secret",
        "key.pem",
        "token",
        "jaas",
        "credentials",
    ]
    .iter()
    .any(|s| k.contains(s))
}

impl fmt::Debug for KafkaProperties {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let mut m = f.debug_map();
        for (k, v) in self.iter() {
            if is_secret_key(k) {
                m.entry(&k, &"<redacted>");
            } else {
                m.entry(&k, &v);
            }
        }
        m.finish()
    }
}

/// The environment-variable spelling of a profile name: upper case, every
/// character that is not a letter or digit replaced by `_`.
pub fn profile_env_name(profile: &str) -> String {
    profile
        .chars()
        .map(|c| {
            if c.is_ascii_alphanumeric() {
                c.to_ascii_uppercase()
            } else {
                '_'
            }
        })
        .collect()
}

/// Named security profiles (`name → rdkafka properties`), resolved locally,
/// never read from the registry.
///
/// Sources, later ones overriding earlier ones property by property:
/// 1. a file named by `FLOTILLA_SECURITY_PROFILES`: JSON
///    (`{"prod": {"security.protocol": "SASL_SSL", ...}}`) or a TOML-like
///    form (`[prod]` sections of `key = "value"` lines, `#` comments);
/// 2. environment variables `FLOTILLA_PROFILE_<NAME>_<PROPERTY>` where
///    `<NAME>` is [`profile_env_name`] of the profile and `<PROPERTY>` is the
///    property in upper case with `.` written `_` (`SASL_PASSWORD` →
///    `sasl.password`). Profile names where one is a `_`-prefix of another
///    (`a` and `a_b`) are ambiguous in the environment: avoid them.
#[derive(Clone, Default)]
pub struct SecurityProfiles {
    profiles: BTreeMap<String, KafkaProperties>,
    env: Vec<(String, String)>,
}

impl fmt::Debug for SecurityProfiles {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("SecurityProfiles")
            .field("profiles", &self.profiles)
            .field(
                "env_vars",
                &self.env.iter().map(|(k, _)| k).collect::<Vec<_>>(),
            )
            .finish()
    }
}

impl SecurityProfiles {
    /// No profiles: only specs without a `security_profile` resolve.
    pub fn empty() -> Self {
        Self::default()
    }

    /// Loads profiles from the process environment: the file named by
    /// `FLOTILLA_SECURITY_PROFILES` (if set) and `FLOTILLA_PROFILE_*` variables.
    pub fn from_env() -> Result<Self, KafkaError> {
        let mut p = match std::env::var_os(PROFILES_FILE_ENV) {
            Some(path) if !path.is_empty() => Self::from_file(Path::new(&path))?,
            _ => Self::empty(),
        };
        p.add_env_vars(std::env::vars());
        Ok(p)
    }

    /// Loads profiles from a JSON or TOML-like file (see the type docs).
    pub fn from_file(path: &Path) -> Result<Self, KafkaError> {
        let text = std::fs::read_to_string(path).map_err(|e| KafkaError::Config {
            cluster: path.display().to_string(),
            detail: format!("cannot read security profile file: {e}"),
        })?;
        Self::parse(&text).map_err(|detail| KafkaError::Config {
            cluster: path.display().to_string(),
            detail: format!("bad security profile file: {detail}"),
        })
    }

    /// Parses the contents of a profile file: JSON when it starts with `{`,
    /// the TOML-like form otherwise.
    pub fn parse(text: &str) -> Result<Self, String> {
        let profiles = if text.trim_start().starts_with('{') {
            parse_json(text)?
        } else {
            parse_tomlish(text)?
        };
        Ok(SecurityProfiles {
            profiles,
            env: Vec::new(),
        })
    }

    /// Adds the `FLOTILLA_PROFILE_*` entries of `vars` (other variables are ignored).
    /// Their properties override those of the same profile from a file.
    pub fn add_env_vars<K: Into<String>, V: Into<String>>(
        &mut self,
        vars: impl IntoIterator<Item = (K, V)>,
    ) -> &mut Self {
        for (k, v) in vars {
            let k = k.into();
            if k.starts_with(PROFILE_ENV_PREFIX) {
                self.env.push((k, v.into()));
            }
        }
        self
    }

    /// Defines (or replaces) a profile.
    pub fn insert(&mut self, name: impl Into<String>, props: KafkaProperties) -> &mut Self {
        self.profiles.insert(name.into(), props);
        self
    }

    /// Names of the profiles defined in files or by [`SecurityProfiles::insert`],
    /// plus a best guess (the first `_` segment, lower-cased) for those defined
    /// only through the environment.
    pub fn names(&self) -> Vec<String> {
        let mut names: Vec<String> = self.profiles.keys().cloned().collect();
        for (k, _) in &self.env {
            let rest = &k[PROFILE_ENV_PREFIX.len()..];
            if let Some((name, _)) = rest.split_once('_') {
                let guess = name.to_ascii_lowercase();
                if !names.iter().any(|n| profile_env_name(n) == name) && !names.contains(&guess) {
                    names.push(guess);
                }
            }
        }
        names.sort();
        names
    }

    /// The properties of profile `name`, or `None` when no source defines it.
    pub fn get(&self, name: &str) -> Option<KafkaProperties> {
        let mut props = self.profiles.get(name).cloned();
        let prefix = format!("{PROFILE_ENV_PREFIX}{}_", profile_env_name(name));
        for (k, v) in &self.env {
            if let Some(prop) = k.strip_prefix(&prefix) {
                if prop.is_empty() {
                    continue;
                }
                let key = prop.to_ascii_lowercase().replace('_', ".");
                props
                    .get_or_insert_with(KafkaProperties::new)
                    .set(key, v.clone());
            }
        }
        props
    }

    /// Checks the properties of every profile defined in a file or by
    /// [`SecurityProfiles::insert`] (with their `FLOTILLA_PROFILE_*`
    /// overrides) with librdkafka, as [`validate_properties`] does; the
    /// error names the profile. Profiles defined only through environment
    /// variables are not checked: their names are only guessed
    /// ([`SecurityProfiles::names`]), and a wrong guess (`dev-eu` read as
    /// `dev` with an `eu.*` property) would refuse a property no cluster gets.
    pub fn validate(&self) -> Result<(), InvalidProperty> {
        for name in self.profiles.keys() {
            if let Some(props) = self.get(name) {
                validate_properties(&props).map_err(|mut e| {
                    e.profile = Some(name.clone());
                    e
                })?;
            }
        }
        Ok(())
    }

    /// The properties of profile `name` used by `cluster`; an unknown profile is
    /// [`KafkaError::UnknownProfile`] naming both.
    pub fn resolve(&self, cluster: &str, name: &str) -> Result<KafkaProperties, KafkaError> {
        let props = self.get(name).ok_or_else(|| KafkaError::UnknownProfile {
            cluster: cluster.to_string(),
            profile: name.to_string(),
            known: self.names(),
        })?;
        for forbidden in ["bootstrap.servers", "metadata.broker.list"] {
            if props.get(forbidden).is_some() {
                return Err(KafkaError::Config {
                    cluster: cluster.to_string(),
                    detail: format!(
                        "security profile `{name}` sets `{forbidden}`; the bootstrap list comes only from the registry"
                    ),
                });
            }
        }
        Ok(props)
    }
}

fn parse_json(text: &str) -> Result<BTreeMap<String, KafkaProperties>, String> {
    let v: serde_json::Value = serde_json::from_str(text).map_err(|e| e.to_string())?;
    let obj = v.as_object().ok_or("expected an object of profiles")?;
    let mut out = BTreeMap::new();
    for (name, props) in obj {
        let props = props
            .as_object()
            .ok_or_else(|| format!("profile `{name}` must be an object of properties"))?;
        let mut p = KafkaProperties::new();
        for (k, v) in props {
            let v = match v {
                serde_json::Value::String(s) => s.clone(),
                serde_json::Value::Number(n) => n.to_string(),
                serde_json::Value::Bool(b) => b.to_string(),
                _ => {
                    return Err(format!(
                        "profile `{name}`: property `{k}` must be a string, number or boolean"
                    ))
                }
            };
            p.set(k.clone(), v);
        }
        out.insert(name.clone(), p);
    }
    Ok(out)
}

fn unquote(s: &str) -> &str {
    let s = s.trim();
    for q in ['"', '\''] {
        if s.len() >= 2 && s.starts_with(q) && s.ends_with(q) {
            return &s[1..s.len() - 1];
        }
    }
    s
}

fn parse_tomlish(text: &str) -> Result<BTreeMap<String, KafkaProperties>, String> {
    let mut out: BTreeMap<String, KafkaProperties> = BTreeMap::new();
    let mut current: Option<String> = None;
    for (i, raw) in text.lines().enumerate() {
        let line = raw.trim();
        if line.is_empty() || line.starts_with('#') {
            continue;
        }
        let lineno = i + 1;
        if let Some(section) = line.strip_prefix('[') {
            let name = section
                .strip_suffix(']')
                .ok_or_else(|| format!("line {lineno}: unterminated section header"))?;
            let name = unquote(name);
            let name = name.strip_prefix("profiles.").unwrap_or(name);
            let name = unquote(name).to_string();
            if name.is_empty() {
                return Err(format!("line {lineno}: empty profile name"));
            }
            out.entry(name.clone()).or_default();
            current = Some(name);
            continue;
        }
        let (k, v) = line
            .split_once('=')
            .ok_or_else(|| format!("line {lineno}: expected `key = value`"))?;
        let profile = current
            .as_ref()
            .ok_or_else(|| format!("line {lineno}: property outside of a [profile] section"))?;
        let k = unquote(k);
        if k.is_empty() {
            return Err(format!("line {lineno}: empty property name"));
        }
        out.get_mut(profile)
            .expect("section inserted")
            .set(k, unquote(v));
    }
    Ok(out)
}

/// Checks that `bootstrap` is a comma-separated list of `host:port` entries
/// (each optionally prefixed by `<protocol>://`, IPv6 hosts in brackets, port
/// 1–65535). librdkafka accepts odd strings lazily and then fails obscurely, so
/// flotilla refuses them up front.
pub fn validate_bootstrap(bootstrap: &str) -> Result<(), KafkaError> {
    let bad = |reason: String| KafkaError::InvalidBootstrap {
        bootstrap: bootstrap.to_string(),
        reason,
    };
    if bootstrap.trim().is_empty() {
        return Err(bad("empty".into()));
    }
    for entry in bootstrap.split(',') {
        let entry = entry.trim();
        if entry.is_empty() {
            return Err(bad("empty entry (stray comma?)".into()));
        }
        let addr = match entry.split_once("://") {
            Some((proto, rest)) => {
                if proto.is_empty() || !proto.chars().all(|c| c.is_ascii_alphanumeric() || c == '_')
                {
                    return Err(bad(format!("bad protocol prefix in `{entry}`")));
                }
                rest
            }
            None => entry,
        };
        let (host, port) = if let Some(rest) = addr.strip_prefix('[') {
            let (h, after) = rest
                .split_once(']')
                .ok_or_else(|| bad(format!("unterminated `[` in `{entry}`")))?;
            let port = after
                .strip_prefix(':')
                .ok_or_else(|| bad(format!("missing `:port` in `{entry}`")))?;
            if h.is_empty()
                || !h
                    .chars()
                    .all(|c| c.is_ascii_hexdigit() || c == ':' || c == '.')
            {
                return Err(bad(format!("bad IPv6 address in `{entry}`")));
            }
            (h, port)
        } else {
            let (h, port) = addr
                .rsplit_once(':')
                .ok_or_else(|| bad(format!("missing `:port` in `{entry}`")))?;
            if h.is_empty() {
                return Err(bad(format!("missing host in `{entry}`")));
            }
            if !h
                .chars()
                .all(|c| c.is_ascii_alphanumeric() || c == '-' || c == '.' || c == '_')
            {
                return Err(bad(format!("bad host `{h}` in `{entry}`")));
            }
            if h.starts_with(['-', '.']) || h.ends_with('-') || h.contains("..") {
                return Err(bad(format!("bad host `{h}` in `{entry}`")));
            }
            (h, port)
        };
        let _ = host;
        match port.parse::<u32>() {
            Ok(p) if (1..=65535).contains(&p) && !port.starts_with('+') => {}
            _ => {
                return Err(bad(format!(
                    "bad port `{port}` in `{entry}` (expected 1-65535)"
                )))
            }
        }
    }
    Ok(())
}

/// Properties every flotilla client gets from the registry instead of from
/// the properties given: [`validate_properties`] skips them.
const REPLACED_PROPERTIES: &[&str] = &["bootstrap.servers", "metadata.broker.list"];

/// A property librdkafka refuses: an unknown name or an invalid value
/// (found by [`validate_properties`] or [`SecurityProfiles::validate`]).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("librdkafka refuses property `{property}` = `{value}`{}: {reason}", .profile.as_ref().map(|p| format!(" (security profile `{p}`)")).unwrap_or_default())]
pub struct InvalidProperty {
    /// The property as given.
    pub property: String,
    /// Its value as given (`<redacted>` for a secret property, see
    /// [`is_secret_key`]).
    pub value: String,
    /// librdkafka's reason, e.g. `No such configuration property:
    /// "enable.auto.comit"` or `Invalid value "bogus" for configuration
    /// property "auto.offset.reset"`.
    pub reason: String,
    /// The security profile that sets the property, when it comes from one.
    pub profile: Option<String>,
}

impl InvalidProperty {
    fn new(property: &str, value: &str, error: &RdKafkaError) -> Self {
        let reason = match error {
            RdKafkaError::ClientConfig(_, desc, _, _) if !desc.is_empty() => desc.clone(),
            RdKafkaError::Nul(_) => "the name or the value contains a NUL byte".to_string(),
            other => other.to_string(),
        };
        let (value, reason) = if !is_secret_key(property) {
            (value.to_string(), reason)
        } else if value.is_empty() {
            ("<redacted>".to_string(), reason)
        } else {
            (
                "<redacted>".to_string(),
                reason.replace(value, "<redacted>"),
            )
        };
        InvalidProperty {
            property: property.to_string(),
            value,
            reason,
            profile: None,
        }
    }
}

/// librdkafka's verdict on `pairs` alone: `rd_kafka_conf_set` for each, on a
/// fresh configuration (no client, no network).
fn native_check(pairs: &[(&str, &str)]) -> Result<(), RdKafkaError> {
    let mut config = ClientConfig::new();
    for (k, v) in pairs {
        config.set(*k, *v);
    }
    config.create_native_config().map(drop)
}

/// Checks `props` with librdkafka as rdkafka's `ClientConfig::create` would
/// before creating a client — an unknown property name, a value of the wrong
/// type or out of range — without creating a client and without network
/// (`rd_kafka_conf_set` on a throw-away configuration).
///
/// `bootstrap.servers` and `metadata.broker.list` are skipped: every
/// flotilla client gets its bootstrap list from the registry. Checks that
/// librdkafka makes only when it creates a client, across properties (e.g.
/// `acks` other than `all` with `enable.idempotence=true`), are not made.
///
/// Of several refused properties, the first in key order is reported.
pub fn validate_properties(props: &KafkaProperties) -> Result<(), InvalidProperty> {
    let pairs: Vec<(&str, &str)> = props
        .iter()
        .filter(|(k, _)| !REPLACED_PROPERTIES.contains(k))
        .collect();
    let whole = match native_check(&pairs) {
        Ok(()) => return Ok(()),
        Err(e) => e,
    };
    // librdkafka stops at the first property it refuses in rdkafka's
    // (hash) order: name the first in key order instead, so the same
    // properties always give the same error. Only on this error path.
    for i in 1..=pairs.len() {
        if let Err(e) = native_check(&pairs[..i]) {
            let (k, v) = pairs[i - 1];
            return Err(InvalidProperty::new(k, v, &e));
        }
    }
    // Not reached: the last prefix is the whole set.
    match &whole {
        RdKafkaError::ClientConfig(_, _, k, v) => Err(InvalidProperty::new(k, v, &whole)),
        _ => Err(InvalidProperty::new("?", "", &whole)),
    }
}

/// The rdkafka configuration for a client of the cluster `spec`: the `base`
/// properties, then the spec's security profile (resolved in `profiles`), then
/// `bootstrap.servers` from the spec and `client.id` = `<base client.id or
/// "flotilla">-<cluster id>`, and flotilla's defaults for what neither set
/// (`reconnect.backoff.max.ms`, see [`DEFAULT_RECONNECT_BACKOFF_MAX_MS`]).
///
/// Fails on a malformed bootstrap list, an unknown profile, or a profile that
/// tries to set the bootstrap list.
pub fn client_config(
    spec: &ClusterSpec,
    base: &KafkaProperties,
    profiles: &SecurityProfiles,
) -> Result<ClientConfig, KafkaError> {
    let security = match &spec.security_profile {
        Some(name) if !name.is_empty() => Some(profiles.resolve(&spec.id, name)?),
        _ => None,
    };
    let mut cfg = bootstrap_config(&spec.bootstrap, base, security.as_ref())?;
    let prefix = base.get("client.id").unwrap_or(DEFAULT_CLIENT_ID);
    cfg.set("client.id", format!("{prefix}-{}", spec.id));
    Ok(cfg)
}

/// The rdkafka configuration for a cluster known only by its bootstrap list
/// (e.g. while registering it): `base`, then `security` if given, then
/// `bootstrap.servers`, and flotilla's defaults for what neither set
/// ([`DEFAULT_RECONNECT_BACKOFF_MAX_MS`]). `client.id` is left as `base` has
/// it (`flotilla` if unset).
pub fn bootstrap_config(
    bootstrap: &str,
    base: &KafkaProperties,
    security: Option<&KafkaProperties>,
) -> Result<ClientConfig, KafkaError> {
    validate_bootstrap(bootstrap)?;
    let mut cfg = base.to_client_config();
    if let Some(sec) = security {
        sec.apply_to(&mut cfg);
    }
    cfg.remove("metadata.broker.list");
    cfg.set("bootstrap.servers", bootstrap.trim());
    if cfg.get("client.id").is_none() {
        cfg.set("client.id", DEFAULT_CLIENT_ID);
    }
    apply_client_defaults(&mut cfg);
    Ok(cfg)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::registry::{ClusterRole, ClusterState, SCHEMA_VERSION};

    fn spec(profile: Option<&str>) -> ClusterSpec {
        ClusterSpec {
            version: SCHEMA_VERSION,
            id: "east-1".into(),
            bootstrap: "k1:9092,k2:9093".into(),
            kafka_cluster_id: "abc".into(),
            state: ClusterState::Active,
            role: ClusterRole::Permanent,
            weight: 100,
            labels: BTreeMap::new(),
            security_profile: profile.map(String::from),
            created_at: 1,
        }
    }

    #[test]
    fn bootstrap_syntax() {
        for ok in [
            "localhost:9092",
            "127.0.0.1:1",
            "k1:9092,k2:9093",
            " k1:9092 , k2.example.com:65535 ",
            "[::1]:9092",
            "SASL_SSL://broker-1.internal:9094",
            "my_host:9092",
        ] {
            validate_bootstrap(ok).unwrap_or_else(|e| panic!("{ok}: {e}"));
        }
        for bad in [
            "",
            "  ",
            "localhost",
            "localhost:",
            ":9092",
            "localhost:0",
            "localhost:65536",
            "localhost:90a",
            "localhost:+92",
            "k1:9092,",
            "k1:9092,,k2:9092",
            "host name:9092",
            "http//x:1",
            "[::1:9092",
            "[]:9092",
            "-bad:9092",
            "a..b:9092",
            "k1:9092;k2:9092",
        ] {
            let e = validate_bootstrap(bad).expect_err(bad);
            assert!(matches!(e, KafkaError::InvalidBootstrap { .. }));
            assert!(e.to_string().contains("host:port"), "{e}");
        }
    }

    #[test]
    fn properties_are_ordered_and_redacted() {
        let p = KafkaProperties::new()
            .with("sasl.password", "hunter2")
            .with("acks", "all")
            .with("acks", "1");
        assert_eq!(p.get("acks"), Some("1"));
        assert_eq!(
            p.iter().map(|(k, _)| k).collect::<Vec<_>>(),
            ["acks", "sasl.password"]
        );
        let dbg = format!("{p:?}");
        assert!(
            !dbg.contains("hunter2") && dbg.contains("<redacted>"),
            "{dbg}"
        );
        let c = p.to_client_config();
        assert_eq!(c.get("sasl.password"), Some("hunter2"));
    }

    #[test]
    fn properties_serde_as_a_map() {
        let p: KafkaProperties = serde_json::from_str(r#"{"acks":"all","linger.ms":"5"}"#).unwrap();
        assert_eq!(p.get("linger.ms"), Some("5"));
        assert_eq!(
            serde_json::to_string(&p).unwrap(),
            r#"{"acks":"all","linger.ms":"5"}"#
        );
    }

    #[test]
    fn client_config_sets_bootstrap_client_id_and_profile() {
        let base = KafkaProperties::new()
            .with("client.id", "app")
            .with("bootstrap.servers", "ignored:1")
            .with("security.protocol", "plaintext");
        let mut profiles = SecurityProfiles::empty();
        profiles.insert(
            "prod",
            KafkaProperties::new()
                .with("security.protocol", "SASL_SSL")
                .with("sasl.username", "u"),
        );
        let c = client_config(&spec(Some("prod")), &base, &profiles).unwrap();
        assert_eq!(c.get("bootstrap.servers"), Some("k1:9092,k2:9093"));
        assert_eq!(c.get("client.id"), Some("app-east-1"));
        assert_eq!(c.get("security.protocol"), Some("SASL_SSL"));
        assert_eq!(c.get("sasl.username"), Some("u"));

        let c = client_config(&spec(None), &KafkaProperties::new(), &profiles).unwrap();
        assert_eq!(c.get("client.id"), Some("flotilla-east-1"));
        assert_eq!(c.get("security.protocol"), None);
    }

    #[test]
    fn reconnect_backoff_max_defaults_to_1s_and_a_user_value_wins() {
        let profiles = SecurityProfiles::empty();
        let key = "reconnect.backoff.max.ms";
        // Default: every per-cluster client and a bootstrap-only one.
        let c = client_config(&spec(None), &KafkaProperties::new(), &profiles).unwrap();
        assert_eq!(c.get(key), Some("1000"));
        assert_eq!(c.get("reconnect.backoff.ms"), None, "librdkafka's 100 ms");
        let c = bootstrap_config("k1:9092", &KafkaProperties::new(), None).unwrap();
        assert_eq!(c.get(key), Some("1000"));
        // The base properties win.
        let base = KafkaProperties::new().with(key, "10000");
        let c = client_config(&spec(None), &base, &profiles).unwrap();
        assert_eq!(c.get(key), Some("10000"));
        // So does the security profile.
        let mut profiles = SecurityProfiles::empty();
        profiles.insert("prod", KafkaProperties::new().with(key, "250"));
        let c = client_config(&spec(Some("prod")), &KafkaProperties::new(), &profiles).unwrap();
        assert_eq!(c.get(key), Some("250"));
        let c = bootstrap_config(
            "k1:9092",
            &KafkaProperties::new(),
            profiles.get("prod").as_ref(),
        )
        .unwrap();
        assert_eq!(c.get(key), Some("250"));
        // An initial backoff above the default raises the cap to it
        // (librdkafka refuses max < initial).
        let base = KafkaProperties::new().with("reconnect.backoff.ms", "3000");
        let c = client_config(&spec(None), &base, &SecurityProfiles::empty()).unwrap();
        assert_eq!(c.get(key), Some("3000"));
        // librdkafka accepts the resulting configurations.
        for base in [
            KafkaProperties::new(),
            KafkaProperties::new().with("reconnect.backoff.ms", "3000"),
        ] {
            let c = client_config(&spec(None), &base, &SecurityProfiles::empty()).unwrap();
            c.create::<rdkafka::producer::BaseProducer>()
                .expect("librdkafka accepts the defaults");
        }
    }

    #[test]
    fn validate_properties_names_an_unknown_property() {
        let props = KafkaProperties::new()
            .with("group.id", "g")
            .with("enable.auto.comit", "false");
        let e = validate_properties(&props).unwrap_err();
        assert_eq!(e.property, "enable.auto.comit");
        assert_eq!(e.value, "false");
        assert_eq!(e.profile, None);
        assert!(e.reason.contains("No such configuration property"), "{e:?}");
        let s = e.to_string();
        assert!(s.contains("`enable.auto.comit`"), "{s}");
    }

    #[test]
    fn validate_properties_names_an_invalid_value() {
        // librdkafka's reason names an alias by its canonical name
        // (`linger.ms`: `queue.buffering.max.ms`); `property` is as given.
        for (k, v, canonical) in [
            ("auto.offset.reset", "bogus", "auto.offset.reset"),
            ("linger.ms", "abc", "queue.buffering.max.ms"),
            ("enable.idempotence", "perhaps", "enable.idempotence"),
            ("session.timeout.ms", "-5", "session.timeout.ms"),
        ] {
            let props = KafkaProperties::new().with("acks", "all").with(k, v);
            let e = validate_properties(&props).unwrap_err();
            assert_eq!((e.property.as_str(), e.value.as_str()), (k, v), "{e:?}");
            assert!(e.reason.contains(canonical), "{k}: {e:?}");
            let s = e.to_string();
            assert!(s.contains(k) && s.contains(v), "{s}");
        }
    }

    #[test]
    fn validate_properties_passes_a_valid_set_and_skips_the_bootstrap_list() {
        let props = KafkaProperties::new()
            .with("group.id", "g")
            .with("group.protocol", "consumer")
            .with("auto.offset.reset", "latest")
            .with("enable.auto.commit", "true")
            .with("session.timeout.ms", "6000")
            .with("acks", "all")
            .with("linger.ms", "5")
            .with("enable.idempotence", "true")
            .with("compression.type", "lz4")
            .with("client.id", "app")
            .with("security.protocol", "plaintext")
            .with("statistics.interval.ms", "5000");
        validate_properties(&props).unwrap();
        validate_properties(&KafkaProperties::new()).unwrap();
        // The registry gives the bootstrap list: what is set here is never
        // used (a NUL byte would make librdkafka refuse it).
        let props = props
            .with("bootstrap.servers", "ignored\0")
            .with("metadata.broker.list", "ignored\0");
        validate_properties(&props).unwrap();
        // Every configuration the per-cluster clients get passes.
        let c = client_config(&spec(None), &props, &SecurityProfiles::empty()).unwrap();
        c.create_native_config().unwrap();
    }

    #[test]
    fn validate_properties_reports_the_first_refused_in_key_order() {
        let props = KafkaProperties::new()
            .with("zz.unknown", "1")
            .with("linger.ms", "abc")
            .with("aa.unknown", "1")
            .with("acks", "all");
        // rdkafka sets the properties in hash order (random per map).
        for _ in 0..20 {
            assert_eq!(
                validate_properties(&props).unwrap_err().property,
                "aa.unknown"
            );
        }
        let e = validate_properties(&KafkaProperties::new().with("linger.ms", "1\0")).unwrap_err();
        assert_eq!(e.property, "linger.ms");
        assert!(e.reason.contains("NUL"), "{e:?}");
    }

    #[test]
    fn validate_properties_redacts_secret_values() {
        let props = KafkaProperties::new().with("sasl.pasword.typo.password", "hunter2");
        let e = validate_properties(&props).unwrap_err();
        assert_eq!(e.property, "sasl.pasword.typo.password");
        assert_eq!(e.value, "<redacted>");
        let all = format!("{e} {e:?}");
        assert!(!all.contains("hunter2"), "{all}");
    }

    #[test]
    fn validate_profiles_names_the_profile() {
        let mut profiles = SecurityProfiles::empty();
        profiles.insert(
            "prod",
            KafkaProperties::new()
                .with("security.protocol", "SASL_PLAINTEXT")
                .with("sasl.mechanism", "PLAIN")
                .with("sasl.password", "s3cret"),
        );
        profiles.validate().unwrap();
        SecurityProfiles::empty().validate().unwrap();
        // A property of a defined profile, from the file or the environment.
        let mut bad = profiles.clone();
        bad.add_env_vars([(
            "FLOTILLA_PROFILE_PROD_SECURITY_PROTOCOL",
            "SASL_PLAINTEXT_x",
        )]);
        let e = bad.validate().unwrap_err();
        assert_eq!(e.property, "security.protocol");
        assert_eq!(e.profile.as_deref(), Some("prod"));
        assert!(e.to_string().contains("`prod`"), "{e}");
        let mut bad = profiles.clone();
        bad.insert(
            "dev",
            KafkaProperties::new().with("security.protocl", "SSL"),
        );
        let e = bad.validate().unwrap_err();
        assert_eq!(
            (e.property.as_str(), e.profile.as_deref()),
            ("security.protocl", Some("dev"))
        );
        // Profiles known only from the environment are not checked: their
        // name is a guess (`dev-eu` would be read as `dev` with `eu.*`).
        let mut env_only = profiles;
        env_only.add_env_vars([("FLOTILLA_PROFILE_DEV_EU_SASL_MECHANISM", "PLAIN")]);
        assert!(env_only.names().contains(&"dev".to_string()));
        env_only.validate().unwrap();
    }

    #[test]
    fn unknown_profile_is_named() {
        let mut profiles = SecurityProfiles::empty();
        profiles.insert("staging", KafkaProperties::new());
        let e = client_config(&spec(Some("prod")), &KafkaProperties::new(), &profiles).unwrap_err();
        assert!(matches!(&e, KafkaError::UnknownProfile { profile, .. } if profile == "prod"));
        let s = e.to_string();
        assert!(
            s.contains("`prod`") && s.contains("east-1") && s.contains("staging"),
            "{s}"
        );
        assert!(s.contains("FLOTILLA_PROFILE_PROD_"), "{s}");
        assert!(e.is_permanent());
    }

    #[test]
    fn bad_bootstrap_in_spec_is_refused() {
        let mut s = spec(None);
        s.bootstrap = "k1".into();
        let e = client_config(&s, &KafkaProperties::new(), &SecurityProfiles::empty()).unwrap_err();
        assert!(matches!(e, KafkaError::InvalidBootstrap { .. }));
    }

    #[test]
    fn profile_cannot_set_bootstrap() {
        let mut profiles = SecurityProfiles::empty();
        profiles.insert(
            "prod",
            KafkaProperties::new().with("bootstrap.servers", "evil:1"),
        );
        let e = client_config(&spec(Some("prod")), &KafkaProperties::new(), &profiles).unwrap_err();
        assert!(matches!(e, KafkaError::Config { .. }), "{e}");
    }

    #[test]
    fn json_file_and_env_overlay() {
        let mut p = SecurityProfiles::parse(
            r#"{"prod": {"security.protocol": "SASL_SSL", "sasl.username": "file-user", "socket.timeout.ms": 5000},
                "dev-eu": {"security.protocol": "PLAINTEXT"}}"#,
        )
        .unwrap();
        p.add_env_vars([
            ("FLOTILLA_PROFILE_PROD_SASL_USERNAME", "env-user"),
            ("FLOTILLA_PROFILE_PROD_SASL_PASSWORD", "s3cret"),
            ("FLOTILLA_PROFILE_DEV_EU_SASL_MECHANISM", "PLAIN"),
            ("FLOTILLA_PROFILE_ONLYENV_SECURITY_PROTOCOL", "SSL"),
            ("PATH", "/bin"),
        ]);
        let prod = p.resolve("c", "prod").unwrap();
        assert_eq!(prod.get("security.protocol"), Some("SASL_SSL"));
        assert_eq!(prod.get("sasl.username"), Some("env-user"));
        assert_eq!(prod.get("sasl.password"), Some("s3cret"));
        assert_eq!(prod.get("socket.timeout.ms"), Some("5000"));
        let dev = p.resolve("c", "dev-eu").unwrap();
        assert_eq!(dev.get("sasl.mechanism"), Some("PLAIN"));
        let only = p.resolve("c", "onlyenv").unwrap();
        assert_eq!(only.get("security.protocol"), Some("SSL"));
        assert!(p.names().contains(&"onlyenv".to_string()));
        assert!(matches!(
            p.resolve("c", "nope"),
            Err(KafkaError::UnknownProfile { .. })
        ));
        assert!(!format!("{p:?}").contains("s3cret"));
    }

    #[test]
    fn tomlish_file() {
        let p = SecurityProfiles::parse(
            "# comment\n[prod]\nsecurity.protocol = \"SASL_SSL\"\n\"sasl.username\" = 'u'\n\n[profiles.dev]\nacks=all\n",
        )
        .unwrap();
        assert_eq!(
            p.resolve("c", "prod").unwrap().get("sasl.username"),
            Some("u")
        );
        assert_eq!(p.resolve("c", "dev").unwrap().get("acks"), Some("all"));
        assert!(SecurityProfiles::parse("acks = all").is_err());
        assert!(SecurityProfiles::parse("[x]\nnovalue").is_err());
        assert!(SecurityProfiles::parse("{\"x\": 3}").is_err());
    }

    #[test]
    fn profile_file_from_disk() {
        let dir = std::env::temp_dir().join(format!("flotilla-profiles-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join("profiles.json");
        std::fs::write(&path, r#"{"prod": {"security.protocol": "SSL"}}"#).unwrap();
        let p = SecurityProfiles::from_file(&path).unwrap();
        assert_eq!(
            p.resolve("c", "prod").unwrap().get("security.protocol"),
            Some("SSL")
        );
        let missing = SecurityProfiles::from_file(&dir.join("missing.json")).unwrap_err();
        assert!(matches!(missing, KafkaError::Config { .. }));
        assert!(missing.to_string().contains("missing.json"));
        std::fs::remove_dir_all(&dir).ok();
    }
}
