//! A real etcd cluster as child processes, for tests of herdgate's etcd
//! membership: the faults that matter (a killed leader, a frozen member, a
//! compacted history, a lost quorum) are properties of the real server, so
//! tests run the real one rather than a fake.
//!
//! Each member listens on loopback ports picked by the kernel, keeps its data
//! in its own directory under one tempdir and writes its output to a log file
//! there; a panic from this module includes those logs. Members run with
//! test timings: `--heartbeat-interval=20 --election-timeout=200` (elections
//! in well under a second, 1 s minimum lease TTL),
//! `--grpc-keepalive-min-time=500ms` (clients may ping every 500 ms) and
//! `--experimental-watch-progress-notify-interval=1s`.
//!
//! The binaries come from `HERDGATE_ETCD_BIN` (the `etcd` binary, with
//! `etcdctl` next to it), else `target/ci-tools/etcd/usr/bin/etcd` (where
//! `scripts/test` installs Debian's etcd), else `PATH`. A missing etcd is a
//! panic, never a skipped test.
//!
//! Everything here blocks (processes and `etcdctl` runs): from an async test
//! call it through `tokio::task::spawn_blocking` (all methods take `&self`,
//! so an `Arc<Etcd>` can be moved there) or `tokio::task::block_in_place`.
//! Dropping an [`Etcd`] SIGKILLs and reaps every member.

use serde_json::Value;
use std::ffi::OsString;
use std::fs::{File, OpenOptions};
use std::net::{SocketAddr, TcpListener};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::sync::{Mutex, MutexGuard};
use std::time::{Duration, Instant};

/// How long a member or the cluster may take to serve a linearizable read.
const HEALTHY_WITHIN: Duration = Duration::from_secs(15);

/// A running etcd cluster; see the module docs.
pub struct Etcd {
    etcdctl: PathBuf,
    members: Mutex<Vec<Member>>,
    // Last: the members are killed (Drop) before their directories go.
    dir: tempfile::TempDir,
}

struct Member {
    client: SocketAddr,
    /// The full command line (the same for a restart).
    cmd: Vec<OsString>,
    log: PathBuf,
    child: Option<Child>,
    stopped: bool,
    /// etcd's member id (stable across restarts on the same data dir).
    id: u64,
}

impl Member {
    fn running(&self) -> bool {
        self.child.is_some() && !self.stopped
    }

    fn endpoint(&self) -> String {
        format!("http://{}", self.client)
    }
}

impl Etcd {
    /// Start an `n`-member cluster and wait until every member serves a
    /// linearizable read. Panics (with the members' logs) if that takes
    /// longer than 15 s.
    pub fn start(n: usize) -> Etcd {
        assert!(n > 0, "an etcd cluster needs at least one member");
        let (etcd, etcdctl) = binaries();
        // A port picked by binding :0 can be taken by someone else before
        // etcd binds it; then start over on fresh ports.
        for attempt in 1.. {
            let cluster = Etcd {
                etcdctl: etcdctl.clone(),
                members: Mutex::new(Vec::new()),
                dir: tempfile::Builder::new()
                    .prefix("herdgate-etcd-")
                    .tempdir()
                    .expect("tempdir"),
            };
            cluster.spawn_members(&etcd, n);
            let all: Vec<usize> = (0..n).collect();
            match cluster.wait_healthy(&all) {
                Ok(()) => {
                    cluster.learn_ids();
                    return cluster;
                }
                Err(e) if attempt < 3 && cluster.logs_contain("address already in use") => {
                    eprintln!("etcd: a port was taken ({e}); retrying on fresh ports");
                }
                Err(e) => cluster.fail(&e),
            }
        }
        unreachable!()
    }

