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

    pub fn command_line(&self, version: &str, file: &Path) -> String {
        self.cmd
            .replace("{file}", &shell_quote(&file.to_string_lossy()))
            .replace("{version}", &shell_quote(version))
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
