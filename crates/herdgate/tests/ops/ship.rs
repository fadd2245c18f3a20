//! The shipped artifacts, built from the herdgate this test run built
//! (`CARGO_BIN_EXE_herdgate`, the etcd build; the documented release
//! commands build with `--release` instead):
//!
//! - the container image (`scripts/image`, deploy/container): built with
//!   podman from scratch, then its exported root filesystem runs under
//!   `chroot` as the image's non-root user (podman cannot run containers
//!   on this machine) and serves `/readyz` and a real pusher-js client;
//! - the Kubernetes manifests (`scripts/k8s-check`, deploy/k8s): every
//!   overlay rendered with `kubectl kustomize` and validated offline, and
//!   every herdgate.toml they embed passing `herdgate check-config` with the
//!   environment and the Secret its pod gets;
//! - the Debian package (`scripts/deb`, deploy/debian): installed into an
//!   empty root with `dpkg --root` (maintainer scripts chroot-less, honouring
//!   `DPKG_ROOT`), its binary checking and serving the installed config as
//!   the user postinst created, then purged.
//!
//! scripts/setup installs podman, kubectl, kubernetes-validate and binutils;
//! a missing tool fails these tests, it never skips them. The only poll is
//! `/readyz`, which has no event to await.

use herdgate_testkit::admin_get;
use herdgate_testkit::process::{repo_path, Herdgate};
use serde_json::Value;
use std::net::SocketAddr;
use std::os::unix::fs::{MetadataExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

const BIN: &str = env!("CARGO_BIN_EXE_herdgate");
/// PATH for commands run with a cleared environment.
const SYSTEM_PATH: &str = "/usr/sbin:/usr/bin:/sbin:/bin";
/// The image's user (deploy/container/Containerfile `USER`).
const IMAGE_UID: u32 = 10001;

/// Run `cmd`; panic with its output unless it succeeds. Its stdout.
fn run(cmd: &mut Command) -> String {
    let out = cmd
        .output()
        .unwrap_or_else(|e| panic!("cannot run {cmd:?}: {e} (scripts/setup installs it)"));
    let stdout = String::from_utf8_lossy(&out.stdout).into_owned();
    assert!(
        out.status.success(),
        "{cmd:?} failed ({}):\n{stdout}\n{}",
        out.status,
        String::from_utf8_lossy(&out.stderr)
    );
    stdout
}

/// Run `cmd`, which must fail; its stderr.
fn run_failing(cmd: &mut Command) -> String {
    let out = cmd.output().unwrap();
    assert!(
        !out.status.success(),
        "{cmd:?} should have failed:\n{}",
        String::from_utf8_lossy(&out.stdout)
    );
    String::from_utf8_lossy(&out.stderr).into_owned()
}

fn last_line(s: &str) -> &str {
    s.lines()
        .rfind(|l| !l.trim().is_empty())
        .unwrap_or("")
        .trim()
}

/// A directory others than root may enter (a 0700 temp dir would keep the
/// unprivileged herdgate out of its own files).
fn open_tempdir() -> tempfile::TempDir {
    let d = tempfile::tempdir().unwrap();
    std::fs::set_permissions(d.path(), std::fs::Permissions::from_mode(0o755)).unwrap();
    d
}

/// Poll `/readyz` (it has no event to await) until it answers 200.
async fn until_ready(admin: SocketAddr) {
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let (status, body) = admin_get(admin, "/readyz").await;
        if status == 200 {
            return;
        }
        assert!(
            Instant::now() < deadline,
            "/readyz still {status} after 10 s: {body}"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// The effective uid of a running process.
fn uid_of(pid: u32) -> u32 {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap();
    let line = status.lines().find(|l| l.starts_with("Uid:")).unwrap();
    line.split_whitespace().nth(2).unwrap().parse().unwrap()
}

/// tests/compat/ship/connect.test.mjs: real pusher-js (and the official
/// Node SDK signing and publishing) against `port`.
fn pusher_js_connects(port: &str, app_id: &str, key: &str, secret: &str) {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/compat");
    // Two tests here get here at once: one `npm ci` in the directory.
    static NPM: std::sync::Once = std::sync::Once::new();
    NPM.call_once(|| herdgate_testkit::npm_ci(&dir));
    let out = Command::new("node")
        .args(["--test", "--test-timeout=60000", "ship/connect.test.mjs"])
        .current_dir(&dir)
        .env("HERDGATE_HOST", "127.0.0.1")
        .env("HERDGATE_PORT", port)
        .env("HERDGATE_APP_ID", app_id)
        .env("HERDGATE_APP_KEY", key)
        .env("HERDGATE_APP_SECRET", secret)
        .output()
        .expect("node is needed for the pusher-js test");
    let stdout = String::from_utf8_lossy(&out.stdout);
    println!("{stdout}");
    eprintln!("{}", String::from_utf8_lossy(&out.stderr));
    assert!(out.status.success(), "connect.test.mjs failed");
    assert!(
        stdout.contains("# pass 1") && stdout.contains("# fail 0"),
        "connect.test.mjs did not pass its one test"
    );
}

fn hex_secret() -> String {
    format!(
        "{:016x}{:016x}",
        herdgate_testkit::rand_suffix(),
        herdgate_testkit::rand_suffix()
    )
}

// ---------------------------------------------------------------------------
// Container image
// ---------------------------------------------------------------------------

/// Removes the test's image and container whatever happens.
struct Podman {
    tag: String,
    container: String,
}

impl Drop for Podman {
    fn drop(&mut self) {
        let _ = Command::new("podman")
            .args(["rm", "-f", &self.container])
            .output();
        let _ = Command::new("podman")
            .args(["rmi", "-f", &self.tag])
            .output();
    }
}

/// Every regular file and symlink under `root`, relative, sorted.
fn files_under(root: &Path) -> Vec<String> {
    let mut out = Vec::new();
    let mut stack = vec![root.to_path_buf()];
    while let Some(dir) = stack.pop() {
        for e in std::fs::read_dir(&dir).unwrap() {
            let e = e.unwrap();
            let t = e.file_type().unwrap();
            if t.is_dir() {
                stack.push(e.path());
            } else {
                let rel = e.path().strip_prefix(root).unwrap().display().to_string();
                out.push(format!("/{rel}"));
            }
        }
    }
    out.sort();
    out
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn container_image_builds_from_scratch_and_its_rootfs_serves_pusher_js_as_non_root() {
    let suffix = herdgate_testkit::rand_suffix();
    let pod = Podman {
        tag: format!("localhost/herdgate-ship-test:{suffix}"),
        container: format!("herdgate-ship-test-{suffix}"),
    };
    let work = open_tempdir();
    let context = work.path().join("context");
    let built = run(Command::new(repo_path("scripts/image"))
        .args(["--binary", BIN, "--tag", &pod.tag, "--context"])
        .arg(&context));
    let id = last_line(&built).to_string();
    assert!(
        id.len() >= 12 && id.chars().all(|c| c.is_ascii_hexdigit()),
        "scripts/image prints the image id last: {built}"
    );

    // The image's metadata: from scratch (one layer per COPY, nothing
    // under them), a numeric non-root user, the ports, no HEALTHCHECK.
    let inspect: Value = serde_json::from_str(&run(
        Command::new("podman").args(["image", "inspect", "--format", "json", &pod.tag])
    ))
    .unwrap();
    let image = &inspect[0];
    assert!(
        id.starts_with(&image["Id"].as_str().unwrap()[..12]),
        "{id} vs {}",
        image["Id"]
    );
    let config = &image["Config"];
    assert_eq!(config["User"], format!("{IMAGE_UID}:{IMAGE_UID}"));
    let ports: Vec<&str> = config["ExposedPorts"]
        .as_object()
        .expect("ExposedPorts")
        .keys()
        .map(String::as_str)
        .collect();
    for p in ["6001/tcp", "9601/tcp", "7001/tcp"] {
        assert!(ports.contains(&p), "{p} not exposed: {ports:?}");
    }
    assert!(
        config["Healthcheck"].is_null(),
        "no HEALTHCHECK: {}",
        config["Healthcheck"]
    );
    assert_eq!(
        config["Entrypoint"],
        serde_json::json!(["/usr/bin/herdgate"])
    );
    assert_eq!(
        config["Cmd"],
        serde_json::json!(["--config", "/etc/herdgate/herdgate.toml"])
    );
    assert_eq!(
        image["RootFS"]["Layers"].as_array().unwrap().len(),
        3,
        "three COPY layers on scratch: {}",
        image["RootFS"]
    );

    // Its root filesystem, as a container would see it.
    run(Command::new("podman").args(["create", "--name", &pod.container, &pod.tag]));
    let tar = work.path().join("rootfs.tar");
    run(Command::new("podman")
        .args(["export", "-o"])
        .arg(&tar)
        .arg(&pod.container));
    let rootfs = work.path().join("rootfs");
    std::fs::create_dir(&rootfs).unwrap();
    run(Command::new("tar")
        .arg("-xf")
        .arg(&tar)
        .arg("-C")
        .arg(&rootfs));

    // Minimal: the binary, exactly the libraries ldd lists for it (and the
    // loader), and five files under /etc. No shell, nothing else.
    let ldd = run(Command::new("ldd").arg(BIN));
    let mut expected: Vec<String> = ldd
        .lines()
        .filter_map(|l| {
            let w: Vec<&str> = l.split_whitespace().collect();
            match w.as_slice() {
                [_, "=>", path, ..] if path.starts_with('/') => Some(path.to_string()),
                [path, ..] if path.starts_with('/') => Some(path.to_string()),
                _ => None,
            }
        })
        .collect();
    assert!(
        expected.iter().any(|l| l.contains("libc.so")),
        "ldd lists libc: {ldd}"
    );
    expected.extend(
        [
            "/usr/bin/herdgate",
            "/etc/herdgate/herdgate.toml",
            "/etc/ssl/certs/ca-certificates.crt",
            "/etc/passwd",
            "/etc/group",
            "/etc/nsswitch.conf",
        ]
        .map(String::from),
    );
    expected.sort();
    let found: Vec<String> = files_under(&rootfs)
        .into_iter()
        // podman's own mount points, empty in the export.
        .filter(|f| {
            !matches!(
                f.as_str(),
                "/etc/hosts" | "/etc/resolv.conf" | "/etc/hostname" | "/run/.containerenv"
            )
        })
        .collect();
    assert_eq!(found, expected, "the image's files");
    let passwd = std::fs::read_to_string(rootfs.join("etc/passwd")).unwrap();
    assert!(
        passwd.contains(&format!("herdgate:x:{IMAGE_UID}:{IMAGE_UID}:")),
        "{passwd}"
    );
    let ca = std::fs::read_to_string(rootfs.join("etc/ssl/certs/ca-certificates.crt")).unwrap();
    assert!(ca.matches("BEGIN CERTIFICATE").count() > 50, "a CA bundle");

    let chroot = |args: &[&str]| {
        let mut c = Command::new("chroot");
        c.arg(format!("--userspec={IMAGE_UID}:{IMAGE_UID}"))
            .arg(&rootfs)
            .args(args)
            .env_clear()
            // Finds chroot here; in the image, /usr/bin holds herdgate alone.
            .env("PATH", SYSTEM_PATH);
        c
    };
    // The image's config has no default for the app secret: without it,
    // the error names the key and the variable.
    let err = run_failing(&mut chroot(&[
        "/usr/bin/herdgate",
        "check-config",
        "/etc/herdgate/herdgate.toml",
    ]));
    assert!(
        err.contains("apps[0].secret") && err.contains("HERDGATE_APP_SECRET"),
        "{err}"
    );

    // The image's entrypoint and command, as its user, with the variables
    // a `podman run -e` would set. Listeners on loopback port 0 here (the
    // image's defaults are 0.0.0.0:6001 and :9601).
    let secret = hex_secret();
    let mut serve = chroot(&[
        "/usr/bin/herdgate",
        "--config",
        "/etc/herdgate/herdgate.toml",
    ]);
    serve
        .env("HERDGATE_APP_SECRET", &secret)
        .env("HERDGATE_APP_ID", "777001")
        .env("HERDGATE_APP_KEY", "image-key")
        .env("HERDGATE_LISTEN", "127.0.0.1:0")
        .env("HERDGATE_ADMIN_LISTEN", "127.0.0.1:0");
    let hg = Herdgate::start_command(serve, rootfs.join("etc/herdgate/herdgate.toml"), true);
    assert_eq!(
        uid_of(hg.pid()),
        IMAGE_UID,
        "herdgate runs as the image's user"
    );
    until_ready(hg.admin_addr()).await;
    let (status, _) = admin_get(hg.admin_addr(), "/livez").await;
    assert_eq!(status, 200);
    let (status, metrics) = admin_get(hg.admin_addr(), "/metrics").await;
    assert_eq!(status, 200);
    assert!(metrics.contains("\nherdgate_load_state 0\n"), "{metrics}");
    pusher_js_connects(hg.port(), "777001", "image-key", &secret);
    // The two pusher-js sockets were this herdgate's.
    let (_, metrics) = admin_get(hg.admin_addr(), "/metrics").await;
    let accepted: u64 = metrics
        .lines()
        .find_map(|l| l.strip_prefix("herdgate_connections_accepted_total "))
        .unwrap_or_else(|| panic!("no accepted counter in\n{metrics}"))
        .parse()
        .unwrap();
    assert!(accepted >= 2, "accepted {accepted}");
}

// ---------------------------------------------------------------------------
// Kubernetes manifests
// ---------------------------------------------------------------------------

#[test]
fn kubernetes_manifests_render_validate_and_embed_configs_that_pass_check_config() {
    let out = tempfile::tempdir().unwrap();
    let report = run(Command::new(repo_path("scripts/k8s-check"))
        .arg("--out")
        .arg(out.path()));
    println!("{report}");
    assert!(report.contains("every manifest valid"), "{report}");
    for overlay in ["standalone", "cluster", "cluster-keda"] {
        let rendered = std::fs::read_to_string(out.path().join(format!("{overlay}.yaml")))
            .unwrap_or_else(|e| panic!("{overlay} was not rendered: {e}"));
        assert!(rendered.contains("kind: Deployment"), "{overlay}");
    }

    let mut roles = Vec::new();
    let mut dirs = std::fs::read_dir(out.path().join("configs"))
        .unwrap()
        .map(|e| e.unwrap().path())
        .collect::<Vec<_>>();
    dirs.sort();
    for path in dirs {
        let c: Value = serde_json::from_str(&std::fs::read_to_string(&path).unwrap()).unwrap();
        let name = c["name"].as_str().unwrap();
        roles.push(c["role"].as_str().unwrap().to_string());
        // The Secret as the pod mounts it, at a path of our own.
        let dir = tempfile::tempdir().unwrap();
        let secrets = dir.path().join("secrets");
        std::fs::create_dir(&secrets).unwrap();
        std::fs::write(secrets.join("app-secret"), format!("{}\n", hex_secret())).unwrap();
        std::fs::write(
            secrets.join("cluster-secret"),
            format!("{}\n", hex_secret()),
        )
        .unwrap();
        let text = c["config"].as_str().unwrap();
        let secret_dir = c["secret_dir"].as_str().unwrap();
        assert!(text.contains(secret_dir), "{name}: {secret_dir}");
        let file = dir.path().join("herdgate.toml");
        std::fs::write(&file, text.replace(secret_dir, secrets.to_str().unwrap())).unwrap();
        let env: Vec<(String, String)> = c["env"]
            .as_object()
            .unwrap()
            .iter()
            .map(|(k, v)| (k.clone(), v.as_str().unwrap().to_string()))
            .collect();
        let ok = run(Command::new(BIN)
            .arg("check-config")
            .arg(&file)
            .env_clear()
            .envs(env.iter().map(|(k, v)| (k, v))));
        assert!(ok.trim_end().ends_with(": ok"), "{name}: {ok}");

        // What comes from the pod really does: without the downward API's
        // variables the config does not load, naming them.
        if text.contains("${POD_NAME}") {
            let err = run_failing(Command::new(BIN).arg("check-config").arg(&file).env_clear());
            assert!(
                err.contains("cluster.node_id") && err.contains("POD_NAME"),
                "{name}: {err}"
            );
        }
        // And the secret really comes from the Secret's files.
        std::fs::remove_file(secrets.join("app-secret")).unwrap();
        let err = run_failing(
            Command::new(BIN)
                .arg("check-config")
                .arg(&file)
                .env_clear()
                .envs(env.iter().map(|(k, v)| (k, v))),
        );
        assert!(err.contains("apps[0].secret_file"), "{name}: {err}");
    }
    roles.sort();
    assert_eq!(
        roles,
        ["edge", "edge", "standalone", "worker", "worker"],
        "one config per herdgate workload of the three overlays"
    );
}

// ---------------------------------------------------------------------------
// Debian package
// ---------------------------------------------------------------------------

/// The id of `name` in a passwd- or group-format file.
fn id_in(file: &Path, name: &str) -> Option<u32> {
    std::fs::read_to_string(file)
        .ok()?
        .lines()
        .find(|l| l.split(':').next() == Some(name))
        .map(|l| l.split(':').nth(2).unwrap().parse().unwrap())
}

fn dpkg(root: &Path) -> Command {
    let mut c = Command::new("dpkg");
    c.arg(format!("--root={}", root.display()))
        .arg("--force-script-chrootless")
        .env("DEBIAN_FRONTEND", "noninteractive");
    c
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn debian_package_installs_into_a_clean_root_checks_and_serves_its_config() {
    let work = open_tempdir();
    let built = run(Command::new(repo_path("scripts/deb"))
        .args(["--binary", BIN, "--compress", "gzip", "--out"])
        .arg(work.path().join("out")));
    let deb = PathBuf::from(last_line(&built));
    assert!(deb.exists(), "scripts/deb prints the .deb last: {built}");

    // What the package says and holds.
    let field = |f: &str| run(Command::new("dpkg-deb").arg("--field").arg(&deb).arg(f));
    assert_eq!(field("Package").trim(), "herdgate");
    let depends = field("Depends");
    assert!(depends.contains("libc6 (>= 2."), "{depends}");
    let conffiles = run(Command::new("dpkg-deb")
        .arg("--info")
        .arg(&deb)
        .arg("conffiles"));
    assert_eq!(conffiles.trim(), "/etc/herdgate/herdgate.toml");
    let contents = run(Command::new("dpkg-deb").arg("--contents").arg(&deb));
    for f in [
        "./usr/bin/herdgate",
        "./etc/herdgate/herdgate.toml",
        "./usr/lib/systemd/system/herdgate.service",
        "./usr/lib/systemd/system/herdgate.socket",
        "./usr/lib/systemd/system/herdgate-admin.socket",
        "./usr/lib/sysusers.d/herdgate.conf",
        "./usr/lib/tmpfiles.d/herdgate.conf",
        "./usr/share/doc/herdgate/copyright",
        "./usr/share/doc/herdgate/OPERATIONS.md",
    ] {
        assert!(
            contents.lines().any(|l| l.ends_with(f)),
            "{f} not in the package:\n{contents}"
        );
    }
    assert!(
        contents.lines().all(|l| l.contains(" root/root ")),
        "every file root-owned in the archive:\n{contents}"
    );

    // An empty root: only dpkg's own database. Nothing of the host's
    // /etc/passwd is in it: postinst must create the user there.
    let root = work.path().join("root");
    for d in [
        "var/lib/dpkg/info",
        "var/lib/dpkg/updates",
        "var/log",
        "etc",
    ] {
        std::fs::create_dir_all(root.join(d)).unwrap();
    }
    std::fs::write(root.join("var/lib/dpkg/status"), "").unwrap();
    std::fs::write(root.join("var/lib/dpkg/available"), "").unwrap();
    std::fs::set_permissions(&root, std::fs::Permissions::from_mode(0o755)).unwrap();
    // The empty root has none of its dependencies (libc6, adduser): forced.
    run(dpkg(&root).args(["--force-depends", "-i"]).arg(&deb));
    let status = run(dpkg(&root).args(["-s", "herdgate"]));
    assert!(status.contains("Status: install ok installed"), "{status}");

    // postinst: a system user and group in the root, the config theirs to read.
    let uid = id_in(&root.join("etc/passwd"), "herdgate").expect("postinst created the user");
    let gid = id_in(&root.join("etc/group"), "herdgate").expect("postinst created the group");
    assert!((1..1000).contains(&uid), "a system uid: {uid}");
    let config = root.join("etc/herdgate/herdgate.toml");
    let meta = std::fs::metadata(&config).unwrap();
    assert_eq!(
        (meta.uid(), meta.gid(), meta.mode() & 0o777),
        (0, gid, 0o640),
        "config root:herdgate 0640"
    );
    assert_eq!(
        std::fs::read_to_string(&config).unwrap(),
        std::fs::read_to_string(repo_path("config/herdgate.toml")).unwrap()
    );
    // The units are the repository's, with the binary where the package puts it.
    for unit in [
        "herdgate.service",
        "herdgate.socket",
        "herdgate-admin.socket",
    ] {
        let shipped = std::fs::read_to_string(repo_path(&format!("systemd/{unit}"))).unwrap();
        let installed =
            std::fs::read_to_string(root.join("usr/lib/systemd/system").join(unit)).unwrap();
        assert_eq!(
            installed,
            shipped.replace("/usr/local/bin/herdgate", "/usr/bin/herdgate"),
            "{unit}"
        );
    }
    let service =
        std::fs::read_to_string(root.join("usr/lib/systemd/system/herdgate.service")).unwrap();
    assert!(
        service.contains("\nExecStart=/usr/bin/herdgate --config /etc/herdgate/herdgate.toml\n")
    );

    // The installed binary is this build's (debug info stripped).
    let bin = root.join("usr/bin/herdgate");
    assert_eq!(
        run(Command::new(&bin).arg("--version")),
        run(Command::new(BIN).arg("--version"))
    );
    // check-config on the installed config, as the service's user...
    let as_user = |uid: u32, gid: u32| {
        let mut c = Command::new("setpriv");
        c.arg(format!("--reuid={uid}"))
            .arg(format!("--regid={gid}"))
            .arg("--clear-groups")
            .arg("--")
            .arg(&bin)
            .env_clear()
            .env("PATH", SYSTEM_PATH);
        c
    };
    let ok = run(as_user(uid, gid).arg("check-config").arg(&config));
    assert!(ok.trim_end().ends_with(": ok"), "{ok}");
    // ...which another user cannot read (it holds the app secrets).
    let err = run_failing(as_user(65534, 65534).arg("check-config").arg(&config));
    assert!(err.contains("ermission denied"), "{err}");

    // A short serve of the installed config as the service's user, with only
    // the two listen addresses moved to loopback port 0.
    let text = std::fs::read_to_string(&config).unwrap();
    let moved = text
        .replacen("listen = \"0.0.0.0:6001\"", "listen = \"127.0.0.1:0\"", 1)
        .replacen(
            "admin_listen = \"127.0.0.1:9601\"",
            "admin_listen = \"127.0.0.1:0\"",
            1,
        );
    assert_eq!(
        moved.matches("127.0.0.1:0").count(),
        2,
        "both listeners moved"
    );
    let serving = work.path().join("serving.toml");
    std::fs::write(&serving, moved).unwrap();
    std::os::unix::fs::chown(&serving, Some(0), Some(gid)).unwrap();
    std::fs::set_permissions(&serving, std::fs::Permissions::from_mode(0o640)).unwrap();
    let mut serve = as_user(uid, gid);
    serve.arg("--config").arg(&serving);
    let hg = Herdgate::start_command(serve, serving.clone(), true);
    assert_eq!(uid_of(hg.pid()), uid);
    until_ready(hg.admin_addr()).await;
    // The config's demo app (the package's default).
    pusher_js_connects(
        hg.port(),
        "100001",
        "herdgate-demo-key",
        "herdgate-demo-secret",
    );
    drop(hg);

    // Purge: the files and the conffile go; the user stays (Debian keeps
    // system users).
    run(dpkg(&root).args(["--purge", "herdgate"]));
    assert!(!bin.exists(), "binary removed");
    assert!(!config.exists(), "conffile purged");
    assert!(!root
        .join("usr/lib/systemd/system/herdgate.service")
        .exists());
    assert_eq!(id_in(&root.join("etc/passwd"), "herdgate"), Some(uid));
}
