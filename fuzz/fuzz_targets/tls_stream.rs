//! The server TLS stream over rustls's unbuffered API (`tls::stream::
//! TlsStream`), fed what a client sends:
//! * mode 0: the input's bytes as they are;
//! * mode 1: a real rustls client's first flight (its ClientHello, TLS 1.3,
//!   1.2 or either; recorded once per process) with its records truncated,
//!   split, dropped, duplicated, corrupted, interleaved with input bytes;
//! * modes 2 and 3: a live rustls client, each of its records going
//!   through the same edits, then (if the handshake completes) data both
//!   ways, key updates, close_notify from either side, the end.
//!
//! Reads and writes take input-chosen sizes (`Pending` between). Must
//! never panic or hang: once the client's bytes and then the end of the
//! stream are all there, the handshake and every read finish within a
//! bounded number of polls. What the server reads is always a prefix of
//! what the client wrote (records that were edited fail, they are never
//! read as something else), and what it writes back likewise; its output
//! stays within a bound of what it was sent.
#![no_main]

mod common;

use common::{block_on, Input, Schedule};
use herdgate::tls::stream::TlsStream;
use libfuzzer_sys::fuzz_target;
use rustls::pki_types::{CertificateDer, ServerName};
use rustls::ClientConnection;
use std::cell::RefCell;
use std::collections::VecDeque;
use std::future::Future;
use std::io::{self, Read, Write};
use std::pin::Pin;
use std::rc::Rc;
use std::sync::{Arc, OnceLock};
use std::task::{Context, Poll, Waker};
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};

struct Setup {
    server: Arc<rustls::ServerConfig>,
    /// TLS 1.3 only, TLS 1.2 only, either.
    clients: [Arc<rustls::ClientConfig>; 3],
    hellos: [Vec<u8>; 3],
}

/// A self-signed certificate (rcgen), written where `CertStore` reads it,
/// the server config herdgate builds from it, and clients that trust it.
fn setup() -> &'static Setup {
    static SETUP: OnceLock<Setup> = OnceLock::new();
    SETUP.get_or_init(|| {
        let ck = rcgen::generate_simple_self_signed(vec!["localhost".to_string()]).unwrap();
        let dir = std::env::temp_dir().join(format!("herdgate-fuzz-tls-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let (cert, key) = (dir.join("cert.pem"), dir.join("key.pem"));
        std::fs::write(&cert, ck.cert.pem()).unwrap();
        std::fs::write(&key, ck.signing_key.serialize_pem()).unwrap();
        let store = Arc::new(herdgate::tls::CertStore::load(&cert, &key).unwrap());
        let server = herdgate::tls::server_config(store).unwrap();
        let _ = std::fs::remove_dir_all(&dir);
        let der: CertificateDer<'static> = ck.cert.der().clone();
        let client = |versions: &[&'static rustls::SupportedProtocolVersion]| {
            let mut roots = rustls::RootCertStore::empty();
            roots.add(der.clone()).unwrap();
            let provider = Arc::new(rustls::crypto::ring::default_provider());
            let mut cfg = rustls::ClientConfig::builder_with_provider(provider)
                .with_protocol_versions(versions)
                .unwrap()
                .with_root_certificates(roots)
                .with_no_client_auth();
            cfg.alpn_protocols = vec![b"http/1.1".to_vec()];
            Arc::new(cfg)
        };
        let clients = [
            client(&[&rustls::version::TLS13]),
            client(&[&rustls::version::TLS12]),
            client(&[&rustls::version::TLS13, &rustls::version::TLS12]),
        ];
        let hello = |cfg: &Arc<rustls::ClientConfig>| {
            let mut c = ClientConnection::new(cfg.clone(), name()).unwrap();
            let mut out = Vec::new();
            while c.wants_write() {
                c.write_tls(&mut out).unwrap();
            }
            out
        };
        let hellos = [hello(&clients[0]), hello(&clients[1]), hello(&clients[2])];
        Setup {
            server,
            clients,
            hellos,
        }
    })
}

fn name() -> ServerName<'static> {
    ServerName::try_from("localhost").unwrap()
}

/// The server's socket: reads what the harness delivered (`Pending` when
/// there is nothing yet, the end once `eof`), writes to `out`.
#[derive(Clone)]
struct Io(Rc<RefCell<IoState>>);

struct IoState {
    incoming: VecDeque<u8>,
    eof: bool,
    out: Vec<u8>,
    /// Everything the server ever wrote (for the output bound).
    written: usize,
    reads: Schedule,
    writes: Schedule,
}

