//! Hands the artifact to an external command: `cmd` with `{file}` and `{version}` replaced by
//! shell-quoted values, run through `sh -c`. Exit 0 means installed.

use std::path::Path;

use fleetcast_proto::Kind;

use super::{tail, InstallError};

#[derive(Debug, Clone)]
pub struct CommandInstaller {
    kind: Kind,
    cmd: String,
}

/// Quotes `s` for `sh`: one single-quoted word.
pub fn shell_quote(s: &str) -> String {
    format!("'{}'", s.replace('\'', r"'\''"))
}

impl CommandInstaller {
    pub fn new(kind: Kind, cmd: String) -> Self {
        Self { kind, cmd }
    }

    pub fn kind(&self) -> &Kind {
        &self.kind
    }

    /// Substitutes both placeholders in one pass over `cmd`, so a substituted value is never
    /// scanned again (a path holding `{version}` must not get the version spliced into it).
    pub fn command_line(&self, version: &str, file: &Path) -> String {
        let values = [
            ("{file}", shell_quote(&file.to_string_lossy())),
            ("{version}", shell_quote(version)),
        ];
        let mut line = String::with_capacity(self.cmd.len() + 64);
        let mut rest = self.cmd.as_str();
        'scan: while !rest.is_empty() {
            for (placeholder, value) in &values {
                if let Some(after) = rest.strip_prefix(placeholder) {
                    line.push_str(value);
                    rest = after;
                    continue 'scan;
                }
            }
            let c = rest.chars().next().expect("not empty");
            line.push(c);
            rest = &rest[c.len_utf8()..];
        }
        line
    }

    pub async fn install(&self, version: &str, file: &Path) -> Result<(), InstallError> {
        let line = self.command_line(version, file);
        let failed = |reason: String| InstallError::Failed {
            kind: self.kind.clone(),
            version: version.to_owned(),
            reason,
        };
        let out = tokio::process::Command::new("sh")
            .arg("-c")
            .arg(&line)
            .env("FLEETCAST_VERSION", version)
            .env("FLEETCAST_KIND", self.kind.as_str())
            .kill_on_drop(true)
            .output()
            .await
            .map_err(|e| failed(format!("cannot run `{line}`: {e}")))?;
        if out.status.success() {
            return Ok(());
        }
        let code = out
            .status
            .code()
            .map_or_else(|| "a signal".to_owned(), |c| format!("exit code {c}"));
        Err(failed(format!(
            "`{line}` ended with {code}{}",
            tail(&out.stderr)
        )))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn placeholders_are_replaced_by_quoted_values() {
        let c = CommandInstaller::new(Kind::new("fw").unwrap(), "install {file} {version}".into());
        assert_eq!(
            c.command_line("1.0", Path::new("/a b/it's")),
            r"install '/a b/it'\''s' '1.0'"
        );
    }

    #[test]
    fn substituted_values_are_never_expanded_again() {
        let c = CommandInstaller::new(Kind::new("fw").unwrap(), "install {file} {version}".into());
        // A data dir whose path holds a placeholder must not pull the version into it unquoted.
        assert_eq!(
            c.command_line("$(reboot)", Path::new("/data/{version}/x")),
            r"install '/data/{version}/x' '$(reboot)'"
        );
        assert_eq!(
            c.command_line("{file}", Path::new("/x")),
            r"install '/x' '{file}'"
        );
    }

    #[tokio::test]
    async fn a_version_with_quotes_and_a_path_with_spaces_reach_the_command_intact() {
        let dir = tempfile::tempdir().unwrap();
        let file = dir.path().join("it's a {version} file");
        std::fs::write(&file, b"x").unwrap();
        let out = dir.path().join("out");
        let c = CommandInstaller::new(
            Kind::new("fw").unwrap(),
            format!(
                "printf '%s\\n' {{file}} {{version}} > {}",
                shell_quote(&out.to_string_lossy())
            ),
        );
        let marker = dir.path().join("pwned");
        let version = format!("1.0'\"$(touch${{IFS}}{})`id`;", marker.display());
        c.install(&version, &file).await.unwrap();
        assert_eq!(
            std::fs::read_to_string(&out).unwrap(),
            format!("{}\n{version}\n", file.display())
        );
        assert!(!marker.exists());
    }

    #[tokio::test]
    async fn a_failing_command_reports_its_exit_code_and_stderr() {
        let c = CommandInstaller::new(
            Kind::new("fw").unwrap(),
            "echo bad thing >&2; exit 3 # {file}".into(),
        );
        let err = c
            .install("1", Path::new("/x"))
            .await
            .unwrap_err()
            .to_string();
        assert!(
            err.contains("exit code 3") && err.contains("bad thing"),
            "{err}"
        );
        let ok = CommandInstaller::new(Kind::new("fw").unwrap(), "test {version} = 2".into());
        ok.install("2", Path::new("/x")).await.unwrap();
    }
}
