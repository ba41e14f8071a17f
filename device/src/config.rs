//! `machine.toml`: who the machine is, whom it trusts, where it keeps its files, how it installs.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use fleetcast_proto::admin::ProvisionedMachine;
use fleetcast_proto::auth::{PlatformPublicKey, Secret};
use fleetcast_proto::{GroupId, Kind, MachineId};
use serde::{Deserialize, Serialize};

use crate::trust::TrustedKey;

/// A config the agent cannot run with. Every variant names the file and says how to fix it;
/// [`ConfigError::Invalid`] also gives the line and column of each problem.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("cannot read {path}: {error}\n  fix: {fix}", fix = read_fix(error))]
    Read {
        path: PathBuf,
        error: std::io::Error,
    },
    #[error("{}", render_problems(path, problems))]
    Invalid {
        path: PathBuf,
        problems: Vec<Problem>,
    },
}

impl ConfigError {
    /// The problems found (empty for [`ConfigError::Read`]).
    pub fn problems(&self) -> &[Problem] {
        match self {
            ConfigError::Read { .. } => &[],
            ConfigError::Invalid { problems, .. } => problems,
        }
    }
}

/// One thing wrong in a config file: where (1-based line and column, when it has a place),
/// what, and what to do about it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Problem {
    pub at: Option<(usize, usize)>,
    pub what: String,
    pub fix: String,
}

fn render_problems(path: &Path, problems: &[Problem]) -> String {
    let mut out = String::new();
    for (i, p) in problems.iter().enumerate() {
        if i > 0 {
            out.push('\n');
        }
        match p.at {
            Some((line, column)) => out.push_str(&format!("{}:{line}:{column}: ", path.display())),
            None => out.push_str(&format!("{}: ", path.display())),
        }
        out.push_str(&format!("{}\n  fix: {}", p.what, p.fix));
    }
    out
}

fn read_fix(error: &std::io::Error) -> &'static str {
    match error.kind() {
        std::io::ErrorKind::NotFound => {
            "create it (docs/device.md lists every key) or pass --config with the right path"
        }
        std::io::ErrorKind::PermissionDenied => {
            "make it readable by the user the agent runs as (e.g. mode 0640, group of that user; it holds the machine's secret, so not world-readable)"
        }
        _ => "check that the path names a readable file",
    }
}

/// How one kind is installed.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "type", rename_all = "snake_case", deny_unknown_fields)]
pub enum InstallerConfig {
    /// A/B slots under `{data_dir}/slots/{kind}`, switched atomically, then health-checked.
    Slots {
        /// Run through `sh -c` with `FLEETCAST_VERSION` set; exit 0 means healthy.
        #[serde(default, skip_serializing_if = "Option::is_none")]
        health_cmd: Option<String>,
    },
    /// Runs `cmd` with `{file}` and `{version}` substituted (shell-quoted) through `sh -c`.
    Command { cmd: String },
}

impl Default for InstallerConfig {
    fn default() -> Self {
        InstallerConfig::Slots { health_cmd: None }
    }
}

fn default_prefix() -> String {
    fleetcast_proto::topics::DEFAULT_PREFIX.to_owned()
}

fn is_zero(n: &u32) -> bool {
    *n == 0
}

fn default_broker() -> String {
    fleetcast_broker::client::DEFAULT_BROKER.to_owned()
}

fn default_keep_alive() -> u16 {
    fleetcast_broker::client::KEEP_ALIVE.as_secs() as u16
}

fn is_default_keep_alive(secs: &u16) -> bool {
    *secs == default_keep_alive()
}

/// The keep-alives `keep_alive_secs` may name.
pub const KEEP_ALIVE_RANGE: std::ops::RangeInclusive<u16> = 10..=1200;

/// Unknown keys are refused: a misspelt key would otherwise be ignored silently.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct MachineConfig {
    pub machine: MachineId,
    #[serde(default)]
    pub groups: Vec<GroupId>,
    pub secret: Secret,
    pub platform_key: PlatformPublicKey,
    /// Generation of `platform_key` in the platform's key chain: 0 for the platform's first key,
    /// higher for a machine provisioned after rotations. Only the starting point: the agent
    /// follows the chain and keeps the newer key in its data dir.
    #[serde(default, skip_serializing_if = "is_zero")]
    pub platform_key_gen: u32,
    #[serde(default = "default_prefix")]
    pub topic_prefix: String,
    #[serde(default = "default_broker")]
    pub broker: String,
    /// The CA certificate (PEM) that signs the broker's TLS certificate, for `mqtts://`
    /// brokers; without it the system's roots are used.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub ca_file: Option<PathBuf>,
    /// The MQTT keep-alive, in seconds ([`KEEP_ALIVE_RANGE`]). Every PINGRESP must come within
    /// it, behind whatever the link still carries, or the agent takes the connection for dead:
    /// at 2 KB/s a 64 KiB chunk frame alone takes 33 s, longer than the default 30 s (and
    /// behind a deep network queue faster links wait as long; docs/device.md).
    #[serde(
        default = "default_keep_alive",
        skip_serializing_if = "is_default_keep_alive"
    )]
    pub keep_alive_secs: u16,
    pub data_dir: PathBuf,
    /// The lock file sales and installs exclude each other with (docs/device.md): the vending
    /// application holds a shared `flock` on it while serving a customer, the agent an
    /// exclusive one for every install. Default: `{data_dir}/sale.lock`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub sale_lock: Option<PathBuf>,
    /// Local time offset east of UTC, used by `window` policies without an explicit offset.
    #[serde(default)]
    pub utc_offset_minutes: i32,
    /// Kinds not listed use the slots installer without a health check.
    #[serde(default)]
    pub installers: BTreeMap<Kind, InstallerConfig>,
    /// What the machine runs before any update, reported in its state.
    #[serde(default)]
    pub initial_versions: BTreeMap<Kind, String>,
}

