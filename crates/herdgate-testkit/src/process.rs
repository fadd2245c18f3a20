//! herdgate as a real child process, for tests that need signals, stdout
//! or a second program (pusher-js, herdgate-load) talking to it.

use std::io::{BufRead, BufReader};
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::sync::mpsc;
use std::time::{Duration, Instant};

pub struct Herdgate {
    pub child: Child,
    pub addr: String,
    pub admin: Option<String>,
    /// Log lines after the listening line, as they arrive.
    pub log: mpsc::Receiver<String>,
    _dir: Option<tempfile::TempDir>,
    pub config_path: PathBuf,
}

impl Drop for Herdgate {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl Herdgate {
    /// Write `config` to a temp file and start `herdgate --config` on it.
    /// `config` should listen on port 0; the real address is read from the log.
    pub fn start(config: &str) -> Herdgate {
        Self::start_with_env(config, &[])
    }

    pub fn start_with_env(config: &str, env: &[(&str, &str)]) -> Herdgate {
        Self::start_custom(config, |cmd| {
            for (k, v) in env {
                cmd.env(k, v);
            }
        })
    }

    /// Like [`Herdgate::start`], with `customize` applied to the command last
    /// (environment, removed variables, ...).
    pub fn start_custom(config: &str, customize: impl FnOnce(&mut Command)) -> Herdgate {
        Self::spawn(config, None, customize)
    }

    /// Like [`Herdgate::start`], but as user `nobody` (uid 65534): a test can
    /// then cut this one process's traffic with an iptables owner match
    /// ([`crate::cluster::Cut`]), a real partial partition on loopback.
    pub fn start_as_nobody(config: &str) -> Herdgate {
        Self::spawn(config, Some(65534), |_| {})
    }

    fn spawn(config: &str, uid: Option<u32>, customize: impl FnOnce(&mut Command)) -> Herdgate {
        use std::os::unix::fs::PermissionsExt;
        let dir = tempfile::tempdir().unwrap();
        let config_path = dir.path().join("herdgate.toml");
        std::fs::write(&config_path, config).unwrap();
        let mut cmd = match uid {
            Some(uid) => {
                // The process must read its config: world-readable here.
                std::fs::set_permissions(dir.path(), std::fs::Permissions::from_mode(0o755))
                    .unwrap();
                std::fs::set_permissions(&config_path, std::fs::Permissions::from_mode(0o644))
                    .unwrap();
                let mut c = Command::new("setpriv");
                c.arg(format!("--reuid={uid}"))
                    .arg(format!("--regid={uid}"))
                    .arg("--clear-groups")
                    .arg("--")
                    .arg(bin("herdgate"));
                c
            }
            None => Command::new(bin("herdgate")),
        };
        cmd.arg("--config").arg(&config_path);
        cmd.env("RUST_LOG", "info");
        customize(&mut cmd);
        let admin = !config.contains("admin_listen = \"\"");
        Self::launch(cmd, config_path, Some(dir), admin)
    }

    /// Start herdgate by a command built elsewhere (another binary, in a
    /// chroot, as another user: the container and package tests), and wait
    /// for its listening line as [`Herdgate::start`] does. `config_path` is
    /// what the command serves, as this process sees it; `admin` says
    /// whether it has an admin listener to wait for.
    pub fn start_command(cmd: Command, config_path: PathBuf, admin: bool) -> Herdgate {
        Self::launch(cmd, config_path, None, admin)
    }