    fn spawn_members(&self, etcd: &Path, n: usize) {
        // Hold every listener until all ports are picked so none repeats.
        let listeners: Vec<TcpListener> = (0..2 * n)
            .map(|_| TcpListener::bind("127.0.0.1:0").expect("bind a loopback port"))
            .collect();
        let addrs: Vec<SocketAddr> = listeners.iter().map(|l| l.local_addr().unwrap()).collect();
        drop(listeners);
        let (clients, peers) = addrs.split_at(n);
        let initial_cluster = peers
            .iter()
            .enumerate()
            .map(|(i, p)| format!("m{i}=http://{p}"))
            .collect::<Vec<_>>()
            .join(",");
        let token = format!(
            "herdgate-test-{}-{}",
            std::process::id(),
            rand::random::<u32>()
        );
        let mut members = self.lock();
        for i in 0..n {
            let data = self.dir.path().join(format!("m{i}"));
            let client = format!("http://{}", clients[i]);
            let peer = format!("http://{}", peers[i]);
            let mut cmd: Vec<OsString> = vec![etcd.into(), "--data-dir".into(), data.into()];
            for arg in [
                format!("--name=m{i}"),
                format!("--listen-client-urls={client}"),
                format!("--advertise-client-urls={client}"),
                format!("--listen-peer-urls={peer}"),
                format!("--initial-advertise-peer-urls={peer}"),
                format!("--initial-cluster={initial_cluster}"),
                "--initial-cluster-state=new".into(),
                format!("--initial-cluster-token={token}"),
                "--heartbeat-interval=20".into(),
                "--election-timeout=200".into(),
                "--grpc-keepalive-min-time=500ms".into(),
                "--experimental-watch-progress-notify-interval=1s".into(),
            ] {
                cmd.push(arg.into());
            }
            let mut member = Member {
                client: clients[i],
                cmd,
                log: self.dir.path().join(format!("m{i}.log")),
                child: None,
                stopped: false,
                id: 0,
            };
            member.child = Some(spawn(&member));
            members.push(member);
        }
    }

    /// The client URLs of all members ("http://127.0.0.1:PORT"), in member order.
    pub fn endpoints(&self) -> Vec<String> {
        self.lock().iter().map(Member::endpoint).collect()
    }

    /// The client URL of member `i`.
    pub fn endpoint(&self, i: usize) -> String {
        self.lock()[i].endpoint()
    }

    /// The client address of member `i` (e.g. for a [`crate::relay::Relay`]).
    pub fn client_addr(&self, i: usize) -> SocketAddr {
        self.lock()[i].client
    }

    /// SIGKILL member `i` and reap it (its data dir stays for [`Etcd::restart`]).
    pub fn kill9(&self, i: usize) {
        let mut members = self.lock();
        let m = &mut members[i];
        let mut child = m
            .child
            .take()
            .unwrap_or_else(|| panic!("member {i} is not running"));
        let _ = child.kill();
        let _ = child.wait();
        m.stopped = false;
    }

    /// SIGSTOP member `i`: its sockets stay open but it answers nothing.
    pub fn stop(&self, i: usize) {
        self.signal(i, libc::SIGSTOP);
        self.lock()[i].stopped = true;
    }

    /// SIGCONT member `i` after [`Etcd::stop`].
    pub fn cont(&self, i: usize) {
        self.signal(i, libc::SIGCONT);
        self.lock()[i].stopped = false;
    }

    fn signal(&self, i: usize, sig: i32) {
        let members = self.lock();
        let child = members[i]
            .child
            .as_ref()
            .unwrap_or_else(|| panic!("member {i} is not running"));
        // Our own unreaped child: its pid cannot have been reused.
        crate::sys::signal(child.id(), sig).expect("kill");
    }

    /// Start member `i` again after [`Etcd::kill9`], on the same data dir,
    /// ports and flags. Waits until it serves a linearizable read when a
    /// quorum of members is then running (otherwise it cannot, and this
    /// returns at once).
    pub fn restart(&self, i: usize) {
        let quorum = {
            let mut members = self.lock();
            assert!(members[i].child.is_none(), "member {i} is still running");
            let child = spawn(&members[i]);
            members[i].child = Some(child);
            members.iter().filter(|m| m.running()).count() > members.len() / 2
        };
        if quorum {
            if let Err(e) = self.wait_healthy(&[i]) {
                self.fail(&format!("restarted member {i}: {e}"));
            }
        }
    }

