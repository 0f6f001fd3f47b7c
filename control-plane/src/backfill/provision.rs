//! Running the operator's provision / deprovision hooks.

use std::process::Stdio;
use std::time::Duration;

use tokio::process::Command;

use super::BackfillError;

fn tail(bytes: &[u8], lines: usize) -> String {
    let s = String::from_utf8_lossy(bytes);
    let all: Vec<&str> = s.lines().collect();
    all[all.len().saturating_sub(lines)..].join("\n")
}

async fn run(
    what: &'static str,
    command: &str,
    args: &[&str],
    env: &[(&str, &str)],
    timeout: Duration,
) -> Result<Vec<u8>, BackfillError> {
    let fail = |detail: String| BackfillError::Command {
        what,
        command: command.to_string(),
        detail,
    };
    // `sh -c '<cmd> "$@"' sh <args>`: the command may carry its own arguments.
    let mut cmd = Command::new("sh");
    cmd.arg("-c")
        .arg(format!("{command} \"$@\""))
        .arg("sh")
        .args(args)
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .kill_on_drop(true);
    for (k, v) in env {
        cmd.env(k, v);
    }
    let child = cmd
        .spawn()
        .map_err(|e| fail(format!("cannot start: {e}")))?;
    let out = match tokio::time::timeout(timeout, child.wait_with_output()).await {
        Ok(r) => r.map_err(|e| fail(e.to_string()))?,
        Err(_) => return Err(fail(format!("no answer within {timeout:?}"))),
    };
    if !out.status.success() {
        return Err(fail(format!("{}\n{}", out.status, tail(&out.stderr, 20))));
    }
    Ok(out.stdout)
}

/// Runs the provision command for cluster `id` of backfill `name`; returns
/// the bootstrap address it printed (its last non-empty stdout line).
pub(crate) async fn provision(
    command: &str,
    name: &str,
    id: &str,
    timeout: Duration,
) -> Result<String, BackfillError> {
    let out = run(
        "provision command",
        command,
        &[],
        &[("FLOTILLA_BACKFILL", name), ("FLOTILLA_CLUSTER_ID", id)],
        timeout,
    )
    .await?;
    let text = String::from_utf8_lossy(&out);
    let line = text
        .lines()
        .map(str::trim)
        .rfind(|l| !l.is_empty())
        .unwrap_or_default()
        .to_string();
    if line.is_empty() || line.contains(char::is_whitespace) {
        return Err(BackfillError::Command {
            what: "provision command",
            command: command.to_string(),
            detail: format!(
                "expected a bootstrap address (host:port) as the last line of its output, got {:?}",
                tail(&out, 3)
            ),
        });
    }
    Ok(line)
}

/// Runs the deprovision command with `bootstrap` as its last argument.
pub(crate) async fn deprovision(
    command: &str,
    name: &str,
    id: &str,
    bootstrap: &str,
    timeout: Duration,
) -> Result<(), BackfillError> {
    run(
        "deprovision command",
        command,
        &[bootstrap],
        &[("FLOTILLA_BACKFILL", name), ("FLOTILLA_CLUSTER_ID", id)],
        timeout,
    )
    .await
    .map(|_| ())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn provision_reads_the_last_line_and_reports_failures() {
        let t = Duration::from_secs(5);
        let b = provision("echo starting; echo 127.0.0.1:9092", "b", "b-tmp1", t)
            .await
            .unwrap();
        assert_eq!(b, "127.0.0.1:9092");
        let e = provision("echo oops >&2; exit 3", "b", "x", t)
            .await
            .unwrap_err();
        assert!(e.to_string().contains("oops"), "{e}");
        assert!(provision("true", "b", "x", t).await.is_err());
        deprovision(
            "test \"$FLOTILLA_CLUSTER_ID\" = x && test",
            "b",
            "x",
            "h:1",
            t,
        )
        .await
        .unwrap();
    }
}