impl AsyncRead for Io {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let mut s = self.0.borrow_mut();
        if s.incoming.is_empty() {
            if s.eof {
                return Poll::Ready(Ok(()));
            }
            return Poll::Pending;
        }
        let Some(n) = s.reads.next() else {
            cx.waker().wake_by_ref();
            return Poll::Pending;
        };
        let n = n.min(s.incoming.len()).min(buf.remaining());
        let bytes: Vec<u8> = s.incoming.drain(..n).collect();
        buf.put_slice(&bytes);
        Poll::Ready(Ok(()))
    }
}

impl AsyncWrite for Io {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        let mut s = self.0.borrow_mut();
        let Some(n) = s.writes.next() else {
            cx.waker().wake_by_ref();
            return Poll::Pending;
        };
        let n = n.min(buf.len());
        s.out.extend_from_slice(&buf[..n]);
        s.written += n;
        Poll::Ready(Ok(n))
    }
    fn poll_flush(self: Pin<&mut Self>, _: &mut Context<'_>) -> Poll<io::Result<()>> {
        Poll::Ready(Ok(()))
    }
    fn poll_shutdown(self: Pin<&mut Self>, _: &mut Context<'_>) -> Poll<io::Result<()>> {
        Poll::Ready(Ok(()))
    }
}

/// Whole TLS records (a trailing partial one as it is).
fn records(bytes: &[u8]) -> Vec<Vec<u8>> {
    let mut out = Vec::new();
    let mut at = 0;
    while at < bytes.len() {
        let len = if bytes.len() - at >= 5 {
            5 + u16::from_be_bytes([bytes[at + 3], bytes[at + 4]]) as usize
        } else {
            bytes.len() - at
        };
        let end = (at + len).min(bytes.len());
        out.push(bytes[at..end].to_vec());
        at = end;
    }
    out
}

/// Edit one record as the input says; `true`: end the stream after it.
fn edit(record: &[u8], input: &mut Input, out: &mut Vec<u8>) -> bool {
    if input.is_empty() {
        out.extend_from_slice(record);
        return false;
    }
    match input.byte() % 12 {
        0 => {}
        1 => out.extend_from_slice(&record[..input.u16() as usize % (record.len() + 1)]),
        2 => {
            out.extend_from_slice(record);
            out.extend_from_slice(record);
        }
        3 => {
            let mut r = record.to_vec();
            let at = input.u16() as usize % r.len().max(1);
            if let Some(b) = r.get_mut(at) {
                *b ^= input.byte() | 1;
            }
            out.extend_from_slice(&r);
        }
        4 => {
            let n = input.byte() as usize;
            out.extend_from_slice(input.take(n));
            out.extend_from_slice(record);
        }
        5 => {
            // A run of one byte, long enough to pass the incoming bound.
            let (b, n) = (input.byte(), input.byte() as usize * 256);
            out.extend(std::iter::repeat_n(b, n));
            out.extend_from_slice(record);
        }
        6 => {
            out.extend_from_slice(record);
            return true;
        }
        7 => {
            // Interleave: the record's header and body with other bytes between.
            let cut = 5.min(record.len());
            out.extend_from_slice(&record[..cut]);
            let n = input.byte() as usize % 8;
            out.extend_from_slice(input.take(n));
            out.extend_from_slice(&record[cut..]);
        }
        _ => out.extend_from_slice(record),
    }
    false
}

fn io(input: &mut Input) -> Io {
    let reads = Schedule::with_floor(input.sizes(), 512, 4096);
    let writes = Schedule::with_floor(input.sizes(), 512, 4096);
    Io(Rc::new(RefCell::new(IoState {
        incoming: VecDeque::new(),
        eof: false,
        out: Vec::new(),
        written: 0,
        reads,
        writes,
    })))
}

/// Output bound: the server writes its flight, alerts, tickets and echoes,
/// never more than a constant plus what it was asked to write.
const FLIGHT: usize = 64 * 1024;

fn one_shot(bytes: Vec<u8>, sock: Io) {
    let total = bytes.len();
    {
        let mut s = sock.0.borrow_mut();
        s.incoming.extend(bytes);
        s.eof = true;
    }
    let r = block_on(
        TlsStream::accept(setup().server.clone(), sock.clone()),
        4 * total + 1000,
    )
    .expect("the handshake hangs on input that is all there");
    assert!(r.is_err(), "a handshake completed with no client");
    assert!(sock.0.borrow().written <= FLIGHT);
}