impl MachineConfig {
    /// Reads and checks `path`: TOML syntax, unknown keys, types, then what serde cannot check
    /// (the broker address, the CA file, installer programs, ...). Every problem names its line
    /// and a fix.
    pub fn load(path: impl AsRef<Path>) -> Result<Self, ConfigError> {
        let path = path.as_ref();
        let text = std::fs::read_to_string(path).map_err(|error| ConfigError::Read {
            path: path.to_owned(),
            error,
        })?;
        Self::parse(path, &text)
    }

    /// What to say when every user may read (or write) the file at `path` (it holds the
    /// machine's secret: whoever reads it can act as this machine); `None` when they may not,
    /// or its mode cannot be read. `fleetcast machine provision ... > FILE` writes with the
    /// shell's umask, often 0644 (`--out-dir` writes 0600). A file its group may read is the
    /// packaged layout (owner root, group `fleetcast`, 0640: the service reads it through its
    /// group), so that is not warned of. Until 2026-11-29 it was, with "chmod 600 it", which
    /// left the packaged service unable to read its config.
    pub fn readable_by_others(path: impl AsRef<Path>) -> Option<String> {
        use std::os::unix::fs::PermissionsExt;
        let path = path.as_ref();
        let mode = std::fs::metadata(path).ok()?.permissions().mode() & 0o777;
        (mode & 0o007 != 0).then(|| {
            format!(
                "{} holds this machine's secret and every user may read it (mode {mode:o}): \
                 chmod o-rwx it (0640 with the service's group, as the package sets it, or 0600)",
                path.display()
            )
        })
    }

    /// [`MachineConfig::load`] of `text`, read from `path`.
    pub fn parse(path: &Path, text: &str) -> Result<Self, ConfigError> {
        let (config, problems) = Self::parse_lenient(path, text)?;
        if problems.is_empty() {
            Ok(config)
        } else {
            Err(ConfigError::Invalid {
                path: path.to_owned(),
                problems,
            })
        }
    }

    /// Like [`MachineConfig::load`], but what serde cannot check (a missing program, an
    /// unreadable CA file, ...) is returned beside the config instead of refusing it: for
    /// `fleetcast-device status`, which should show the rest anyway.
    pub fn load_lenient(path: impl AsRef<Path>) -> Result<(Self, Vec<Problem>), ConfigError> {
        let path = path.as_ref();
        let text = std::fs::read_to_string(path).map_err(|error| ConfigError::Read {
            path: path.to_owned(),
            error,
        })?;
        Self::parse_lenient(path, &text)
    }

    fn parse_lenient(path: &Path, text: &str) -> Result<(Self, Vec<Problem>), ConfigError> {
        let config: MachineConfig = toml::from_str(text).map_err(|e| ConfigError::Invalid {
            path: path.to_owned(),
            problems: vec![locate::toml_problem(text, &e)],
        })?;
        let problems = config
            .problems()
            .into_iter()
            .map(|(key, what, fix)| Problem {
                at: locate::key(text, &key),
                what,
                fix,
            })
            .collect();
        Ok((config, problems))
    }

