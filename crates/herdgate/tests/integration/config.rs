//! Config files: the shipped ones validate; bad ones list every error with its key.

use herdgate::config::{Config, LoadError, EMBEDDED_DEFAULT};
use std::process::Command;

#[test]
fn every_file_under_config_parses_and_validates() {
    let dir = herdgate_testkit::process::repo_path("config");
    let mut seen = 0;
    for entry in std::fs::read_dir(&dir).unwrap() {
        let path = entry.unwrap().path();
        if path.extension().is_some_and(|e| e == "toml") {
            let r = Config::from_file(&path);
            let etcd = std::fs::read_to_string(&path)
                .unwrap()
                .contains("membership = \"etcd\"");
            if etcd && !cfg!(feature = "etcd") {
                // Without the etcd client compiled in, exactly that is said.
                let e = r
                    .expect_err("etcd membership without the feature")
                    .to_string();
                assert!(e.contains("--features etcd"), "{}: {e}", path.display());
            } else {
                r.unwrap_or_else(|e| panic!("{}: {e}", path.display()));
            }
            seen += 1;
        }
    }
    assert!(seen >= 1, "no config files found in {}", dir.display());
}

#[test]
fn embedded_default_has_a_numeric_demo_app() {
    let c = Config::from_toml_str(EMBEDDED_DEFAULT).unwrap();
    assert_eq!(c.apps.len(), 1);
    assert!(
        c.apps[0].id.parse::<u64>().is_ok(),
        "official SDKs (Python) need numeric app ids"
    );
    assert_eq!(c.server.listen, "0.0.0.0:6001");
    assert_eq!(c.server.admin_listen, "127.0.0.1:9601");
}

fn errors(text: &str) -> Vec<String> {
    match Config::from_toml_str(text) {
        Err(LoadError::Invalid(errs)) => errs.iter().map(|e| e.to_string()).collect(),
        other => panic!("expected errors, got {other:?}"),
    }
}

#[test]
fn validation_reports_every_error_with_its_dotted_key() {
    let errs = errors(
        r#"
[server]
listen = "nowhere"
activity_timeout = "0s"
[limits]
max_connections = 0
max_payload_bytes = 10
max_message_bytes = 5
[log]
format = "xml"
[[apps]]
id = "1"
key = "k"
secret = ""
[[apps]]
id = "1"
key = "k"
secret = "s p a c e"
"#,
    );
    for key in [
        "server.listen:",
        "server.activity_timeout:",
        "limits.max_connections:",
        "limits.max_message_bytes:",
        "log.format:",
        "apps[0].secret:",
        "apps[1].id:",
        "apps[1].key:",
        "apps[1].secret:",
    ] {
        assert!(
            errs.iter().any(|e| e.starts_with(key)),
            "no error for {key} in {errs:#?}"
        );
    }
}

#[test]
fn cluster_keys_are_checked_by_their_dotted_names() {
    let errs = errors(
        r#"
[cluster]
role = "worker"
membership = "etcd"
link_listen = "127.0.0.1:7001"
settle = "1s"
secret = "short"
[cluster.etcd]
endpoints = ["10.0.0.2:2379"]
prefix = "herdgate/"
lease_ttl = "1500ms"
keepalive_interval = "1s"
"#,
    );
    for key in [
        "cluster.node_id:",
        "cluster.settle:",
        "cluster.secret:",
        "cluster.etcd.endpoints",
        "cluster.etcd.prefix:",
        "cluster.etcd.lease_ttl:",
        "cluster.etcd.keepalive_interval:",
    ] {
        assert!(
            errs.iter().any(|e| e.starts_with(key)),
            "no error for {key} in {errs:#?}"
        );
    }
    // A lease too short for the cluster to freeze its membership in time
    // when etcd is lost (3 x 500ms + 500ms + 1.25 x 1s > 3s).
    let errs = errors(
        "[cluster]\nrole = \"edge\"\nmembership = \"etcd\"\nnode_id = \"e1\"\nheartbeat_interval = \"1s\"\nhandover_timeout = \"3s\"\nsecret = \"0123456789abcdef\"\n[cluster.etcd]\nendpoints = [\"http://127.0.0.1:2379\"]\n[[apps]]\nid = \"1\"\nkey = \"k\"\nsecret = \"s\"\n",
    );
    assert_eq!(errs.len(), 1, "{errs:?}");
    assert!(
        errs[0].starts_with("cluster.etcd.lease_ttl:") && errs[0].contains("freeze"),
        "{errs:?}"
    );
}

#[test]
fn unknown_keys_and_bad_types_name_the_key_and_line() {
    let errs = errors("[server]\nlisten = \"0.0.0.0:1\"\nlisten_typo = 1\n");
    assert_eq!(errs.len(), 1);
    assert!(
        errs[0].contains("listen_typo") && errs[0].contains("line 3"),
        "{errs:?}"
    );

    let errs = errors("[limits]\nmax_connections = \"many\"\n");
    assert!(
        errs[0].starts_with("limits.max_connections") && errs[0].contains("line 2"),
        "{errs:?}"
    );

    let errs = errors("[server]\npong_timeout = \"soon\"\n");
    assert!(
        errs[0].starts_with("server.pong_timeout") && errs[0].contains("500ms"),
        "{errs:?}"
    );

    let errs = errors("[server\n");
    assert!(errs[0].contains("line 1"), "{errs:?}");
}

