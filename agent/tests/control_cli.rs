//! The `safekit` agent verbs as an operator meets them without a running agent:
//! help text for every verb, and one-line errors with the documented exit codes.

use std::process::Command;

fn safekit(safevar: &std::path::Path, args: &[&str]) -> std::process::Output {
    Command::new(env!("CARGO_BIN_EXE_safekit"))
        .args(args)
        .env("SAFEVAR", safevar)
        .env_remove("SAFEMODULE")
        .output()
        .expect("run safekit")
}

#[test]
fn every_agent_verb_has_help_text() {
    let dir = tempfile::tempdir().expect("temp dir");
    let help = String::from_utf8(safekit(dir.path(), &["--help"]).stdout).expect("utf-8");
    for verb in [
        "start",
        "stop",
        "forcestop",
        "restart",
        "swap",
        "prim",
        "primforce",
        "second",
        "state",
        "log",
        "printe",
        "printw",
        "printi",
        "module",
        "cluster",
    ] {
        let line = help
            .lines()
            .find(|line| line.trim_start().starts_with(&format!("{verb} ")))
            .unwrap_or_else(|| panic!("`{verb}` missing from safekit --help:\n{help}"));
        assert!(
            line.split_whitespace().count() > 2,
            "`{verb}` has no description: {line}"
        );
    }
    let state_help =
        String::from_utf8(safekit(dir.path(), &["state", "--help"]).stdout).expect("utf-8");
    assert!(
        state_help.contains("STOP 0, WAIT 1, ALONE 2, PRIM 3, SECOND 4"),
        "the exit codes are documented: {state_help}"
    );
}

#[test]
fn without_an_agent_verbs_fail_in_one_line_and_state_q_exits_5() {
    let dir = tempfile::tempdir().expect("temp dir");
    let output = safekit(dir.path(), &["start", "-m", "mirror"]);
    assert_eq!(output.status.code(), Some(1));
    let stderr = String::from_utf8(output.stderr).expect("utf-8");
    assert_eq!(stderr.lines().count(), 1, "{stderr}");
    assert!(stderr.contains("agent not running"), "{stderr}");

    let output = safekit(dir.path(), &["state", "-m", "mirror", "-lq"]);
    assert_eq!(
        output.status.code(),
        Some(5),
        "unknown state is not a state code"
    );
    assert!(String::from_utf8_lossy(&output.stderr).contains("agent not running"));
}

#[test]
fn cluster_genkey_writes_a_private_secret_once() {
    use std::os::unix::fs::PermissionsExt;
    let dir = tempfile::tempdir().expect("temp dir");
    let output = safekit(dir.path(), &["cluster", "genkey"]);
    assert!(
        output.status.success(),
        "{}",
        String::from_utf8_lossy(&output.stderr)
    );
    let path = dir.path().join("cluster").join("secret");
    let mode = std::fs::metadata(&path)
        .expect("secret written")
        .permissions()
        .mode();
    assert_eq!(mode & 0o777, 0o600);
    let secret = std::fs::read_to_string(&path).expect("read secret");
    assert_eq!(secret.trim().len(), 64, "32 random bytes in hex: {secret}");

    let again = safekit(dir.path(), &["cluster", "genkey"]);
    assert_eq!(again.status.code(), Some(1), "an existing secret is kept");
    assert_eq!(std::fs::read_to_string(&path).expect("read secret"), secret);
    let forced = safekit(dir.path(), &["cluster", "genkey", "--force"]);
    assert!(forced.status.success());
    assert_ne!(std::fs::read_to_string(&path).expect("read secret"), secret);
}