    /// What serde cannot check, each with the key it is about and a fix.
    fn problems(&self) -> Vec<(Vec<String>, String, String)> {
        let mut out = Vec::new();
        let mut add = |key: &[&str], what: String, fix: &str| {
            out.push((
                key.iter().map(|k| k.to_string()).collect(),
                what,
                fix.to_owned(),
            ))
        };
        if let Err(e) = self.broker.parse::<fleetcast_broker::BrokerUrl>() {
            add(
                &["broker"],
                e.to_string(),
                "write mqtt://HOST:PORT, or mqtts://HOST:PORT for TLS",
            );
        } else if let Err(e) = self.broker_url() {
            add(
                &["ca_file"],
                e,
                "name a PEM file holding the CA certificate that signed the broker's, readable by the user the agent runs as",
            );
        }
        if !KEEP_ALIVE_RANGE.contains(&self.keep_alive_secs) {
            add(
                &["keep_alive_secs"],
                format!(
                    "keep_alive_secs = {} is outside {} to {}",
                    self.keep_alive_secs,
                    KEEP_ALIVE_RANGE.start(),
                    KEEP_ALIVE_RANGE.end()
                ),
                "use 30 (the default) on a good link, 120 or more on a link of a few KB/s (docs/device.md)",
            );
        }
        if let Err(e) = self.check_topic_prefix() {
            add(
                &["topic_prefix"],
                e,
                "use the platform's prefix (default \"fleet\"), e.g. topic_prefix = \"fleet\"",
            );
        }
        for (kind, v) in &self.initial_versions {
            if let Err(e) = fleetcast_proto::release::validate_version(v) {
                add(
                    &["initial_versions", kind.as_str()],
                    format!("initial version of {kind}: {e}"),
                    "write the version the machine runs, as it is named in releases (e.g. \"2.4.0\")",
                );
            }
        }
        for (kind, installer) in &self.installers {
            match installer {
                InstallerConfig::Command { cmd } => {
                    if !cmd.contains("{file}") {
                        add(
                            &["installers", kind.as_str(), "cmd"],
                            format!("the {kind} installer command never names {{file}}, the artifact to install"),
                            "put {file} where the command takes the artifact's path, e.g. cmd = \"/usr/local/bin/install-firmware {file} {version}\"",
                        );
                    }
                    if let Err(e) = program::check(cmd) {
                        add(
                            &["installers", kind.as_str(), "cmd"],
                            format!("the {kind} installer command cannot run: {e}"),
                            "install the program, or give its full path (the agent runs it through sh -c)",
                        );
                    }
                }
                InstallerConfig::Slots {
                    health_cmd: Some(cmd),
                } => {
                    if let Err(e) = program::check(cmd) {
                        add(
                            &["installers", kind.as_str(), "health_cmd"],
                            format!("the {kind} health check cannot run: {e}"),
                            "install the program, or give its full path (the agent runs it through sh -c)",
                        );
                    }
                }
                InstallerConfig::Slots { health_cmd: None } => {}
            }
        }
        if let Some(lock) = &self.sale_lock {
            let parent = lock.parent().filter(|p| !p.as_os_str().is_empty());
            if let Some(dir) = parent.filter(|p| !p.is_dir()) {
                add(
                    &["sale_lock"],
                    format!("sale_lock {}: the directory {} does not exist", lock.display(), dir.display()),
                    "create the directory (both the agent and the vending application need access) or point sale_lock elsewhere",
                );
            }
        }
        out
    }

    /// The broker address, with the pinned CA when `ca_file` is set.
    pub fn broker_url(&self) -> Result<fleetcast_broker::BrokerUrl, String> {
        let url = self
            .broker
            .parse::<fleetcast_broker::BrokerUrl>()
            .map_err(|e| e.to_string())?;
        match &self.ca_file {
            None => Ok(url),
            Some(path) => {
                let pem =
                    std::fs::read(path).map_err(|e| format!("ca_file {}: {e}", path.display()))?;
                url.with_ca(pem)
                    .map_err(|e| format!("ca_file {}: {e}", path.display()))
            }
        }
    }

    /// Checks what serde cannot: the broker address (and CA file), the topic prefix, the
    /// initial versions. Without line numbers; [`MachineConfig::load`] says more.
    pub fn validate(&self) -> Result<(), String> {
        self.broker_url()?;
        self.check_topic_prefix()?;
        for (kind, v) in &self.initial_versions {
            fleetcast_proto::release::validate_version(v).map_err(|e| format!("{kind}: {e}"))?;
        }
        Ok(())
    }

    fn check_topic_prefix(&self) -> Result<(), String> {
        let p = self.topic_prefix.trim_end_matches('/');
        if p.is_empty() || p.contains(['+', '#']) {
            return Err(format!(
                "topic_prefix {:?} must be non-empty and hold no wildcard",
                self.topic_prefix
            ));
        }
        Ok(())
    }

    /// The lock file of the sale/install protocol.
    pub fn sale_lock_path(&self) -> PathBuf {
        self.sale_lock
            .clone()
            .unwrap_or_else(|| self.data_dir.join("sale.lock"))
    }

    pub fn from_provisioned(p: &ProvisionedMachine, broker: &str, data_dir: PathBuf) -> Self {
        Self {
            machine: p.machine.clone(),
            groups: p.groups.clone(),
            secret: p.secret.clone(),
            platform_key: p.platform_key,
            platform_key_gen: p.platform_key_gen,
            topic_prefix: p.topic_prefix.clone(),
            broker: broker.to_owned(),
            ca_file: None,
            keep_alive_secs: default_keep_alive(),
            data_dir,
            sale_lock: None,
            utc_offset_minutes: 0,
            installers: BTreeMap::new(),
            initial_versions: BTreeMap::new(),
        }
    }

