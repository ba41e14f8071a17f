//! Who the CLI acts as, found without a flag on every call, and `fleetcast profile`.
//!
//! The search (docs/cli.md, "Credentials"), first match wins:
//! 1. `--profile FILE` / `FLEETCAST_PROFILE`: an operator profile (the TOML `operator add`
//!    prints);
//! 2. `--admin-secret HEX` / `FLEETCAST_ADMIN_SECRET`, as `--operator` (default `admin`);
//! 3. `--admin-secret-file FILE`, as `--operator`;
//! 4. the saved profile `$XDG_CONFIG_HOME/fleetcast/profile.toml` (default
//!    `~/.config/fleetcast/profile.toml`), written once by `fleetcast profile save` or
//!    `fleetcast operator add --save-profile`;
//! 5. `$FLEETCAST_DATA/admin.secret` (`FLEETCAST_DATA` is the data dir `fleetcast serve` uses),
//!    as `--operator`;
//! 6. `./fleetcast-data/admin.secret`, as `--operator`.
//!
//! A source named explicitly (1-3) is used even if it does not load, so a typo in a flag is an
//! error instead of a silent fall-through to another identity; the others count when their
//! file exists. [`locate`] is the search itself, over a [`SearchEnv`] passed in (tests give it
//! temp dirs instead of the process environment).

use std::fmt;
use std::path::{Path, PathBuf};

use anyhow::Context;
use clap::Subcommand;
use fleetcast_proto::auth::Secret;

use super::ClientArgs;

/// The operator profile file (`fleetcast operator add` prints it).
#[derive(Debug, Clone, serde::Serialize, serde::Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Profile {
    pub operator: String,
    pub role: fleetcast_proto::acl::Role,
    pub secret: Secret,
    pub platform_key: fleetcast_proto::auth::PlatformPublicKey,
    pub topic_prefix: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub broker: Option<String>,
    /// CA certificate (PEM) to pin for an mqtts:// broker.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub ca_file: Option<PathBuf>,
}

impl Profile {
    pub fn load(path: &Path) -> anyhow::Result<Self> {
        let text = std::fs::read_to_string(path)
            .with_context(|| format!("reading operator profile {}", path.display()))?;
        toml::from_str(&text).with_context(|| format!("operator profile {}", path.display()))
    }
}

/// What the credential search reads from the environment.
#[derive(Debug, Clone, Default)]
pub struct SearchEnv {
    pub xdg_config_home: Option<PathBuf>,
    pub home: Option<PathBuf>,
    /// `FLEETCAST_DATA`: the data dir of `fleetcast serve`.
    pub fleetcast_data: Option<PathBuf>,
    /// `FLEETCAST_BROKER`.
    pub broker: Option<String>,
    /// Where `./fleetcast-data` is looked for.
    pub working_dir: PathBuf,
}

impl SearchEnv {
    /// This process's environment (empty variables count as unset).
    pub fn from_process() -> Self {
        let var = |name: &str| std::env::var_os(name).filter(|v| !v.is_empty());
        Self {
            xdg_config_home: var("XDG_CONFIG_HOME").map(PathBuf::from),
            home: var("HOME").map(PathBuf::from),
            fleetcast_data: var("FLEETCAST_DATA").map(PathBuf::from),
            broker: var("FLEETCAST_BROKER").map(|v| v.to_string_lossy().into_owned()),
            working_dir: PathBuf::from("."),
        }
    }

    /// `$XDG_CONFIG_HOME/fleetcast/profile.toml`, else `$HOME/.config/fleetcast/profile.toml`
    /// (a relative XDG_CONFIG_HOME is ignored, as the XDG spec asks).
    pub fn saved_profile_path(&self) -> Option<PathBuf> {
        let base = self
            .xdg_config_home
            .clone()
            .filter(|p| p.is_absolute())
            .or_else(|| self.home.as_ref().map(|h| h.join(".config")))?;
        Some(base.join("fleetcast").join("profile.toml"))
    }
}

