//! herdgate as a real child process, for tests that need signals, stdout
//! or a second program (pusher-js, herdgate-load) talking to it.

use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::mpsc;

pub struct Herdgate {
    pub child: Child,
    pub addr: String,
    pub admin: Option<String>,
    /// Log lines after the listening line, as they arrive.
    pub log: mpsc::Receiver<String>,
    _dir: tempfile::TempDir,
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
        let dir = tempfile::tempdir().unwrap();
        let config_path = dir.path().join("herdgate.toml");
        std::fs::write(&config_path, config).unwrap();
        let mut cmd = Command::new(env!("CARGO_BIN_EXE_herdgate"));
        cmd.arg("--config")
            .arg(&config_path)
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit());
        cmd.env("RUST_LOG", "info");
        for (k, v) in env {
            cmd.env(k, v);
        }
        let mut child = cmd.spawn().unwrap();
        let stdout = child.stdout.take().unwrap();
        let mut lines = BufReader::new(stdout).lines();
        let (mut addr, mut admin) = (None, None);
        let field = |line: &str, name: &str| {
            line.split_whitespace()
                .find_map(|w| w.strip_prefix(name).map(str::to_string))
        };
        while addr.is_none() || (admin.is_none() && !config.contains("admin_listen = \"\"")) {
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
        // SAFETY: kill(2) on our own child's pid.
        unsafe {
            libc::kill(self.child.id() as i32, sig);
        }
    }

    pub fn port(&self) -> &str {
        self.addr.rsplit_once(':').unwrap().1
    }
}

/// The path of a file in the repository.
pub fn repo_path(rel: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join(rel)
}