    /// The key named in the config, where following the key chain starts.
    pub fn configured_key(&self) -> TrustedKey {
        TrustedKey {
            generation: self.platform_key_gen,
            key: self.platform_key,
        }
    }

    pub fn to_toml(&self) -> String {
        toml::to_string(self).expect("machine config serializes to TOML")
    }

    pub fn installer_for(&self, kind: &Kind) -> InstallerConfig {
        self.installers.get(kind).cloned().unwrap_or_default()
    }
}

/// Where things are in a config file, and what to say about a TOML or serde error.
mod locate {
    use std::ops::Range;

    use super::Problem;

    /// 1-based line and column (in characters) of byte `offset`.
    pub fn line_column(text: &str, offset: usize) -> (usize, usize) {
        let offset = offset.min(text.len());
        let before = text.get(..offset).unwrap_or(text);
        let line = before.matches('\n').count() + 1;
        let line_start = before.rfind('\n').map_or(0, |i| i + 1);
        let column = before[line_start..].chars().count() + 1;
        (line, column)
    }

    /// Where `path` (table names, then a key) is written in `text`: the key itself, or the
    /// deepest part of the path that is written down.
    pub fn key(text: &str, path: &[String]) -> Option<(usize, usize)> {
        let doc = toml_edit::ImDocument::parse(text).ok()?;
        let mut table: &dyn toml_edit::TableLike = doc.as_table();
        let mut best: Option<Range<usize>> = None;
        for part in path {
            let Some((key, item)) = table.get_key_value(part) else {
                break;
            };
            if let Some(span) = key.span() {
                best = Some(span);
            }
            match item.as_table_like() {
                Some(t) => table = t,
                None => break,
            }
        }
        best.map(|s| line_column(text, s.start))
    }

    /// The key written at the start of the line holding byte `offset` (`key = ...`).
    fn key_on_line(text: &str, offset: usize) -> Option<String> {
        let start = text
            .get(..offset.min(text.len()))?
            .rfind('\n')
            .map_or(0, |i| i + 1);
        let line = text[start..].lines().next()?;
        let (key, _) = line.split_once('=')?;
        let key = key.trim().trim_matches(['"', '\'']);
        let last = key.rsplit('.').next()?.trim().trim_matches(['"', '\'']);
        (!last.is_empty()
            && last
                .chars()
                .all(|c| c.is_ascii_alphanumeric() || "_-".contains(c)))
        .then(|| last.to_owned())
    }

    /// The line within `span` that starts with key `name` (serde reports an unknown key of a
    /// table at the table, not at the key).
    fn key_within(text: &str, span: &Range<usize>, name: &str) -> Option<usize> {
        let region = text.get(span.clone())?;
        let mut offset = span.start;
        for line in region.split_inclusive('\n') {
            let trimmed = line.trim_start();
            let written = trimmed.trim_start_matches(['"', '\'']);
            if let Some(rest) = written.strip_prefix(name) {
                let rest = rest.trim_start_matches(['"', '\'']).trim_start();
                if rest.starts_with('=') {
                    return Some(offset + (line.len() - trimmed.len()));
                }
            }
            offset += line.len();
        }
        None
    }

    /// How to write a value of the type serde expected.
    fn type_fix(expected: &str) -> String {
        let how = match expected {
            e if e.starts_with('i') || e.starts_with('u') => "a whole number, without quotes",
            "a string" | "string" => "a string in quotes",
            "a sequence" => "a list in brackets, e.g. [\"a\", \"b\"]",
            "a map" => "a table: a [section] or { key = value }",
            "a boolean" => "true or false",
            _ => "",
        };
        if how.is_empty() {
            format!("write {expected} here")
        } else {
            format!("write {how} here")
        }
    }