    fn launch(
        mut cmd: Command,
        config_path: PathBuf,
        dir: Option<tempfile::TempDir>,
        expect_admin: bool,
    ) -> Herdgate {
        cmd.stdout(Stdio::piped()).stderr(Stdio::inherit());
        let mut child = cmd.spawn().unwrap();
        let stdout = child.stdout.take().unwrap();
        let mut lines = BufReader::new(stdout).lines();
        let (mut addr, mut admin) = (None, None);
        let field = |line: &str, name: &str| {
            line.split_whitespace()
                .find_map(|w| w.strip_prefix(name).map(str::to_string))
        };
        while addr.is_none() || (admin.is_none() && expect_admin) {
            let line = lines
                .next()
                .expect("herdgate exited before listening")
                .unwrap();
            addr = addr.or_else(|| field(&line, "listen="));
            admin = admin.or_else(|| field(&line, "admin="));
        }
        // Keep draining the log so herdgate never blocks on a full pipe.
        let (tx, log) = mpsc::channel();
        std::thread::spawn(move || {
            for line in lines.map_while(Result::ok) {
                let _ = tx.send(line);
            }
        });
        Herdgate {
            child,
            addr: addr.unwrap(),
            admin,
            log,
            _dir: dir,
            config_path,
        }
    }

    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    pub fn signal(&self, sig: i32) {
        let _ = crate::sys::signal(self.child.id(), sig);
    }

    pub fn port(&self) -> &str {
        self.addr.rsplit_once(':').unwrap().1
    }

    /// The public listener's address.
    pub fn socket_addr(&self) -> SocketAddr {
        self.addr.parse().expect("listen address")
    }

    /// The admin listener's address (panics if it is disabled).
    pub fn admin_addr(&self) -> SocketAddr {
        self.admin
            .as_deref()
            .expect("admin listener enabled")
            .parse()
            .expect("admin address")
    }

    /// Read log lines until one contains `needle`, and return it. Lines read
    /// on the way are consumed. Panics, listing the lines seen, if none
    /// matches `within` or the process closes its stdout first. Blocking: in
    /// an async test call it through `tokio::task::block_in_place`.
    pub fn wait_log(&self, needle: &str, within: Duration) -> String {
        let deadline = Instant::now() + within;
        let mut seen = Vec::new();
        loop {
            let left = deadline.saturating_duration_since(Instant::now());
            match self.log.recv_timeout(left) {
                Ok(line) if line.contains(needle) => return line,
                Ok(line) => seen.push(line),
                Err(e) => panic!(
                    "no log line containing {needle:?} within {within:?} ({e}); lines seen:\n{}",
                    seen.join("\n")
                ),
            }
        }
    }

    /// Wait (without polling: a pidfd becomes readable when the process
    /// exits) up to `within` for the process to exit; its status, or `None`
    /// if it is still running at the deadline. Linux ≥ 5.3.
    pub async fn wait_exit(&mut self, within: Duration) -> Option<ExitStatus> {
        if let Some(status) = self.child.try_wait().expect("try_wait") {
            return Some(status);
        }
        // Our own unreaped child: its pid cannot have been reused.
        let pidfd = crate::sys::pidfd_open(self.child.id()).expect("pidfd_open");
        let exited = tokio::task::spawn_blocking(move || crate::sys::wait_readable(&pidfd, within))
            .await
            .expect("poll task");
        exited.then(|| self.child.wait().expect("wait"))
    }
}

/// The path of a file in the repository (relative to its root).
pub fn repo_path(rel: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("../..")
        .join(rel)
}

/// A binary of this workspace, from the target directory the running test
/// was built into (`target/<profile>/deps/<test>` → `target/<profile>/<name>`).
/// `cargo test --workspace` builds every package's binaries before any test
/// runs; `HERDGATE_BIN_DIR` overrides the directory.
pub fn bin(name: &str) -> PathBuf {
    let dir = match std::env::var_os("HERDGATE_BIN_DIR") {
        Some(d) => PathBuf::from(d),
        None => {
            let exe = std::env::current_exe().expect("current_exe");
            let deps = exe.parent().expect("test binary in a directory");
            deps.parent().unwrap_or(deps).to_path_buf()
        }
    };
    let path = dir.join(name);
    assert!(
        path.exists(),
        "{} is missing: build it first (`cargo test --workspace` builds every binary)",
        path.display()
    );
    path
}