/// Where the credentials come from.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum CredentialSource {
    /// An operator profile file, named by `how`.
    Profile { path: PathBuf, how: &'static str },
    /// The secret itself (`--admin-secret` / `FLEETCAST_ADMIN_SECRET`).
    Secret,
    /// A file holding the operator's secret, named by `how`.
    SecretFile { path: PathBuf, how: &'static str },
}

impl fmt::Display for CredentialSource {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            CredentialSource::Profile { path, how } => {
                write!(f, "operator profile {} ({how})", path.display())
            }
            CredentialSource::Secret => f.write_str("--admin-secret / FLEETCAST_ADMIN_SECRET"),
            CredentialSource::SecretFile { path, how } => {
                write!(f, "secret file {} ({how})", path.display())
            }
        }
    }
}

/// No credentials anywhere: every place tried, in order, and why it did not count.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error(
    "no operator credentials found; tried, in order:\n{}\nrun `fleetcast serve` in this \
     directory, set FLEETCAST_DATA to the data dir of `fleetcast serve`, or save a profile \
     once with `fleetcast profile save FILE`",
    .tried.iter().enumerate().map(|(i, t)| format!("  {}. {t}", i + 1)).collect::<Vec<_>>().join("\n")
)]
pub struct NotFound {
    pub tried: Vec<String>,
}

/// Where this command's credentials come from (the order is in the module docs).
pub fn locate(args: &ClientArgs, env: &SearchEnv) -> Result<CredentialSource, NotFound> {
    if let Some(path) = &args.profile {
        return Ok(CredentialSource::Profile {
            path: path.clone(),
            how: "--profile / FLEETCAST_PROFILE",
        });
    }
    if args.admin_secret.is_some() {
        return Ok(CredentialSource::Secret);
    }
    if let Some(path) = &args.admin_secret_file {
        return Ok(CredentialSource::SecretFile {
            path: path.clone(),
            how: "--admin-secret-file",
        });
    }
    let mut tried = vec![
        "--profile / FLEETCAST_PROFILE: not set".to_owned(),
        "--admin-secret / FLEETCAST_ADMIN_SECRET: not set".to_owned(),
        "--admin-secret-file: not set".to_owned(),
    ];
    match env.saved_profile_path() {
        Some(path) if path.exists() => {
            return Ok(CredentialSource::Profile {
                path,
                how: "saved profile",
            })
        }
        Some(path) => tried.push(format!("saved profile {}: no such file", path.display())),
        None => tried.push("saved profile: neither XDG_CONFIG_HOME nor HOME is set".into()),
    }
    match &env.fleetcast_data {
        Some(dir) => {
            let path = crate::keys::admin_secret_path(dir);
            if path.exists() {
                return Ok(CredentialSource::SecretFile {
                    path,
                    how: "$FLEETCAST_DATA",
                });
            }
            tried.push(format!(
                "{} ($FLEETCAST_DATA): no such file",
                path.display()
            ));
        }
        None => tried.push("$FLEETCAST_DATA/admin.secret: FLEETCAST_DATA not set".into()),
    }
    let local = crate::keys::admin_secret_path(&env.working_dir.join("fleetcast-data"));
    if local.exists() {
        return Ok(CredentialSource::SecretFile {
            path: local,
            how: "./fleetcast-data",
        });
    }
    tried.push(format!("{}: no such file", local.display()));
    Err(NotFound { tried })
}

/// The operator a command acts as, and the profile it came with (if any).
pub struct Credentials {
    pub operator: String,
    pub secret: Secret,
    pub profile: Option<Profile>,
    pub source: CredentialSource,
}

/// Reads the credentials `source` names; a secret acts as `operator`.
pub fn load(
    source: CredentialSource,
    operator: &str,
    args: &ClientArgs,
) -> anyhow::Result<Credentials> {
    let in_source = || format!("credentials from {source}");
    match &source {
        CredentialSource::Profile { path, .. } => {
            let profile = Profile::load(path).with_context(in_source)?;
            Ok(Credentials {
                operator: profile.operator.clone(),
                secret: profile.secret.clone(),
                profile: Some(profile),
                source,
            })
        }
        CredentialSource::Secret | CredentialSource::SecretFile { .. } => {
            let file = match &source {
                CredentialSource::SecretFile { path, .. } => path.clone(),
                _ => PathBuf::new(),
            };
            let secret = fleetcast_broker::admin::load_secret(args.admin_secret.as_deref(), &file)
                .map_err(anyhow::Error::msg)
                .with_context(in_source)?;
            Ok(Credentials {
                operator: operator.to_owned(),
                secret,
                profile: None,
                source,
            })
        }
    }
}