    /// What a key holds, for a value of the right type that is still wrong.
    fn key_fix(key: &str) -> &'static str {
        match key {
            "machine" => "write the machine id as provisioned: 1 to 64 of A-Z a-z 0-9 . _ - (`fleetcast machine provision` prints the whole config)",
            "secret" => "write the machine's secret as `fleetcast machine provision` printed it: 64 hex digits",
            "platform_key" => "write the platform's public key: 64 hex digits, as in the provisioned config (or platform.pub in the platform's data dir)",
            "platform_key_gen" => "write the key generation from the provisioned config (0 for the platform's first key)",
            "groups" => "write a list of group ids as provisioned, e.g. groups = [\"shanghai\"]",
            "topic_prefix" => "write the platform's topic prefix, e.g. topic_prefix = \"fleet\"",
            "broker" => "write mqtt://HOST:PORT, or mqtts://HOST:PORT for TLS",
            "ca_file" | "data_dir" | "sale_lock" => "write a path in quotes, e.g. \"/var/lib/fleetcast/device\"",
            "utc_offset_minutes" => "write minutes east of UTC as a whole number, e.g. 480 for UTC+8",
            "type" => "write type = \"slots\" (A/B slots, the default) or type = \"command\"",
            "cmd" | "health_cmd" => "write the command line in quotes",
            _ => "see the configuration reference in docs/device.md",
        }
    }

    /// What to add for a missing key.
    fn missing_fix(key: &str) -> String {
        match key {
            "machine" | "secret" | "platform_key" => format!(
                "add {key} = \"...\" from the config `fleetcast machine provision` printed for this machine"
            ),
            "data_dir" => "add data_dir = \"/var/lib/fleetcast/device\" (where the agent keeps its state)".into(),
            "type" => "add type = \"slots\" (A/B slots, the default) or type = \"command\" with cmd".into(),
            "cmd" => "add cmd = \"/path/to/installer {file} {version}\"".into(),
            other => format!("add {other} = ... (see the configuration reference in docs/device.md)"),
        }
    }

    /// A TOML syntax or type error as a [`Problem`] with a line and a fix.
    pub fn toml_problem(text: &str, e: &toml::de::Error) -> Problem {
        let message = e.message().trim().replace('\n', "; ");
        let span = e.span();
        let at = |offset: usize| Some(line_column(text, offset));
        let whole = |s: &Range<usize>| s.start == 0 && s.end >= text.trim_end().len();
        if let Some(rest) = message.strip_prefix("unknown field `") {
            let name = rest.split('`').next().unwrap_or_default();
            let allowed = rest.split_once("expected ").map_or("", |(_, e)| e);
            let offset = span
                .as_ref()
                .and_then(|s| key_within(text, s, name).or(Some(s.start)));
            return Problem {
                at: offset.and_then(at),
                what: format!("unknown key `{name}`"),
                fix: format!(
                    "remove it, or correct its spelling: the keys allowed here are {allowed}"
                ),
            };
        }
        if let Some(rest) = message.strip_prefix("missing field `") {
            let name = rest.split('`').next().unwrap_or_default();
            let table = span.as_ref().filter(|s| !whole(s));
            let what = match table {
                Some(s) => format!(
                    "missing key `{name}` in this table ({})",
                    text[s.clone()].lines().next().unwrap_or("").trim()
                ),
                None => format!("missing key `{name}`"),
            };
            return Problem {
                at: table.and_then(|s| at(s.start)),
                what,
                fix: missing_fix(name),
            };
        }
        let key = span.as_ref().and_then(|s| key_on_line(text, s.start));
        let fix = if message.starts_with("duplicate key") {
            "this key is set twice: keep one of the two lines (e.g. the `broker` you added, not \
             the provisioned one), and delete the other"
                .to_owned()
        } else if let Some(rest) = message.strip_prefix("unknown variant `") {
            let allowed = rest.split_once("expected ").map_or("", |(_, e)| e);
            format!("use one of {allowed}")
        } else if let Some((_, expected)) = message
            .strip_prefix("invalid type: ")
            .and_then(|r| r.split_once(", expected "))
        {
            type_fix(expected)
        } else if let Some(key) = &key {
            key_fix(key).to_owned()
        } else {
            "correct the TOML here: strings in quotes, one key = value per line, [section] headers"
                .into()
        };
        let what = match &key {
            Some(key) if !message.contains(key.as_str()) => format!("{key}: {message}"),
            _ => message,
        };
        Problem {
            at: span.and_then(|s| at(s.start)),
            what,
            fix,
        }
    }
}

/// Whether the program a shell command line starts with can be found (an installer or health
/// check that cannot run should fail when the agent starts, not at the first install).
mod program {
    use std::os::unix::fs::PermissionsExt;
    use std::path::Path;

    /// Builtins and keywords of `sh`: nothing to look for on disk.
    const SHELL_WORDS: &[&str] = &[
        ":", ".", "[", "[[", "!", "{", "(", "alias", "break", "case", "cd", "command", "continue",
        "echo", "eval", "exec", "exit", "export", "false", "for", "if", "kill", "printf", "pwd",
        "read", "readonly", "return", "set", "shift", "sleep", "test", "trap", "true", "type",
        "ulimit", "umask", "unset", "until", "wait", "while",
    ];

    /// The first word of `cmd` after variable assignments, unquoted.
    fn first_word(cmd: &str) -> Option<&str> {
        let word = cmd.split_whitespace().find(|w| {
            let assignment = w.split_once('=').is_some_and(|(name, _)| {
                !name.is_empty()
                    && name.chars().all(|c| c.is_ascii_alphanumeric() || c == '_')
                    && !name.starts_with(|c: char| c.is_ascii_digit())
            });
            !assignment
        })?;
        let unquoted = word
            .strip_prefix('\'')
            .and_then(|w| w.strip_suffix('\''))
            .or_else(|| word.strip_prefix('"').and_then(|w| w.strip_suffix('"')))
            .unwrap_or(word);
        Some(unquoted)
    }

