//! TLS ticket keys kept in etcd (`tls.ticket_keys_in_etcd`, see
//! `herdgate::cluster::membership::ticket_keys`), against a real etcd: two
//! edges that start together write one list, not two; a ticket one edge
//! seals, the other opens; a rotation makes one new key, which every edge
//! opens before any seals with it; a key retired a lifetime ago opens
//! nothing. Times are passed in (Unix seconds), so hours of rotation take
//! no time.

use herdgate::cluster::membership::ticket_keys::{in_force, sync_at, Vault, LEAD};
use herdgate::tls::tickets::{Refused, SharedTickets};
use herdgate_testkit::etcd::Etcd;

#[test]
fn edges_share_ticket_keys_through_etcd_and_rotate_them() {
    let _serial = crate::SERIAL.blocking_lock();
    let etcd = Etcd::start(1);
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    rt.block_on(async {
        let ep = etcd.endpoints();
        let prefix = "/ticket-keys-test";
        let life = 3600u64;
        let t0 = 1_000_000u64;
        let vault = Vault::new("cluster-secret-0123456789");
        let sync = |now: u64| sync_at(&ep, prefix, now, life, &vault);
        // Two edges starting at once: one list.
        let (a, b) = tokio::join!(sync(t0), sync(t0));
        let (a, b) = (a.unwrap(), b.unwrap());
        assert_eq!(a, b, "both edges hold the list one of them wrote");
        assert_eq!(a.keys.len(), 1);
        let edge_a = SharedTickets::new(&in_force(&a, t0, &vault), life as u32);
        let edge_b = SharedTickets::new(&in_force(&b, t0, &vault), life as u32);
        let old = edge_a.seal(b"session", t0).unwrap();
        assert_eq!(edge_b.open(&old, t0 + 1).unwrap(), b"session");
        // Nothing due: nothing written.
        assert_eq!(sync(t0 + 60).await.unwrap(), a);
        // The rotation is due a lead before the first key has sealed for
        // a lifetime: both edges together still make one new key.
        let t1 = t0 + life - LEAD.as_secs();
        let (a1, b1) = tokio::join!(sync(t1), sync(t1));
        let (a1, b1) = (a1.unwrap(), b1.unwrap());
        assert_eq!(a1, b1);
        assert_eq!(a1.keys.len(), 2, "one new key, not one per edge");
        let from = a1.keys[0].from;
        assert!(from > t1, "the new key seals only later");
        // B has read it but its time has not come; A's has.
        edge_b.set_keys(&in_force(&b1, t1, &vault));
        edge_a.set_keys(&in_force(&a1, from, &vault));
        let new = edge_a.seal(b"later", from).unwrap();
        assert_eq!(
            edge_b.open(&new, from).unwrap(),
            b"later",
            "an edge opens the new key's tickets before it seals with it"
        );
        assert_eq!(
            edge_a.open(&old, t0 + 10).unwrap(),
            b"session",
            "the old key still opens"
        );
        // A lifetime after it retired, the old key is gone from etcd and
        // opens nothing.
        let t2 = from + life;
        let a2 = sync(t2).await.unwrap();
        assert!(a2.keys.iter().all(|k| k.sealed != a.keys[0].sealed));
        edge_a.set_keys(&in_force(&a2, t2, &vault));
        assert_eq!(edge_a.open(&old, t0 + 10), Err(Refused::UnknownKey));
    });
}

/// Two edge processes with `tls.ticket_keys_in_etcd`: a client's session
/// from one resumes on the other, with no key file anywhere.
#[test]
fn a_client_resumes_on_another_edge_with_the_keys_from_etcd() {
    use herdgate_testkit::cluster::edge_toml;
    use herdgate_testkit::pki::{tls_section, Pki};
    use herdgate_testkit::process::Herdgate;
    let _serial = crate::SERIAL.blocking_lock();
    let etcd = Etcd::start(1);
    let pki = Pki::new();
    let (cert, key, _) = pki.leaf("edge", false);
    let tls = tls_section(&cert, &key, "ticket_keys_in_etcd = true\n");
    let a = Herdgate::start(&edge_toml("e1", &etcd.endpoints(), &tls));
    let b = Herdgate::start(&edge_toml("e2", &etcd.endpoints(), &tls));
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    rt.block_on(async {
        // Each edge reads the keys as it starts: until both have, a first
        // contact gets no ticket, or one the other cannot open yet.
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(30);
        loop {
            let cfg = herdgate_testkit::tls_client_config(&pki.ca_der, &[&rustls::version::TLS13]);
            assert!(!resumed(&cfg, a.socket_addr()).await, "first contact: full");
            if resumed(&cfg, b.socket_addr()).await {
                assert!(resumed(&cfg, a.socket_addr()).await, "and A opens B's");
                break;
            }
            assert!(
                std::time::Instant::now() < deadline,
                "B never opened A's ticket"
            );
            tokio::time::sleep(std::time::Duration::from_millis(200)).await;
        }
    });
}

/// A TLS connection that reads one HTTP answer (so the ticket sent after
/// the handshake reaches the client's store): was it a resumption?
async fn resumed(cfg: &std::sync::Arc<rustls::ClientConfig>, addr: std::net::SocketAddr) -> bool {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let tcp = tokio::net::TcpStream::connect(addr).await.unwrap();
    let mut tls = herdgate_testkit::tls_connect(cfg.clone(), tcp)
        .await
        .expect("TLS handshake");
    let kind = tls.get_ref().1.handshake_kind();
    tls.write_all(b"GET /apps/1/channels HTTP/1.1\r\nHost: localhost\r\nConnection: close\r\n\r\n")
        .await
        .unwrap();
    let mut answer = Vec::new();
    let _ = tokio::time::timeout(herdgate_testkit::WAIT, tls.read_to_end(&mut answer)).await;
    assert!(answer.starts_with(b"HTTP/1.1 "), "an HTTP answer over TLS");
    kind == Some(rustls::HandshakeKind::Resumed)
}
