//! Webhook tests' real parts: a receiver process that checks every POST
//! with the official Node SDK (`tests/compat/webhooks/receiver.mjs`), and
//! pusher-js clients driven command by command (`clients.mjs`).

use crate::process::repo_path;
use serde_json::{json, Value};
use std::io::{BufRead, BufReader, Write};
use std::process::{Child, ChildStdin, Command, Stdio};
use std::sync::mpsc;
use std::time::{Duration, Instant};

/// The Node packages of tests/compat, installed from the lockfile when
/// missing or older than it.
pub fn npm_ci() -> std::path::PathBuf {
    let dir = repo_path("crates/herdgate/tests/compat");
    crate::npm_ci(&dir);
    dir
}

fn lines(out: impl std::io::Read + Send + 'static) -> mpsc::Receiver<Value> {
    let (tx, rx) = mpsc::channel();
    std::thread::spawn(move || {
        for line in BufReader::new(out).lines().map_while(Result::ok) {
            match serde_json::from_str(&line) {
                Ok(v) => {
                    if tx.send(v).is_err() {
                        return;
                    }
                }
                Err(_) => eprintln!("node: {line}"),
            }
        }
    });
    rx
}

/// One webhook event as the receiver got it: when (receiver's clock, ms)
/// and the event object.
#[derive(Debug, Clone)]
pub struct Got {
    pub t: u64,
    pub event: Value,
}

impl Got {
    pub fn name(&self) -> &str {
        self.event["name"].as_str().unwrap_or_default()
    }
    pub fn channel(&self) -> &str {
        self.event["channel"].as_str().unwrap_or_default()
    }
}

pub struct Receiver {
    child: Child,
    pub port: u16,
    rx: mpsc::Receiver<Value>,
    /// Every POST line so far (valid ones and refusals), in arrival order.
    pub posts: Vec<Value>,
    /// Events not yet taken by `next_event`.
    pending: std::collections::VecDeque<Got>,
}

impl Receiver {
    pub fn start(app_id: &str, key: &str, secret: &str) -> Receiver {
        let dir = npm_ci();
        let mut child = Command::new("node")
            .arg("webhooks/receiver.mjs")
            .current_dir(&dir)
            .env("HERDGATE_APP_ID", app_id)
            .env("HERDGATE_APP_KEY", key)
            .env("HERDGATE_APP_SECRET", secret)
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit())
            .spawn()
            .expect("node runs the webhook receiver");
        let rx = lines(child.stdout.take().unwrap());
        let first = rx
            .recv_timeout(crate::WAIT)
            .expect("the receiver says where it listens");
        let port = first["listening"].as_u64().expect("listening line") as u16;
        Receiver {
            child,
            port,
            rx,
            posts: Vec::new(),
            pending: Default::default(),
        }
    }

    pub fn url(&self) -> String {
        format!("http://127.0.0.1:{}/hooks", self.port)
    }

    /// "ok", "500" or "hang".
    pub fn set_mode(&self, mode: &str) {
        let mut s = std::net::TcpStream::connect(("127.0.0.1", self.port)).unwrap();
        write!(
            s,
            "POST /mode HTTP/1.1\r\nhost: x\r\ncontent-length: {}\r\nconnection: close\r\n\r\n{mode}",
            mode.len()
        )
        .unwrap();
        let mut answer = String::new();
        let _ = std::io::Read::read_to_string(&mut s, &mut answer);
        assert!(answer.starts_with("HTTP/1.1 200"), "{answer}");
    }

    fn take_line(&mut self, within: Duration) -> Option<Value> {
        let v = self.rx.recv_timeout(within).ok()?;
        for e in v["events"].as_array().into_iter().flatten() {
            self.pending.push_back(Got {
                t: v["t"].as_u64().unwrap_or(0),
                event: e.clone(),
            });
        }
        self.posts.push(v.clone());
        Some(v)
    }

    /// The next webhook event, within `within`.
    pub fn next_event(&mut self, within: Duration) -> Option<Got> {
        let deadline = Instant::now() + within;
        while self.pending.is_empty() {
            let left = deadline.checked_duration_since(Instant::now())?;
            self.take_line(left)?;
        }
        self.pending.pop_front()
    }

    /// Events until one matches `pred` (included), within `within`.
    pub fn events_until(&mut self, within: Duration, pred: impl Fn(&Got) -> bool) -> Vec<Got> {
        let deadline = Instant::now() + within;
        let mut out = Vec::new();
        loop {
            let left = deadline.saturating_duration_since(Instant::now());
            let g = self.next_event(left).unwrap_or_else(|| {
                panic!("no matching webhook event within {within:?}; got {out:#?}")
            });
            let done = pred(&g);
            out.push(g);
            if done {
                return out;
            }
        }
    }

    /// POST lines until one matches `pred`, within `within` (for refusals
    /// and hangs, which carry no events).
    pub fn wait_post(&mut self, within: Duration, pred: impl Fn(&Value) -> bool) -> Value {
        let deadline = Instant::now() + within;
        loop {
            let left = deadline.saturating_duration_since(Instant::now());
            let v = self
                .take_line(left)
                .unwrap_or_else(|| panic!("no matching POST within {within:?}"));
            if pred(&v) {
                return v;
            }
        }
    }
}