    fn executable(path: &Path) -> Result<(), String> {
        let meta = std::fs::metadata(path).map_err(|e| format!("{}: {e}", path.display()))?;
        if !meta.is_file() {
            return Err(format!("{} is not a file", path.display()));
        }
        if meta.permissions().mode() & 0o111 == 0 {
            return Err(format!("{} is not executable", path.display()));
        }
        Ok(())
    }

    pub fn check(cmd: &str) -> Result<(), String> {
        let Some(word) = first_word(cmd) else {
            return Err("the command is empty".into());
        };
        // Expansions, placeholders and redirections: only the shell can tell.
        if word.contains(['{', '$', '`', '(', ')', '<', '>', '|', ';', '&', '*', '?']) {
            return Ok(());
        }
        if word.contains('/') {
            return executable(Path::new(word));
        }
        if SHELL_WORDS.contains(&word) {
            return Ok(());
        }
        let path = std::env::var_os("PATH").unwrap_or_default();
        if std::env::split_paths(&path).any(|dir| executable(&dir.join(word)).is_ok()) {
            return Ok(());
        }
        Err(format!(
            "`{word}` is not found in PATH ({})",
            path.to_string_lossy()
        ))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use fleetcast_proto::auth::PlatformKey;

    fn sample() -> MachineConfig {
        let p = ProvisionedMachine {
            machine: MachineId::new("vm-001").unwrap(),
            groups: vec![GroupId::new("a").unwrap()],
            secret: Secret::from_bytes([7; 32]),
            platform_key: PlatformKey::from_seed([1; 32]).public(),
            platform_key_gen: 0,
            topic_prefix: "fleet".into(),
        };
        let mut c = MachineConfig::from_provisioned(&p, "mqtt://127.0.0.1:1883", "/tmp/x".into());
        c.installers.insert(
            Kind::new("firmware").unwrap(),
            InstallerConfig::Command {
                cmd: "/usr/bin/install.sh {file} {version}".into(),
            },
        );
        c.installers.insert(
            Kind::new("app").unwrap(),
            InstallerConfig::Slots {
                health_cmd: Some("true".into()),
            },
        );
        c.initial_versions
            .insert(Kind::new("app").unwrap(), "1.0.0".into());
        c
    }

    #[test]
    fn a_config_round_trips_through_toml() {
        let c = sample();
        let text = c.to_toml();
        assert!(text.contains("type = \"command\""), "{text}");
        let back: MachineConfig = toml::from_str(&text).unwrap();
        assert_eq!(back, c);
    }

    #[test]
    fn defaults_fill_the_prefix_broker_and_installers() {
        let c = sample();
        let text = format!(
            "machine = \"vm-9\"\nsecret = \"{}\"\nplatform_key = \"{}\"\ndata_dir = \"/d\"\n",
            c.secret.to_hex(),
            c.platform_key.to_hex()
        );
        let c: MachineConfig = toml::from_str(&text).unwrap();
        assert_eq!(c.topic_prefix, "fleet");
        assert_eq!(c.platform_key_gen, 0);
        assert_eq!(c.broker, "mqtt://127.0.0.1:1883");
        assert_eq!(
            c.installer_for(&Kind::new("app").unwrap()),
            InstallerConfig::Slots { health_cmd: None }
        );
    }

    #[test]
    fn a_machine_provisioned_after_rotations_names_its_key_generation() {
        let mut c = sample();
        c.platform_key_gen = 3;
        let text = c.to_toml();
        assert!(text.contains("platform_key_gen = 3"), "{text}");
        let back: MachineConfig = toml::from_str(&text).unwrap();
        assert_eq!(back.configured_key().generation, 3);
        assert_eq!(back.configured_key().key, c.platform_key);
    }

    #[test]
    fn a_bad_file_names_its_path() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("machine.toml");
        std::fs::write(&path, "machine = \"a/b\"").unwrap();
        let err = MachineConfig::load(&path).unwrap_err().to_string();
        assert!(err.contains("machine.toml"), "{err}");
    }

    /// A config file every user may read is named with its mode and the fix; one only its owner
    /// or its group may read, and a missing one, are not.
    #[test]
    fn a_config_others_may_read_is_warned_of() {
        use std::os::unix::fs::PermissionsExt;
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("vm-001.toml");
        std::fs::write(&path, "secret = \"...\"").unwrap();
        let chmod =
            |mode| std::fs::set_permissions(&path, std::fs::Permissions::from_mode(mode)).unwrap();
        chmod(0o644);
        let warning = MachineConfig::readable_by_others(&path).expect("0644 is warned of");
        assert!(
            warning.contains("mode 644") && warning.contains("chmod o-rwx"),
            "{warning}"
        );
        // The packaged layout: the service reads it through its group.
        chmod(0o640);
        assert_eq!(
            MachineConfig::readable_by_others(&path),
            None,
            "group-readable"
        );
        chmod(0o600);
        assert_eq!(MachineConfig::readable_by_others(&path), None);
        assert_eq!(
            MachineConfig::readable_by_others(dir.path().join("absent")),
            None
        );
    }

