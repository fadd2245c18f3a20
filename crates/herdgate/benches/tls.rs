//! Baseline for herdgate's TLS accept rate: what rustls itself manages for
//! server-side full handshakes on this machine.
//!
//! Handshakes run in memory (no sockets) between a `ClientConnection` and a
//! `ServerConnection`. The `tls13` / `tls12` variants time only the server's
//! calls (`ServerConnection::new`, `read_tls`, `process_new_packets`,
//! `write_tls`), i.e. the server's CPU cost per full handshake; handshakes/s
//! per core = 1 / time. `client_and_server` times both sides, for reference.
//! The client has resumption disabled, so every handshake is full.
// Real processes in real time: the clock rule (clippy.toml) is the server's.
#![allow(clippy::disallowed_types)]

use criterion::{criterion_group, criterion_main, Criterion};
use rcgen::{BasicConstraints, CertificateParams, DnType, IsCa, Issuer, KeyPair};
use rustls::client::Resumption;
use rustls::pki_types::{PrivateKeyDer, PrivatePkcs8KeyDer, ServerName};
use rustls::{ClientConfig, ClientConnection, RootCertStore, ServerConfig, ServerConnection};
use std::sync::Arc;
use std::time::{Duration, Instant};

struct Setup {
    server: Arc<ServerConfig>,
    client13: Arc<ClientConfig>,
    client12: Arc<ClientConfig>,
    client_any: Arc<ClientConfig>,
    name: ServerName<'static>,
}

fn setup() -> Setup {
    // CA and an ECDSA P-256 leaf for localhost, with distinct CommonNames.
    let ca_key = KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256).unwrap();
    let mut ca_params = CertificateParams::new(Vec::<String>::new()).unwrap();
    ca_params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    ca_params
        .distinguished_name
        .push(DnType::CommonName, "herdgate bench CA");
    let ca = ca_params.self_signed(&ca_key).unwrap();
    let issuer = Issuer::new(ca_params, ca_key);

    let leaf_key = KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256).unwrap();
    let mut leaf_params = CertificateParams::new(vec!["localhost".to_string()]).unwrap();
    leaf_params
        .distinguished_name
        .push(DnType::CommonName, "localhost");
    let leaf = leaf_params.signed_by(&leaf_key, &issuer).unwrap();
    let leaf_key_der = PrivateKeyDer::Pkcs8(PrivatePkcs8KeyDer::from(leaf_key.serialize_der()));

    // Same as herdgate's src/tls.rs::server_config, but with a single cert.
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let mut server = ServerConfig::builder_with_provider(provider.clone())
        .with_protocol_versions(&[&rustls::version::TLS13, &rustls::version::TLS12])
        .unwrap()
        .with_no_client_auth()
        .with_single_cert(vec![leaf.der().clone()], leaf_key_der)
        .unwrap();
    server.alpn_protocols = vec![b"http/1.1".to_vec()];

    let mut roots = RootCertStore::empty();
    roots.add(ca.der().clone()).unwrap();
    let client = |versions: &[&'static rustls::SupportedProtocolVersion]| {
        let mut cfg = ClientConfig::builder_with_provider(provider.clone())
            .with_protocol_versions(versions)
            .unwrap()
            .with_root_certificates(roots.clone())
            .with_no_client_auth();
        cfg.alpn_protocols = vec![b"http/1.1".to_vec()];
        cfg.resumption = Resumption::disabled();
        Arc::new(cfg)
    };

    Setup {
        server: Arc::new(server),
        client13: client(&[&rustls::version::TLS13]),
        client12: client(&[&rustls::version::TLS12]),
        client_any: client(&[&rustls::version::TLS13, &rustls::version::TLS12]),
        name: ServerName::try_from("localhost").unwrap(),
    }
}

/// Time `f`, adding its duration to `acc` when `timed`.
#[inline(always)]
fn t<R>(timed: bool, acc: &mut Duration, f: impl FnOnce() -> R) -> R {
    if timed {
        let start = Instant::now();
        let r = f();
        *acc += start.elapsed();
        r
    } else {
        f()
    }
}

/// One full in-memory handshake. Returns the time spent in server-side calls
/// and the finished connections.
fn handshake(
    server_cfg: &Arc<ServerConfig>,
    client_cfg: &Arc<ClientConfig>,
    name: &ServerName<'static>,
) -> (Duration, ClientConnection, ServerConnection) {
    let mut srv_time = Duration::ZERO;
    let mut client = ClientConnection::new(client_cfg.clone(), name.clone()).unwrap();
    let mut server = t(true, &mut srv_time, || {
        ServerConnection::new(server_cfg.clone()).unwrap()
    });
    let mut c2s: Vec<u8> = Vec::with_capacity(4096);
    let mut s2c: Vec<u8> = Vec::with_capacity(4096);

    loop {
        while client.wants_write() {
            client.write_tls(&mut c2s).unwrap();
        }
        if !c2s.is_empty() {
            t(true, &mut srv_time, || {
                let mut rd = &c2s[..];
                while !rd.is_empty() {
                    server.read_tls(&mut rd).unwrap();
                    server.process_new_packets().unwrap();
                }
            });
            c2s.clear();
        }
        t(true, &mut srv_time, || {
            while server.wants_write() {
                server.write_tls(&mut s2c).unwrap();
            }
        });
        if !s2c.is_empty() {
            let mut rd = &s2c[..];
            while !rd.is_empty() {
                client.read_tls(&mut rd).unwrap();
                client.process_new_packets().unwrap();
            }
            s2c.clear();
        }
        if !client.is_handshaking() && !server.is_handshaking() {
            break;
        }
    }
    (srv_time, client, server)
}

fn tls_handshakes(c: &mut Criterion) {
    let s = setup();

    // Sanity check (untimed): each variant negotiates what it claims, with ALPN.
    for (cfg, want) in [
        (&s.client13, rustls::ProtocolVersion::TLSv1_3),
        (&s.client12, rustls::ProtocolVersion::TLSv1_2),
        (&s.client_any, rustls::ProtocolVersion::TLSv1_3),
    ] {
        let (_, client, server) = handshake(&s.server, cfg, &s.name);
        assert_eq!(server.protocol_version(), Some(want));
        assert_eq!(client.protocol_version(), Some(want));
        assert_eq!(server.alpn_protocol(), Some(&b"http/1.1"[..]));
    }

    let mut g = c.benchmark_group("tls");
    g.sample_size(20)
        .warm_up_time(Duration::from_secs(1))
        .measurement_time(Duration::from_secs(5));

    for (label, cfg) in [("tls13", &s.client13), ("tls12", &s.client12)] {
        g.bench_function(format!("full_handshake_server_side/{label}"), |b| {
            b.iter_custom(|iters| {
                let mut total = Duration::ZERO;
                for _ in 0..iters {
                    let (srv, client, server) = handshake(&s.server, cfg, &s.name);
                    total += srv;
                    drop(std::hint::black_box((client, server)));
                }
                total
            })
        });
    }

    // Reference: both sides timed (client offers TLS 1.3 and 1.2; negotiates 1.3).
    g.bench_function("full_handshake_server_side/client_and_server", |b| {
        b.iter_custom(|iters| {
            let start = Instant::now();
            for _ in 0..iters {
                std::hint::black_box(handshake(&s.server, &s.client_any, &s.name));
            }
            start.elapsed()
        })
    });
    g.finish();
}

criterion_group!(benches, tls_handshakes);
criterion_main!(benches);
