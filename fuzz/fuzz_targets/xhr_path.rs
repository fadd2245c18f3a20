//! The HTTP fallback's request path: `http::xhr::parse` on the URL path,
//! then the pipe between a session and its requests (`pipe::Pipe`,
//! `pipe::Pipes`) driven by input-chosen calls — attach, take, push,
//! close, detach, start_send, insert/get/remove — against a model of what
//! each must answer. Invariants: at most one receive request is current
//! (the last attached); frames are taken once each, in the order pushed,
//! and only by the current request; the close goes out after every frame
//! pushed before it, with the code and reason given; a session's writer is
//! stalled exactly while frames wait; `start_send` admits at most
//! `MAX_SENDS` at once; `Pipes` caps sessions per node and per address.
//!
//! Input: the path up to the first newline, then one byte per call.
#![no_main]

mod common;

use common::Input;
use herdgate::http::xhr::{is_fallback, parse, Kind};
use herdgate::pipe::{Full, Pipe, Pipes, Taken, MAX_SENDS};
use herdgate::protocol::Frame;
use libfuzzer_sys::fuzz_target;
use std::collections::{HashMap, VecDeque};
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};
use std::task::{Context, Waker};

fn check_path(path: &str) {
    let Some((key, id, kind)) = parse(path) else {
        return;
    };
    assert!(is_fallback(path));
    let kind_str = match kind {
        Kind::Streaming => "xhr_streaming",
        Kind::Polling => "xhr",
        Kind::Send => "xhr_send",
    };
    assert_eq!(path, format!("/pusher/app/{id}/{kind_str}"));
    let parts: Vec<&str> = id.split('/').collect();
    assert_eq!(parts.len(), 3, "{id}");
    assert_eq!(parts[0], key);
    assert!(!key.is_empty());
    assert!((1..=3).contains(&parts[1].len()) && parts[1].bytes().all(|b| b.is_ascii_digit()));
    assert!(
        (1..=32).contains(&parts[2].len()) && parts[2].bytes().all(|b| b.is_ascii_alphanumeric())
    );
}

/// What the pipe should hold.
#[derive(Default)]
struct Model {
    outbox: VecDeque<Frame>,
    closed: Option<(u16, String)>,
    close_taken: bool,
    attached: u64,
    opened: bool,
    active: u32,
}

const IPS: [IpAddr; 4] = [
    IpAddr::V4(Ipv4Addr::new(127, 0, 0, 1)),
    IpAddr::V4(Ipv4Addr::new(127, 0, 0, 2)),
    IpAddr::V6(Ipv6Addr::new(0x2001, 0xdb8, 0, 1, 0, 0, 0, 1)),
    // The same /64 as the one before: the same address for the caps.
    IpAddr::V6(Ipv6Addr::new(0x2001, 0xdb8, 0, 1, 0xffff, 0, 0, 9)),
];

fn ip_slot(i: usize) -> usize {
    if i == 3 {
        2
    } else {
        i
    }
}