impl Drop for Receiver {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// pusher-js clients in one Node process.
pub struct JsClients {
    child: Child,
    stdin: ChildStdin,
    rx: mpsc::Receiver<Value>,
}

impl JsClients {
    /// Clients of `host:port` for the app.
    pub fn start(host: &str, port: u16, app_id: &str, key: &str, secret: &str) -> JsClients {
        let dir = npm_ci();
        let mut child = Command::new("node")
            .arg("webhooks/clients.mjs")
            .current_dir(&dir)
            .env("HERDGATE_HOST", host)
            .env("HERDGATE_PORT", port.to_string())
            .env("HERDGATE_APP_ID", app_id)
            .env("HERDGATE_APP_KEY", key)
            .env("HERDGATE_APP_SECRET", secret)
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit())
            .spawn()
            .expect("node runs the pusher-js clients");
        let stdin = child.stdin.take().unwrap();
        let rx = lines(child.stdout.take().unwrap());
        JsClients { child, stdin, rx }
    }

    /// Run one command; its answer (panics on a failure).
    pub fn run(&mut self, cmd: Value) -> Value {
        writeln!(self.stdin, "{cmd}").unwrap();
        let answer = self
            .rx
            .recv_timeout(crate::WAIT * 2)
            .unwrap_or_else(|_| panic!("pusher-js did not answer {cmd}"));
        assert_eq!(answer["ok"], true, "{cmd}: {answer}");
        answer
    }

    /// Connect client `id` as `user`; its socket id.
    pub fn connect(&mut self, id: &str, user: &str) -> String {
        self.run(json!({"op":"connect","id":id,"user":user}))["socket_id"]
            .as_str()
            .unwrap()
            .to_string()
    }

    pub fn subscribe(&mut self, id: &str, channel: &str) {
        self.run(json!({"op":"subscribe","id":id,"channel":channel}));
    }

    pub fn unsubscribe(&mut self, id: &str, channel: &str) {
        self.run(json!({"op":"unsubscribe","id":id,"channel":channel}));
    }

    pub fn trigger(&mut self, id: &str, channel: &str, event: &str, data: Value) {
        self.run(json!({"op":"trigger","id":id,"channel":channel,"event":event,"data":data}));
    }

    pub fn disconnect(&mut self, id: &str) {
        self.run(json!({"op":"disconnect","id":id}));
    }

    /// Sign client `id` in (pusher-js `signin()`, as the user it connected as).
    pub fn signin(&mut self, id: &str) {
        self.run(json!({"op":"signin","id":id}));
    }
}

impl Drop for JsClients {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}