#[derive(Subcommand)]
pub enum ProfileCmd {
    /// Save an operator profile (the TOML `fleetcast operator add` prints) as your default:
    /// every later command acts as that operator without flags. Written to
    /// $XDG_CONFIG_HOME/fleetcast/profile.toml (default ~/.config/fleetcast/profile.toml),
    /// mode 0600.
    Save {
        file: PathBuf,
        /// Replace a saved profile that is already there.
        #[arg(long)]
        force: bool,
    },
    /// Which operator, broker and credentials the next command would use, and where they come
    /// from (prints no secret).
    Show,
}

pub async fn run(cmd: ProfileCmd, client: &ClientArgs) -> anyhow::Result<()> {
    let env = SearchEnv::from_process();
    match cmd {
        ProfileCmd::Save { file, force } => {
            let text = std::fs::read_to_string(&file)
                .with_context(|| format!("reading {}", file.display()))?;
            let profile: Profile = toml::from_str(&text)
                .with_context(|| format!("{} is not an operator profile", file.display()))?;
            let path = save(&text, &env, force)?;
            println!(
                "saved the profile of operator {} (role {}) to {}; fleetcast now acts as {} unless told otherwise",
                profile.operator,
                profile.role,
                path.display(),
                profile.operator
            );
            Ok(())
        }
        ProfileCmd::Show => {
            let resolved = client.resolve_in(&env)?;
            print!("{}", resolved.describe());
            Ok(())
        }
    }
}

/// Where `save` would write, refusing to overwrite unless `force`.
pub fn save_path(env: &SearchEnv, force: bool) -> anyhow::Result<PathBuf> {
    let path = env.saved_profile_path().context(
        "cannot save a profile: neither XDG_CONFIG_HOME nor HOME is set (pass --profile FILE instead)",
    )?;
    if path.exists() && !force {
        anyhow::bail!(
            "a saved profile already exists at {} (pass --force to replace it)",
            path.display()
        );
    }
    Ok(path)
}

/// Writes `text` (a profile) as the saved profile: directory 0700, file 0600, atomically.
pub fn save(text: &str, env: &SearchEnv, force: bool) -> anyhow::Result<PathBuf> {
    use std::os::unix::fs::DirBuilderExt;
    let path = save_path(env, force)?;
    if let Some(dir) = path.parent() {
        std::fs::DirBuilder::new()
            .recursive(true)
            .mode(0o700)
            .create(dir)
            .with_context(|| format!("creating {}", dir.display()))?;
    }
    crate::keys::write_atomic(&path, text.as_bytes(), 0o600)?;
    Ok(path)
}

#[cfg(test)]
mod tests {
    use super::*;
    use clap::Parser;

    fn args(extra: &[&str]) -> ClientArgs {
        let mut argv = vec!["fleetcast"];
        argv.extend_from_slice(extra);
        argv.push("machines");
        let cli = super::super::Cli::try_parse_from(argv).unwrap();
        cli.client
    }

    /// A home with a config dir, a FLEETCAST_DATA dir and a working dir, all empty.
    struct Dirs {
        _tmp: tempfile::TempDir,
        env: SearchEnv,
        data: PathBuf,
    }

    fn dirs() -> Dirs {
        let tmp = tempfile::tempdir().unwrap();
        let home = tmp.path().join("home");
        let data = tmp.path().join("served");
        let work = tmp.path().join("work");
        for d in [&home, &data, &work] {
            std::fs::create_dir_all(d).unwrap();
        }
        Dirs {
            env: SearchEnv {
                xdg_config_home: None,
                home: Some(home),
                fleetcast_data: Some(data.clone()),
                broker: None,
                working_dir: work,
            },
            data,
            _tmp: tmp,
        }
    }

    fn touch(path: &Path) {
        std::fs::create_dir_all(path.parent().unwrap()).unwrap();
        std::fs::write(path, "x").unwrap();
    }

