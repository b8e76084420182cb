//! `kasctl completion <shell>` prints a script for each shell, without a server or token.

use std::process::Command;

#[test]
fn completion_scripts_need_no_server() {
    for (shell, marker) in [
        ("bash", "_kasctl()"),
        ("zsh", "#compdef kasctl"),
        ("fish", "complete -c kasctl"),
    ] {
        let out = Command::new(env!("CARGO_BIN_EXE_kasctl"))
            .args(["--token-file", "/nonexistent", "completion", shell])
            .output()
            .expect("run kasctl");
        assert!(
            out.status.success(),
            "{shell}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        let script = String::from_utf8_lossy(&out.stdout);
        assert!(script.contains(marker), "{shell}: {script}");
        assert!(
            script.contains("environment"),
            "{shell}: subcommands missing"
        );
    }
    let out = Command::new(env!("CARGO_BIN_EXE_kasctl"))
        .args(["completion", "tcsh"])
        .output()
        .expect("run kasctl");
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("tcsh"));
}