    /// The index of the current leader. Waits (up to 15 s) until a running
    /// member (not killed or stopped) says it is the leader — right after the
    /// leader is killed, the others still name it until they elect a new one.
    pub fn leader(&self) -> usize {
        let deadline = Instant::now() + HEALTHY_WITHIN;
        loop {
            let running: Vec<(usize, String, u64)> = self
                .lock()
                .iter()
                .enumerate()
                .filter(|(_, m)| m.running())
                .map(|(i, m)| (i, m.endpoint(), m.id))
                .collect();
            for (i, endpoint, id) in running {
                let out = self.etcdctl_at(&endpoint, &["endpoint", "status", "-w", "json"]);
                if !out.status.success() {
                    continue;
                }
                let status: Value = serde_json::from_slice(&out.stdout).expect("status json");
                if status[0]["Status"]["leader"].as_u64() == Some(id) {
                    return i;
                }
            }
            if Instant::now() > deadline {
                self.fail("no running member became the leader");
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// Run `etcdctl ARGS` against the running members (not killed or
    /// stopped, so a test's own faults do not make its checks hang; all
    /// members if none runs), with a 5 s command timeout.
    pub fn etcdctl(&self, args: &[&str]) -> Output {
        let endpoints: Vec<String> = {
            let members = self.lock();
            let running: Vec<String> = members
                .iter()
                .filter(|m| m.running())
                .map(Member::endpoint)
                .collect();
            if running.is_empty() {
                members.iter().map(Member::endpoint).collect()
            } else {
                running
            }
        };
        self.etcdctl_at(&endpoints.join(","), args)
    }

    fn etcdctl_at(&self, endpoints: &str, args: &[&str]) -> Output {
        Command::new(&self.etcdctl)
            .arg(format!("--endpoints={endpoints}"))
            .args(["--dial-timeout=1s", "--command-timeout=5s"])
            .args(args)
            .stdin(Stdio::null())
            .output()
            .unwrap_or_else(|e| panic!("run {}: {e}", self.etcdctl.display()))
    }

    /// [`Etcd::etcdctl`], panicking unless it succeeds; its stdout.
    fn etcdctl_ok(&self, args: &[&str]) -> Vec<u8> {
        let out = self.etcdctl(args);
        assert!(
            out.status.success(),
            "etcdctl {args:?} failed: {}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
        out.stdout
    }

    /// The cluster's current revision (a linearizable read).
    pub fn revision(&self) -> i64 {
        let out = self.etcdctl_ok(&["get", "/", "--consistency=l", "-w", "json"]);
        let v: Value = serde_json::from_slice(&out).expect("get json");
        v["header"]["revision"].as_i64().expect("header.revision")
    }

    /// Compact the history up to the current revision, which it returns:
    /// watches from older revisions are then cancelled as compacted.
    pub fn compact_to_latest(&self) -> i64 {
        let rev = self.revision();
        self.etcdctl_ok(&["compact", &rev.to_string()]);
        rev
    }

    /// Every key under `prefix` with its value, in key order (a
    /// linearizable read; keys and values must be UTF-8).
    pub fn get_prefix(&self, prefix: &str) -> Vec<(String, String)> {
        let out = self.etcdctl_ok(&["get", prefix, "--prefix", "--consistency=l", "-w", "json"]);
        let v: Value = serde_json::from_slice(&out).expect("get json");
        let text = |field: &Value| {
            String::from_utf8(base64_decode(field.as_str().unwrap_or(""))).expect("UTF-8")
        };
        v["kvs"]
            .as_array()
            .map(|kvs| {
                kvs.iter()
                    .map(|kv| (text(&kv["key"]), text(&kv["value"])))
                    .collect()
            })
            .unwrap_or_default()
    }

    /// Wait until each member in `which` serves a linearizable read.
    fn wait_healthy(&self, which: &[usize]) -> Result<(), String> {
        let deadline = Instant::now() + HEALTHY_WITHIN;
        let mut pending = which.to_vec();
        loop {
            let mut still = Vec::new();
            for &i in &pending {
                let endpoint = {
                    let mut members = self.lock();
                    let m = &mut members[i];
                    if let Some(status) = m.child.as_mut().and_then(|c| c.try_wait().ok()?) {
                        m.child = None;
                        return Err(format!("member {i} exited with {status}"));
                    }
                    m.endpoint()
                };
                let out = Command::new(&self.etcdctl)
                    .arg(format!("--endpoints={endpoint}"))
                    .args(["--dial-timeout=300ms", "--command-timeout=500ms"])
                    .args(["get", "health-probe", "--consistency=l"])
                    .stdin(Stdio::null())
                    .output()
                    .unwrap_or_else(|e| panic!("run {}: {e}", self.etcdctl.display()));
                if !out.status.success() {
                    still.push(i);
                }
            }
            if still.is_empty() {
                return Ok(());
            }
            if Instant::now() > deadline {
                return Err(format!(
                    "members {still:?} not healthy within {HEALTHY_WITHIN:?}"
                ));
            }
            pending = still;
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// Record each member's id (for [`Etcd::leader`]).
    fn learn_ids(&self) {
        let endpoints = self.endpoints();
        for (i, endpoint) in endpoints.iter().enumerate() {
            let out = self.etcdctl_at(endpoint, &["endpoint", "status", "-w", "json"]);
            let status: Value = serde_json::from_slice(&out.stdout)
                .unwrap_or_else(|_| self.fail(&format!("member {i}: no status")));
            let id = status[0]["Status"]["header"]["member_id"]
                .as_u64()
                .expect("member_id");
            self.lock()[i].id = id;
        }
    }

    fn logs_contain(&self, needle: &str) -> bool {
        self.lock().iter().any(|m| {
            std::fs::read_to_string(&m.log)
                .map(|l| l.contains(needle))
                .unwrap_or(false)
        })
    }

    /// Panic with `why` and the tail of every member's log.
    fn fail(&self, why: &str) -> ! {
        let mut report = format!("etcd cluster: {why}\n");
        for (i, m) in self.lock().iter().enumerate() {
            let log = std::fs::read_to_string(&m.log).unwrap_or_default();
            let lines: Vec<&str> = log.lines().collect();
            let tail = &lines[lines.len().saturating_sub(40)..];
            report += &format!(
                "--- member {i} ({}), last {} lines of {}:\n{}\n",
                m.endpoint(),
                tail.len(),
                m.log.display(),
                tail.join("\n")
            );
        }
        panic!("{report}");
    }

    fn lock(&self) -> MutexGuard<'_, Vec<Member>> {
        // A panicking test thread must not hide the cluster from Drop.
        self.members.lock().unwrap_or_else(|e| e.into_inner())
    }
}

impl Drop for Etcd {
    fn drop(&mut self) {
        for m in self.lock().iter_mut() {
            if let Some(mut child) = m.child.take() {
                // SIGKILL also ends a SIGSTOPped process.
                let _ = child.kill();
                let _ = child.wait();
            }
        }
    }
}

fn spawn(m: &Member) -> Child {
    let log = OpenOptions::new()
        .create(true)
        .append(true)
        .open(&m.log)
        .expect("member log");
    let err: File = log.try_clone().expect("member log");
    Command::new(&m.cmd[0])
        .args(&m.cmd[1..])
        .stdin(Stdio::null())
        .stdout(log)
        .stderr(err)
        .spawn()
        .unwrap_or_else(|e| panic!("start {:?}: {e}", m.cmd[0]))
}

/// `(etcd, etcdctl)`; see the module docs for the search order.
fn binaries() -> (PathBuf, PathBuf) {
    let with_ctl = |etcd: PathBuf| {
        let ctl = etcd.with_file_name("etcdctl");
        (etcd, ctl)
    };
    let found = if let Some(bin) = std::env::var_os("HERDGATE_ETCD_BIN") {
        let (etcd, ctl) = with_ctl(PathBuf::from(bin));
        assert!(
            etcd.is_file() && ctl.is_file(),
            "HERDGATE_ETCD_BIN={} : need the etcd binary there and etcdctl next to it",
            etcd.display()
        );
        Some((etcd, ctl))
    } else {
        let ci = crate::process::repo_path("target/ci-tools/etcd/usr/bin/etcd");
        if ci.is_file() {
            Some(with_ctl(ci))
        } else {
            std::env::var_os("PATH").and_then(|path| {
                std::env::split_paths(&path)
                    .map(|d| with_ctl(d.join("etcd")))
                    .find(|(etcd, ctl)| etcd.is_file() && ctl.is_file())
            })
        }
    };
    found.unwrap_or_else(|| {
        panic!(
            "etcd not found: run scripts/test (it installs etcd into target/ci-tools/etcd) \
             or set HERDGATE_ETCD_BIN"
        )
    })
}

/// Standard base64 (with padding), as etcdctl's JSON output encodes bytes.
fn base64_decode(s: &str) -> Vec<u8> {
    let value = |c: u8| match c {
        b'A'..=b'Z' => c - b'A',
        b'a'..=b'z' => c - b'a' + 26,
        b'0'..=b'9' => c - b'0' + 52,
        b'+' => 62,
        b'/' => 63,
        _ => panic!("not base64: {s:?}"),
    };
    let mut out = Vec::with_capacity(s.len() * 3 / 4);
    let (mut acc, mut bits) = (0u32, 0);
    for c in s.bytes().filter(|&c| c != b'=') {
        acc = (acc << 6) | value(c) as u32;
        bits += 6;
        if bits >= 8 {
            bits -= 8;
            out.push((acc >> bits) as u8);
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn put(etcd: &Etcd, key: &str, value: &str) {
        etcd.etcdctl_ok(&["put", key, value]);
    }

    #[test]
    fn base64_round_trips_etcdctl_output() {
        assert_eq!(base64_decode("L2EvYg=="), b"/a/b");
        assert_eq!(base64_decode("d28gcmxk"), b"wo rld");
        assert_eq!(base64_decode("aGk="), b"hi");
        assert_eq!(base64_decode(""), b"");
    }

    #[test]
    fn one_member_puts_and_gets() {
        let etcd = Etcd::start(1);
        assert_eq!(etcd.endpoints(), vec![etcd.endpoint(0)]);
        assert_eq!(etcd.endpoint(0), format!("http://{}", etcd.client_addr(0)));
        let before = etcd.revision();
        put(&etcd, "/t/b", "two words");
        put(&etcd, "/t/a", "1");
        put(&etcd, "/u", "outside");
        assert_eq!(
            etcd.get_prefix("/t/"),
            vec![
                ("/t/a".to_string(), "1".to_string()),
                ("/t/b".to_string(), "two words".to_string())
            ]
        );
        assert_eq!(etcd.revision(), before + 3);
        assert_eq!(etcd.leader(), 0);
        let rev = etcd.compact_to_latest();
        let out = etcd.etcdctl(&["get", "/t/a", &format!("--rev={}", rev - 1)]);
        assert!(!out.status.success(), "a compacted revision stays readable");
        assert!(
            String::from_utf8_lossy(&out.stderr).contains("compacted"),
            "{out:?}"
        );
    }

    #[test]
    fn three_members_survive_losing_the_leader() {
        let etcd = Etcd::start(3);
        assert_eq!(etcd.endpoints().len(), 3);
        put(&etcd, "/k", "v1");
        let old = etcd.leader();
        etcd.kill9(old);
        let new = etcd.leader();
        assert_ne!(new, old);
        // Two of three are a quorum: writes go on.
        put(&etcd, "/k", "v2");
        etcd.restart(old);
        // The restarted member catches up and serves linearizable reads.
        let out = Command::new(&etcd.etcdctl)
            .arg(format!("--endpoints={}", etcd.endpoint(old)))
            .args(["get", "/k", "--print-value-only", "--consistency=l"])
            .output()
            .unwrap();
        assert_eq!(String::from_utf8_lossy(&out.stdout).trim(), "v2");
    }

    #[test]
    fn a_stopped_member_answers_nothing_until_continued() {
        let etcd = Etcd::start(1);
        etcd.stop(0);
        let t = Instant::now();
        let out = etcd.etcdctl(&["get", "/x", "--command-timeout=500ms"]);
        assert!(!out.status.success(), "a stopped member answered");
        assert!(t.elapsed() >= Duration::from_millis(400));
        etcd.cont(0);
        put(&etcd, "/x", "back");
        assert_eq!(
            etcd.get_prefix("/x"),
            vec![("/x".to_string(), "back".to_string())]
        );
    }
}