    #[test]
    fn each_place_is_used_only_when_every_earlier_one_is_absent() {
        let d = dirs();
        let saved = d
            .env
            .home
            .as_ref()
            .unwrap()
            .join(".config/fleetcast/profile.toml");
        let data_secret = d.data.join("admin.secret");
        let local = d.env.working_dir.join("fleetcast-data/admin.secret");

        // Nothing anywhere: every place is named, in order.
        let err = locate(&args(&[]), &d.env).unwrap_err();
        assert_eq!(err.tried.len(), 6, "{err}");
        let text = err.to_string();
        for place in [
            "--profile",
            "--admin-secret /",
            "--admin-secret-file",
            saved.to_str().unwrap(),
            data_secret.to_str().unwrap(),
            local.to_str().unwrap(),
        ] {
            assert!(text.contains(place), "{place} missing from: {text}");
        }

        touch(&local);
        assert_eq!(
            locate(&args(&[]), &d.env).unwrap(),
            CredentialSource::SecretFile {
                path: local.clone(),
                how: "./fleetcast-data"
            }
        );
        touch(&data_secret);
        assert_eq!(
            locate(&args(&[]), &d.env).unwrap(),
            CredentialSource::SecretFile {
                path: data_secret.clone(),
                how: "$FLEETCAST_DATA"
            }
        );
        touch(&saved);
        assert_eq!(
            locate(&args(&[]), &d.env).unwrap(),
            CredentialSource::Profile {
                path: saved.clone(),
                how: "saved profile"
            }
        );
        // Explicit flags beat every file, in their own order.
        assert_eq!(
            locate(&args(&["--admin-secret-file", "/f"]), &d.env).unwrap(),
            CredentialSource::SecretFile {
                path: "/f".into(),
                how: "--admin-secret-file"
            }
        );
        assert_eq!(
            locate(
                &args(&["--admin-secret-file", "/f", "--admin-secret", "00"]),
                &d.env
            )
            .unwrap(),
            CredentialSource::Secret
        );
        assert_eq!(
            locate(
                &args(&["--admin-secret", "00", "--profile", "/p.toml"]),
                &d.env
            )
            .unwrap(),
            CredentialSource::Profile {
                path: "/p.toml".into(),
                how: "--profile / FLEETCAST_PROFILE"
            }
        );
    }

    #[test]
    fn a_named_file_is_used_even_when_missing_so_a_typo_is_an_error() {
        let d = dirs();
        touch(&d.data.join("admin.secret"));
        let source = locate(&args(&["--admin-secret-file", "/no/such"]), &d.env).unwrap();
        let err = load(source, "admin", &args(&["--admin-secret-file", "/no/such"]))
            .err()
            .unwrap();
        assert!(format!("{err:#}").contains("/no/such"), "{err:#}");
    }

    #[test]
    fn the_saved_profile_lives_under_xdg_config_home_or_home() {
        let mut env = SearchEnv {
            home: Some("/home/u".into()),
            ..Default::default()
        };
        assert_eq!(
            env.saved_profile_path(),
            Some("/home/u/.config/fleetcast/profile.toml".into())
        );
        env.xdg_config_home = Some("/cfg".into());
        assert_eq!(
            env.saved_profile_path(),
            Some("/cfg/fleetcast/profile.toml".into())
        );
        env.xdg_config_home = Some("relative".into());
        assert_eq!(
            env.saved_profile_path(),
            Some("/home/u/.config/fleetcast/profile.toml".into())
        );
        assert_eq!(SearchEnv::default().saved_profile_path(), None);
    }

    #[test]
    fn saving_writes_a_private_file_once_and_replaces_it_only_when_forced() {
        use std::os::unix::fs::PermissionsExt;
        let d = dirs();
        let path = save("first", &d.env, false).unwrap();
        assert_eq!(std::fs::read_to_string(&path).unwrap(), "first");
        let mode = |p: &Path| std::fs::metadata(p).unwrap().permissions().mode() & 0o777;
        assert_eq!(mode(&path), 0o600);
        assert_eq!(mode(path.parent().unwrap()), 0o700);
        let err = save("second", &d.env, false).unwrap_err();
        assert!(err.to_string().contains("--force"), "{err}");
        assert_eq!(std::fs::read_to_string(&path).unwrap(), "first");
        save("second", &d.env, true).unwrap();
        assert_eq!(std::fs::read_to_string(&path).unwrap(), "second");
    }
}