fuzz_target!(|data: &[u8]| {
    let split = data.iter().position(|&b| b == b'\n').unwrap_or(data.len());
    if let Ok(path) = std::str::from_utf8(&data[..split]) {
        check_path(path);
    }
    let mut input = Input(data.get(split + 1..).unwrap_or_default());

    let (pipe, mut rx) = Pipe::new(IPS[0]);
    let mut m = Model::default();
    let mut pushed = 0usize;
    let mut taken: Vec<Frame> = Vec::new();
    let mut ids: Vec<u64> = Vec::new();
    let mut sends = Vec::new();
    let mut cx = Context::from_waker(Waker::noop());

    let pipes = Pipes::default();
    let mut live: HashMap<String, usize> = HashMap::new(); // id → ip slot
    let mut places = Vec::new(); // (id, ip slot, place)

    let mut steps = 0;
    while !input.is_empty() && steps < 256 {
        steps += 1;
        let op = input.byte();
        let arg = input.byte();
        // A request id: one issued, or one never issued.
        let id = if ids.is_empty() || arg == 0xFF {
            m.attached + 1 + arg as u64 % 3
        } else {
            ids[arg as usize % ids.len()]
        };
        match op % 14 {
            0 => {
                let (got, first) = pipe.attach();
                m.attached += 1;
                m.active += 1;
                assert_eq!((got, first), (m.attached, !m.opened), "attach");
                m.opened = true;
                ids.push(got);
            }
            1 => {
                let got = pipe.take(id);
                if id != m.attached {
                    assert_eq!(got, Taken::Superseded, "only the current request takes");
                    continue;
                }
                let frames: Vec<Frame> = m.outbox.drain(..).collect();
                let want = match &m.closed {
                    Some((code, reason)) => {
                        m.close_taken = true;
                        Taken::Closed(frames.clone(), *code, reason.clone())
                    }
                    None if frames.is_empty() => Taken::Empty,
                    None => Taken::Frames(frames.clone()),
                };
                assert_eq!(got, want, "take");
                taken.extend(frames);
            }
            2 if m.closed.is_none() => {
                let k = arg as usize % 5;
                let frames: VecDeque<Frame> = (0..k)
                    .map(|i| Frame::from(format!("f{}", pushed + i)))
                    .collect();
                pushed += k;
                m.outbox.extend(frames.iter().cloned());
                pipe.push(frames);
            }
            3 if m.closed.is_none() => {
                // The session closes once, at its end.
                let reason = format!("r{arg}");
                let code = 4000 + arg as u16;
                pipe.close(code, &reason);
                m.closed = Some((code, reason));
            }
            4 => {
                let last = pipe.detach(id);
                m.active = m.active.saturating_sub(1);
                assert_eq!(last, m.active == 0 && m.attached == id, "detach");
            }
            5 => {
                let s = pipe.start_send();
                assert_eq!(s.is_some(), sends.len() < MAX_SENDS as usize, "start_send");
                sends.extend(s);
            }
            6 => {
                if !sends.is_empty() {
                    sends.swap_remove(arg as usize % sends.len());
                }
            }
            7 => {
                assert_eq!(pipe.is_busy(), !m.outbox.is_empty(), "is_busy");
                assert_eq!(
                    pipe.poll_taken(&mut cx).is_ready(),
                    m.outbox.is_empty(),
                    "poll_taken"
                );
                assert_eq!(pipe.close_pending(), m.closed.is_some() && !m.close_taken);
                assert_eq!(
                    pipe.abandoned_since(id),
                    m.active == 0 && m.attached == id && m.closed.is_none()
                );
            }
            8 => {
                // At most one current request: the last attached.
                let current: Vec<u64> = ids
                    .iter()
                    .copied()
                    .filter(|&i| pipe.is_current(i))
                    .collect();
                assert!(
                    current.len() <= 1 && current.iter().all(|&i| i == m.attached),
                    "{current:?}"
                );
                assert_eq!(pipe.is_current(m.attached), true);
            }
            9 => {
                let _ = pipe
                    .to_session
                    .try_send(herdgate::pipe::ToSession::Text(format!("m{arg}")));
                while let Ok(msg) = rx.try_recv() {
                    assert!(matches!(msg, herdgate::pipe::ToSession::Text(_)));
                }
            }
            10 => {
                // A new session's pipe: capped per node and per address.
                let name = format!("s{}", arg % 8);
                let slot = (arg >> 3) as usize % 4;
                let max = 1 + (arg >> 5) as usize % 4;
                let max_per_ip = 1 + input.byte() as usize % 3;
                let p = Pipe::new(IPS[slot]).0;
                let per_ip = live.values().filter(|&&s| s == ip_slot(slot)).count();
                let got = pipes.insert(name.clone(), p.clone(), max, max_per_ip);
                let want = if live.len() >= max || live.contains_key(&name) {
                    Err(Full::Node)
                } else if per_ip >= max_per_ip {
                    Err(Full::PerIp)
                } else {
                    Ok(())
                };
                assert_eq!(got.as_ref().map(|_| ()).map_err(|e| *e), want, "insert");
                if let Ok(place) = got {
                    live.insert(name.clone(), ip_slot(slot));
                    places.push((name.clone(), place));
                    assert!(std::sync::Arc::ptr_eq(&pipes.get(&name).unwrap(), &p));
                    assert!(p.owned_by(IPS[slot]) && p.owned_by(IPS[ip_slot(slot)]));
                }
            }
            11 => {
                // A session ends: its pipe leaves, then its place is given back.
                let name = format!("s{}", arg % 8);
                pipes.remove(&name);
                live.remove(&name);
                places.retain(|(n, _)| *n != name);
                assert!(pipes.get(&name).is_none());
            }
            _ => {
                assert_eq!(pipes.len(), live.len());
            }
        }
    }
    // Everything taken was pushed, each once, in order.
    let want: Vec<Frame> = (0..taken.len())
        .map(|i| Frame::from(format!("f{i}")))
        .collect();
    assert_eq!(taken, want, "frames taken once each, in order");
    assert!(taken.len() <= pushed);
});