/// A live client; the server is polled in step with it.
fn live(input: &mut Input, cfg: usize, sock: Io) {
    let setup = setup();
    let mut client = ClientConnection::new(setup.clients[cfg].clone(), name()).unwrap();
    let mut cx = Context::from_waker(Waker::noop());
    let accept = TlsStream::accept(setup.server.clone(), sock.clone());
    let mut accept = std::pin::pin!(accept);
    let mut client_ok = true;
    let mut ended = false;
    // After the server's close_notify, a record rustls cannot read trips a
    // debug assertion in rustls (a fatal alert after close_notify; rustls
    // issue 959, debug builds only): what arrived is read before the
    // shutdown, and the client's records after it are not delivered.
    let shut = std::cell::Cell::new(false);
    // Client → server: its records, edited.
    let pump = |client: &mut ClientConnection, input: &mut Input, ended: &mut bool| {
        let mut raw = Vec::new();
        while client.wants_write() {
            if client.write_tls(&mut raw).is_err() {
                break;
            }
        }
        let mut s = sock.0.borrow_mut();
        for r in records(&raw) {
            if *ended {
                break;
            }
            let mut out = Vec::new();
            if shut.get() {
                break;
            }
            *ended = edit(&r, input, &mut out);
            s.incoming.extend(out);
        }
        if *ended {
            s.eof = true;
        }
    };
    // Server → client.
    // Server → client: everything, in order (what the client cannot take
    // yet waits), its plaintext collected as it comes.
    let backlog = RefCell::new(Vec::<u8>::new());
    let client_plain = RefCell::new(Vec::<u8>::new());
    let back = |client: &mut ClientConnection, ok: &mut bool| {
        let out = std::mem::take(&mut sock.0.borrow_mut().out);
        let mut backlog = backlog.borrow_mut();
        backlog.extend_from_slice(&out);
        if !*ok {
            backlog.clear();
            return;
        }
        let mut buf = vec![0u8; 16 * 1024];
        loop {
            let mut rd = &backlog[..];
            let n = match client.read_tls(&mut rd) {
                Ok(n) => n,
                Err(_) => 0,
            };
            backlog.drain(..n);
            if client.process_new_packets().is_err() {
                *ok = false;
                backlog.clear();
                return;
            }
            let mut drained = 0;
            while let Ok(k) = client.reader().read(&mut buf) {
                if k == 0 {
                    break;
                }
                drained += k;
                client_plain.borrow_mut().extend_from_slice(&buf[..k]);
            }
            if (n == 0 && drained == 0) || backlog.is_empty() {
                return;
            }
        }
    };
    let mut stream = None;
    let mut rounds_after_eof = 0;
    loop {
        pump(&mut client, input, &mut ended);
        let limit = 64 + 4 * sock.0.borrow().incoming.len();
        for _ in 0..limit {
            if let Poll::Ready(r) = accept.as_mut().poll(&mut cx) {
                stream = Some(r);
                break;
            }
        }
        if stream.is_some() {
            break;
        }
        let produced = !sock.0.borrow().out.is_empty();
        back(&mut client, &mut client_ok);
        if sock.0.borrow().eof {
            rounds_after_eof += 1;
            assert!(
                rounds_after_eof < 3,
                "the handshake hangs after the end of its input"
            );
        } else if !produced && !client.wants_write() {
            // Nobody has anything more to say: the end of the stream.
            sock.0.borrow_mut().eof = true;
            ended = true;
        }
    }
    let Some(Ok(mut server)) = stream else { return };
    back(&mut client, &mut client_ok);

    // Data both ways, as the input says.
    let mut c2s = Vec::new();
    let mut read_by_server = Vec::new();
    let mut s2c = Vec::new();
    let mut server_done = false;
    let mut server_closed = false;
    let mut steps = 0;
    while !input.is_empty() && steps < 32 && !server_done {
        steps += 1;
        match input.byte() % 7 {
            0 if client_ok => {
                let n = input.u16() as usize % 40_000;
                let data: Vec<u8> = (0..n).map(|i| (i % 251) as u8 ^ (steps as u8)).collect();
                if client.writer().write_all(&data).is_ok() {
                    c2s.extend_from_slice(&data);
                }
                pump(&mut client, input, &mut ended);
            }
            1 => {
                let mut buf = vec![0u8; 1 + input.u16() as usize % 20_000];
                let limit = 4 * sock.0.borrow().incoming.len() + 1000;
                let r = block_on(
                    std::future::poll_fn(|cx| {
                        let mut rb = ReadBuf::new(&mut buf);
                        match Pin::new(&mut server).poll_read(cx, &mut rb) {
                            Poll::Ready(Ok(())) => Poll::Ready(Ok(rb.filled().to_vec())),
                            Poll::Ready(Err(e)) => Poll::Ready(Err(e)),
                            // Waiting for bytes the harness has not delivered yet.
                            Poll::Pending if sock.0.borrow().incoming.is_empty() => {
                                Poll::Ready(Ok(Vec::new()))
                            }
                            Poll::Pending => Poll::Pending,
                        }
                    }),
                    limit,
                )
                .expect("a read hangs on bytes that are there");
                match r {
                    Ok(got) => read_by_server.extend_from_slice(&got),
                    Err(_) => server_done = true,
                }
                assert!(
                    c2s.starts_with(&read_by_server),
                    "the server read what the client did not write"
                );
            }
            2 if !server_closed => {
                let n = input.u16() as usize % 40_000;
                let data: Vec<u8> = (0..n).map(|i| (i % 241) as u8).collect();
                let mut at = 0;
                let mut polls = 0;
                while at < data.len() && polls < 1000 + data.len() {
                    polls += 1;
                    match Pin::new(&mut server).poll_write(&mut cx, &data[at..]) {
                        Poll::Ready(Ok(k)) => {
                            assert!(k > 0 && k <= data.len() - at);
                            s2c.extend_from_slice(&data[at..at + k]);
                            at += k;
                        }
                        Poll::Ready(Err(_)) => {
                            server_done = true;
                            break;
                        }
                        Poll::Pending => {}
                    }
                }
                let _ = block_on(
                    std::future::poll_fn(|cx| Pin::new(&mut server).poll_flush(cx)),
                    10_000,
                );
                back(&mut client, &mut client_ok);
                assert!(
                    s2c.starts_with(&client_plain.borrow()),
                    "the client read what the server did not write"
                );
            }
            3 if client_ok => {
                let _ = client.refresh_traffic_keys();
                pump(&mut client, input, &mut ended);
            }
            4 if client_ok => {
                client.send_close_notify();
                pump(&mut client, input, &mut ended);
            }
            5 => {
                // What already arrived is read first (see `shut`).
                for _ in 0..1000 {
                    if sock.0.borrow().incoming.is_empty() || server_done {
                        break;
                    }
                    let mut buf = vec![0u8; 64 * 1024];
                    let limit = 4 * sock.0.borrow().incoming.len() + 1000;
                    let r = block_on(
                        std::future::poll_fn(|cx| {
                            let mut rb = ReadBuf::new(&mut buf);
                            Pin::new(&mut server)
                                .poll_read(cx, &mut rb)
                                .map(|r| r.map(|()| rb.filled().to_vec()))
                        }),
                        limit,
                    );
                    match r {
                        Some(Ok(got)) if !got.is_empty() => read_by_server.extend_from_slice(&got),
                        Some(Ok(_)) | Some(Err(_)) => server_done = true,
                        None => break,
                    }
                }
                if server_done {
                    break;
                }
                shut.set(true);
                let r = block_on(
                    std::future::poll_fn(|cx| Pin::new(&mut server).poll_shutdown(cx)),
                    10_000,
                )
                .expect("shutdown hangs");
                server_closed = true;
                if r.is_err() {
                    server_done = true;
                }
                back(&mut client, &mut client_ok);
            }
            _ => {
                sock.0.borrow_mut().eof = true;
                ended = true;
            }
        }
    }
    // The end: the server reads to it, in a bounded number of polls.
    sock.0.borrow_mut().eof = true;
    let limit = 8 * sock.0.borrow().incoming.len() + 1000;
    let mut buf = vec![0u8; 16 * 1024];
    for _ in 0..1000 {
        let r = block_on(
            std::future::poll_fn(|cx| {
                let mut rb = ReadBuf::new(&mut buf);
                Pin::new(&mut server)
                    .poll_read(cx, &mut rb)
                    .map(|r| r.map(|()| rb.filled().to_vec()))
            }),
            limit,
        )
        .expect("reading to the end hangs");
        match r {
            Ok(got) if got.is_empty() => break,
            Ok(got) => read_by_server.extend_from_slice(&got),
            Err(_) => break,
        }
    }
    assert!(
        c2s.starts_with(&read_by_server),
        "the server read what the client did not write"
    );
    let written = sock.0.borrow().written;
    assert!(
        written <= FLIGHT + 2 * s2c.len() + 64 * 1024,
        "{written} bytes out"
    );
}

fuzz_target!(|data: &[u8]| {
    // A failed handshake drains the socket under a `tokio::time::timeout`.
    let _timers = common::timers();
    let mut input = Input(data);
    let mode = input.byte();
    let sock = io(&mut input);
    match mode % 4 {
        0 => one_shot(input.0.to_vec(), sock),
        1 => {
            let hello = &setup().hellos[input.byte() as usize % 3];
            let mut bytes = Vec::new();
            for r in records(hello) {
                if edit(&r, &mut input, &mut bytes) {
                    break;
                }
            }
            bytes.extend_from_slice(input.0);
            one_shot(bytes, sock)
        }
        _ => {
            let cfg = input.byte() as usize % 3;
            live(&mut input, cfg, sock)
        }
    }
});