#[test]
fn check_config_command_exit_codes() {
    let bin = env!("CARGO_BIN_EXE_herdgate");
    let good = herdgate_testkit::process::repo_path("config/herdgate.toml");
    let out = Command::new(bin)
        .arg("check-config")
        .arg(&good)
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );

    let dir = tempfile::tempdir().unwrap();
    let bad = dir.path().join("bad.toml");
    std::fs::write(&bad, "[limits]\nmax_connections = 0\nworker_mailbox = 0\n").unwrap();
    let out = Command::new(bin)
        .arg("check-config")
        .arg(&bad)
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(1));
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        stderr.contains("limits.max_connections") && stderr.contains("limits.worker_mailbox"),
        "{stderr}"
    );
    assert!(
        stderr.contains("apps"),
        "missing apps reported too: {stderr}"
    );

    let out = Command::new(bin)
        .arg("check-config")
        .arg(dir.path().join("missing.toml"))
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(1));
    assert!(String::from_utf8_lossy(&out.stderr).contains("cannot read"));
}

/// `${VAR}` / `${VAR:-default}` in double-quoted values and `secret_file`,
/// through the real binary's `check-config`: a missing variable names its
/// key and the variable; a set one (and a secret from a file) passes.
#[test]
fn values_come_from_the_environment_and_secrets_from_files() {
    let bin = env!("CARGO_BIN_EXE_herdgate");
    let dir = tempfile::tempdir().unwrap();
    let secret = dir.path().join("app.secret");
    std::fs::write(&secret, "from-a-file\n").unwrap();
    let cfg = dir.path().join("env.toml");
    std::fs::write(
        &cfg,
        format!(
            "[server]\nlisten = \"${{HG_TEST_LISTEN:-127.0.0.1:0}}\"\n\
             [[apps]]\nid = \"1\"\nkey = \"${{HG_TEST_APP_KEY}}\"\nsecret_file = {:?}\n",
            secret.display().to_string()
        ),
    )
    .unwrap();
    let check = |env: &[(&str, &str)]| {
        let mut cmd = Command::new(bin);
        cmd.arg("check-config")
            .arg(&cfg)
            .env_remove("HG_TEST_APP_KEY");
        for (k, v) in env {
            cmd.env(k, v);
        }
        let out = cmd.output().unwrap();
        (
            out.status.code(),
            String::from_utf8_lossy(&out.stderr).into_owned(),
        )
    };
    let (code, stderr) = check(&[]);
    assert_eq!(code, Some(1), "{stderr}");
    assert!(
        stderr.contains("apps[0].key") && stderr.contains("HG_TEST_APP_KEY"),
        "{stderr}"
    );
    let (code, stderr) = check(&[("HG_TEST_APP_KEY", "key-from-env")]);
    assert_eq!(code, Some(0), "{stderr}");

    // The secret itself, parsed the same way the server does.
    // (A default: the test sets no variable in its own process.)
    let c = herdgate::config::Config::from_toml_str(&format!(
        "[[apps]]\nid = \"1\"\nkey = \"${{HG_TEST_NEVER_SET:-key-by-default}}\"\nsecret_file = {:?}\n",
        secret.display().to_string()
    ))
    .unwrap();
    assert_eq!(
        (c.apps[0].key.as_str(), c.apps[0].secret.as_str()),
        ("key-by-default", "from-a-file")
    );

    // Both, or an unreadable file: named by key.
    let both = herdgate::config::Config::from_toml_str(&format!(
        "[[apps]]\nid = \"1\"\nkey = \"k\"\nsecret = \"s\"\nsecret_file = {:?}\n",
        secret.display().to_string()
    ))
    .unwrap_err()
    .to_string();
    assert!(both.contains("apps[0].secret_file"), "{both}");
    let missing = herdgate::config::Config::from_toml_str(
        "[[apps]]\nid = \"1\"\nkey = \"k\"\nsecret_file = \"/nonexistent/secret\"\n",
    )
    .unwrap_err()
    .to_string();
    assert!(
        missing.contains("cannot read /nonexistent/secret"),
        "{missing}"
    );
}

#[test]
fn refuses_to_start_when_connections_exceed_the_open_files_limit() {
    let dir = tempfile::tempdir().unwrap();
    let cfg = dir.path().join("big.toml");
    std::fs::write(
        &cfg,
        "[server]\nlisten = \"127.0.0.1:0\"\nadmin_listen = \"\"\n[limits]\nmax_connections = 100000000\n[[apps]]\nid = \"1\"\nkey = \"k\"\nsecret = \"s\"\n",
    )
    .unwrap();
    let out = Command::new(env!("CARGO_BIN_EXE_herdgate"))
        .arg("--config")
        .arg(&cfg)
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(1));
    let err = String::from_utf8_lossy(&out.stderr);
    let (soft, _) = herdgate::sys::raise_nofile_limit().unwrap();
    assert!(
        err.contains("100000000") && err.contains(&soft.to_string()),
        "names both numbers: {err}"
    );
}