    /// A valid config followed by `extra`, loaded from a file in a temp dir.
    fn load_with(extra: &str) -> (tempfile::TempDir, Result<MachineConfig, ConfigError>) {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("device.toml");
        let c = sample();
        let text = format!(
            "machine = \"vm-001\"\nsecret = \"{}\"\nplatform_key = \"{}\"\ndata_dir = \"/var/lib/fleetcast/device\"\n{extra}",
            c.secret.to_hex(),
            c.platform_key.to_hex()
        );
        std::fs::write(&path, text).unwrap();
        let result = MachineConfig::load(&path);
        (dir, result)
    }

    /// The one problem of a config with `extra` (lines 1-4 are valid), and the whole message.
    fn problem(extra: &str) -> (Problem, String) {
        let (_dir, result) = load_with(extra);
        let err = result.expect_err("the config is refused");
        let problems = err.problems().to_vec();
        assert_eq!(problems.len(), 1, "{err}");
        let message = err.to_string();
        assert!(message.contains("device.toml"), "names the file: {message}");
        assert!(
            message.contains("\n  fix: "),
            "says how to fix it: {message}"
        );
        (problems.into_iter().next().unwrap(), message)
    }

    #[test]
    fn a_valid_config_loads_and_the_sale_lock_defaults_to_the_data_dir() {
        let (_dir, result) =
            load_with("[installers.app]\ntype = \"slots\"\nhealth_cmd = \"true\"\n");
        let c = result.unwrap();
        assert_eq!(
            c.sale_lock_path(),
            Path::new("/var/lib/fleetcast/device/sale.lock")
        );
        let (_dir, result) = load_with("sale_lock = \"/tmp/vending-sale.lock\"\n");
        assert_eq!(
            result.unwrap().sale_lock_path(),
            Path::new("/tmp/vending-sale.lock")
        );
    }

    #[test]
    fn an_unknown_key_is_refused_at_its_line_with_the_keys_allowed() {
        let (p, message) = problem("utc_ofset_minutes = 480\n");
        assert_eq!(p.at, Some((5, 1)), "{message}");
        assert!(p.what.contains("`utc_ofset_minutes`"), "{message}");
        assert!(p.fix.contains("`utc_offset_minutes`"), "{message}");
        assert!(
            message.contains("device.toml:5:1: unknown key"),
            "{message}"
        );
    }

    /// device.md warns of adding a `broker` line to a config that has one: the fix says to
    /// keep one of the two, not how to write a broker address.
    #[test]
    fn a_key_set_twice_is_refused_with_keep_one_of_the_two() {
        let (p, message) = problem("broker = \"mqtt://a:1883\"\nbroker = \"mqtt://b:1883\"\n");
        assert_eq!(p.at.map(|a| a.0), Some(6), "{message}");
        assert!(p.fix.contains("set twice"), "{message}");
        assert!(!p.fix.contains("write mqtt://"), "{message}");
    }

    #[test]
    fn an_unknown_key_in_an_installer_is_refused_at_its_own_line() {
        let (p, message) = problem("[installers.app]\ntype = \"slots\"\nhelth_cmd = \"true\"\n");
        assert_eq!(p.at, Some((7, 1)), "{message}");
        assert!(p.fix.contains("`health_cmd`"), "{message}");
    }

    #[test]
    fn a_value_of_the_wrong_type_is_refused_with_the_type_to_write() {
        let (p, message) = problem("utc_offset_minutes = \"+08:00\"\n");
        assert_eq!(p.at, Some((5, 22)), "{message}");
        assert!(p.fix.contains("whole number"), "{message}");
        let (p, message) = problem("groups = \"shanghai\"\n");
        assert_eq!(p.at.map(|a| a.0), Some(5), "{message}");
        assert!(p.fix.contains("list"), "{message}");
        let (p, message) = problem("[installers.app]\ntype = \"slot\"\n");
        assert_eq!(p.at, Some((6, 8)), "{message}");
        assert!(p.fix.contains("`slots`"), "{message}");
    }

    #[test]
    fn an_installer_without_its_command_is_refused_at_its_table() {
        let (p, message) = problem("\n[installers.firmware]\ntype = \"command\"\n");
        assert_eq!(p.at, Some((6, 1)), "{message}");
        assert!(p.what.contains("`cmd`"), "{message}");
        assert!(p.fix.contains("cmd = "), "{message}");
    }

    #[test]
    fn an_installer_or_health_check_whose_program_is_missing_is_refused() {
        let (p, message) = problem(
            "[installers.firmware]\ntype = \"command\"\ncmd = \"/opt/vendor/no-such-flasher {file}\"\n",
        );
        assert_eq!(p.at, Some((7, 1)), "{message}");
        assert!(p.what.contains("/opt/vendor/no-such-flasher"), "{message}");
        assert!(p.fix.contains("full path"), "{message}");
        let (p, message) = problem(
            "[installers.app]\ntype = \"slots\"\nhealth_cmd = \"no-such-health-probe --quick\"\n",
        );
        assert_eq!(p.at, Some((7, 1)), "{message}");
        assert!(
            p.what
                .contains("`no-such-health-probe` is not found in PATH"),
            "{message}"
        );
        // A command that never names the artifact cannot install it.
        let (p, message) = problem("[installers.firmware]\ntype = \"command\"\ncmd = \"true\"\n");
        assert!(p.what.contains("{file}"), "{message}");
        // Programs that exist, shell builtins, assignments and expansions pass.
        for cmd in [
            "sh -c 'cp {file} /tmp/x'",
            "FOO=1 /bin/sh -c true {file}",
            "exec cp {file} /tmp/x",
            "\\\"$HOME/bin/install\\\" {file}",
        ] {
            let (_dir, result) = load_with(&format!(
                "[installers.firmware]\ntype = \"command\"\ncmd = \"{cmd}\"\n"
            ));
            result.unwrap_or_else(|e| panic!("{cmd}: {e}"));
        }
    }

    #[test]
    fn an_unreadable_key_is_refused_with_what_it_should_hold() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("device.toml");
        let key = sample().platform_key.to_hex();
        std::fs::write(
            &path,
            format!("machine = \"vm-001\"\nsecret = \"not hex\"\nplatform_key = \"{key}\"\ndata_dir = \"/d\"\n"),
        )
        .unwrap();
        let err = MachineConfig::load(&path).unwrap_err();
        let p = &err.problems()[0];
        assert_eq!(p.at, Some((2, 10)), "{err}");
        assert!(p.fix.contains("64 hex digits"), "{err}");
        // A CA file that cannot be read.
        let (p, message) = problem("broker = \"mqtts://broker.example:8883\"\nca_file = \"/etc/fleetcast/no-such-ca.pem\"\n");
        assert_eq!(p.at, Some((6, 1)), "{message}");
        assert!(p.what.contains("no-such-ca.pem"), "{message}");
        assert!(p.fix.contains("PEM"), "{message}");
    }

    #[test]
    fn a_missing_key_a_syntax_error_and_an_unreadable_file_say_what_to_do() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("device.toml");
        std::fs::write(&path, "machine = \"vm-001\"\n").unwrap();
        let err = MachineConfig::load(&path).unwrap_err();
        assert_eq!(err.problems()[0].at, None, "{err}");
        assert!(err.to_string().contains("missing key `secret`"), "{err}");
        assert!(
            err.to_string().contains("fleetcast machine provision"),
            "{err}"
        );

        std::fs::write(&path, "machine = \"vm-001\nsecret = 1\n").unwrap();
        let err = MachineConfig::load(&path).unwrap_err();
        assert_eq!(err.problems()[0].at.map(|a| a.0), Some(1), "{err}");

        let err = MachineConfig::load(dir.path().join("absent.toml")).unwrap_err();
        assert!(err.to_string().contains("absent.toml"), "{err}");
        assert!(err.to_string().contains("fix: create it"), "{err}");
    }

    /// The keep-alive defaults to the one every fleetcast client asks for, a slow link's
    /// longer one is kept, and one outside 10-1200 s is refused at its line.
    #[test]
    fn the_keep_alive_is_30_s_unless_set_and_must_be_10_to_1200() {
        let (_dir, result) = load_with("");
        let c = result.unwrap();
        assert_eq!(c.keep_alive_secs, 30);
        assert!(
            !c.to_toml().contains("keep_alive_secs"),
            "a default is not written"
        );
        let (_dir, result) = load_with("keep_alive_secs = 180\n");
        let c = result.unwrap();
        assert_eq!(c.keep_alive_secs, 180);
        assert!(c.to_toml().contains("keep_alive_secs = 180"));
        for bad in ["5", "1201", "0"] {
            let (p, message) = problem(&format!("keep_alive_secs = {bad}\n"));
            assert_eq!(p.at, Some((5, 1)), "{message}");
            assert!(p.what.contains("outside 10 to 1200"), "{message}");
        }
    }

    #[test]
    fn every_problem_serde_cannot_see_is_reported_at_once() {
        let (_dir, result) = load_with(
            "broker = \"http://x\"\ntopic_prefix = \"fleet/#\"\n[initial_versions]\napp = \"\"\n",
        );
        let err = result.unwrap_err();
        let lines: Vec<Option<usize>> = err.problems().iter().map(|p| p.at.map(|a| a.0)).collect();
        assert_eq!(lines, vec![Some(5), Some(6), Some(8)], "{err}");
    }
}
