//! A server TLS stream over rustls's unbuffered API, holding no buffer while
//! the connection is quiet.
//!
//! Why not tokio-rustls: its `ServerConnection` keeps a 4 KiB receive
//! buffer (and the capacity of its other queues) for the connection's whole
//! life, half of what an idle TLS websocket costs. Here the caller's side
//! owns the bytes: what arrived but is not a whole record yet, what is
//! encrypted but not yet written, and what is decrypted but not yet read
//! are three vectors, each freed as soon as it is empty. A quiet socket
//! keeps only rustls's connection state (keys, sequence numbers).
//!
//! Bounds: at most one TLS record (plus the records rustls sends on its
//! own: tickets, key updates, alerts) waits to be written, because a write
//! first finishes the previous one. Received bytes stay in `incoming` only
//! while rustls cannot use them yet: an incomplete record, or the records of
//! a handshake message that spans several (rustls joins them in place and
//! lets go of them all once the message is whole). No read ever takes
//! `incoming` past its bound, and a peer that needs more is an error:
//! - during the handshake, [`MAX_HANDSHAKE_INCOMING`] (65,535 bytes): what
//!   rustls's own buffered reader admits while it joins a handshake message,
//!   and the largest handshake message rustls accepts, so any ClientHello
//!   that stock rustls takes is taken here too;
//! - after it, [`MAX_RECORD_INCOMING`] (18,437 bytes): one record of the
//!   largest size rustls accepts. A client has no handshake message to send
//!   then that needs more (TLS 1.3's KeyUpdate is 5 bytes; rustls refuses
//!   TLS 1.2 renegotiation anyway), so an idle-heavy server keeps the
//!   tighter bound for the connection's long life.
//!
//! rustls is asked to look at the input again only when more has arrived
//! (see `starved`): when a client's 0-RTT data is rejected, rustls skips the
//! undecryptable records but keeps them in the input until the next
//! handshake message, and counts them against its 16 KiB allowance each
//! time it looks; extra looks would shrink that allowance below stock
//! rustls's.
//!
//! A failed handshake is closed the way a client can read: the alert is
//! flushed, our side is ended (FIN), and what the client still sends is
//! read and dropped (at most [`DRAIN_BYTES`], for at most [`DRAIN_TIME`])
//! before the socket is closed. Closing with unread bytes in the kernel
//! buffer would make Linux answer with a reset instead.

use rustls::server::{ServerConnectionData, UnbufferedServerConnection};
use rustls::unbuffered::{
    ConnectionState, EncodeError, EncryptError, InsufficientSizeError, UnbufferedStatus,
    WriteTraffic,
};
use std::io;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{ready, Context, Poll};
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};

/// Bytes read from the socket per read, into the stack.
const READ_CHUNK: usize = 4096;
/// Received bytes held at most during the handshake: rustls's
/// `MAX_HANDSHAKE_SIZE`, the bound of its own buffered reader while it joins
/// a handshake message from several records, and of one handshake message.
const MAX_HANDSHAKE_INCOMING: usize = 0xffff;
/// Received bytes held at most after the handshake: one record of the
/// largest size rustls accepts (16 KiB + 2 KiB of payload, 5-byte header).
const MAX_RECORD_INCOMING: usize = 16 * 1024 + 2048 + 5;
/// After a failed handshake, what the client still sends is read and
/// dropped up to this many bytes (as much as the handshake could have
/// held) ...
const DRAIN_BYTES: usize = MAX_HANDSHAKE_INCOMING;
/// ... for at most this long (and within the handshake's own deadline).
const DRAIN_TIME: std::time::Duration = std::time::Duration::from_secs(1);
/// Plaintext encrypted per record (the TLS maximum).
const MAX_PLAINTEXT: usize = 16 * 1024;

pub struct TlsStream<IO> {
    io: IO,
    /// Boxed: rustls's state is large, and this stream is moved (into
    /// hyper, into the upgrade) after the handshake.
    conn: Box<UnbufferedServerConnection>,
    /// Received, not yet a whole record.
    incoming: Vec<u8>,
    /// Encrypted, not yet written.
    outgoing: Vec<u8>,
    /// Decrypted, not yet read (`plain[plain_at..]`).
    plain: Vec<u8>,
    plain_at: usize,
    /// The peer closed (close_notify, or the socket ended).
    eof: bool,
    /// Our close_notify is queued.
    closing: bool,
    /// rustls reported a fatal error: nothing more is encrypted.
    failed: bool,
    /// During the handshake: rustls has looked at all of `incoming` and
    /// needs more. Until more arrives another round would only repeat that
    /// (and charge skipped 0-RTT records against rustls's allowance again).
    starved: bool,
    /// The alert for that error was taken from rustls (once only).
    alerted: bool,
}

/// What one round of record processing did.
enum Step {
    /// Decrypted data was added to `plain`.
    Data,
    /// rustls encoded something of its own (handshake, ticket, alert) into
    /// `outgoing`: go on.
    Progress,
    /// rustls said what it encoded may be sent, which it says only after
    /// looking at all of `incoming` and finding nothing to process: go on.
    Transmitted,
    /// Nothing more to do with what has arrived: read more.
    NeedInput,
    /// Ready for application data (the caller had nothing to write).
    Idle,
    /// The caller's write was encrypted into `outgoing`.
    Wrote,
    /// The peer sent close_notify (said once).
    PeerClosed,
    /// Both sides closed.
    Closed,
}

/// What a round does when rustls is ready for application data.
type Writer<'w> =
    &'w mut dyn FnMut(&mut WriteTraffic<'_, ServerConnectionData>, &mut Vec<u8>) -> io::Result<()>;

fn tls_error(e: rustls::Error) -> io::Error {
    io::Error::new(io::ErrorKind::InvalidData, e)
}

/// Append what `f` writes to `out`, growing it to the size rustls asks for.
fn append<E>(
    out: &mut Vec<u8>,
    guess: usize,
    mut f: impl FnMut(&mut [u8]) -> Result<usize, E>,
    size: impl Fn(&E) -> Option<usize>,
    err: impl Fn(E) -> io::Error,
) -> io::Result<()> {
    let start = out.len();
    out.resize(start + guess, 0);
    match f(&mut out[start..]) {
        Ok(n) => {
            out.truncate(start + n);
            Ok(())
        }
        Err(e) => match size(&e) {
            Some(required) => {
                out.resize(start + required, 0);
                match f(&mut out[start..]) {
                    Ok(n) => {
                        out.truncate(start + n);
                        Ok(())
                    }
                    Err(e) => {
                        out.truncate(start);
                        Err(err(e))
                    }
                }
            }
            None => {
                out.truncate(start);
                Err(err(e))
            }
        },
    }
}

fn encode_size(e: &EncodeError) -> Option<usize> {
    match e {
        EncodeError::InsufficientSize(InsufficientSizeError { required_size }) => {
            Some(*required_size)
        }
        _ => None,
    }
}

fn encrypt_size(e: &EncryptError) -> Option<usize> {
    match e {
        EncryptError::InsufficientSize(InsufficientSizeError { required_size }) => {
            Some(*required_size)
        }
        _ => None,
    }
}

fn other(e: impl std::fmt::Display) -> io::Error {
    io::Error::other(e.to_string())
}

impl<IO: AsyncRead + AsyncWrite + Unpin> TlsStream<IO> {
    /// Run the server side of a handshake on `io`.
    pub async fn accept(config: Arc<rustls::ServerConfig>, io: IO) -> io::Result<TlsStream<IO>> {
        let conn = UnbufferedServerConnection::new(config).map_err(tls_error)?;
        let mut s = TlsStream {
            io,
            conn: Box::new(conn),
            incoming: Vec::new(),
            outgoing: Vec::new(),
            plain: Vec::new(),
            plain_at: 0,
            eof: false,
            closing: false,
            failed: false,
            starved: false,
            alerted: false,
        };
        match std::future::poll_fn(|cx| s.poll_handshake(cx)).await {
            Ok(()) => {
                let kind = match s.conn.handshake_kind() {
                    Some(rustls::HandshakeKind::Resumed) => "resumed",
                    _ => "full",
                };
                metrics::counter!("herdgate_tls_handshakes_total", "kind" => kind).increment(1);
                Ok(s)
            }
            Err(e) => {
                s.queue_alert();
                s.close_after_failure().await;
                Err(e)
            }
        }
    }

    /// After a failed handshake: send the alert rustls queued, end our side,
    /// and read and drop what the client still sends until it ends its side
    /// too (within [`DRAIN_BYTES`] and [`DRAIN_TIME`]). The socket is then
    /// closed with nothing unread, so the client gets a FIN after the alert,
    /// not a reset that may make it lose the alert.
    async fn close_after_failure(&mut self) {
        use tokio::io::{AsyncReadExt, AsyncWriteExt};
        self.incoming = Vec::new();
        self.plain = Vec::new();
        self.plain_at = 0;
        let drain = async {
            std::future::poll_fn(|cx| self.poll_flush_out(cx)).await?;
            self.io.shutdown().await?;
            let mut left = DRAIN_BYTES;
            let mut buf = [0u8; READ_CHUNK];
            while left > 0 {
                let n = self.io.read(&mut buf[..left.min(READ_CHUNK)]).await?;
                if n == 0 {
                    break;
                }
                left -= n;
            }
            io::Result::Ok(())
        };
        let _ = tokio::time::timeout(DRAIN_TIME, drain).await;
        self.outgoing = Vec::new();
    }

    /// After a fatal error: encode the alert rustls queued (best effort).
    /// rustls hands it out before it looks at the input again, and the
    /// input must not be looked at again (it would fail anew).
    fn queue_alert(&mut self) {
        self.failed = true;
        // Once: asked again (a read after the error), rustls would process
        // the bad input anew and send a second fatal alert.
        if std::mem::replace(&mut self.alerted, true) {
            return;
        }
        let UnbufferedStatus { state, .. } = self.conn.process_tls_records(&mut self.incoming);
        if let Ok(ConnectionState::EncodeTlsData(mut e)) = state {
            let _ = append(&mut self.outgoing, 64, |b| e.encode(b), encode_size, other);
        }
    }

    fn poll_handshake(&mut self, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        loop {
            ready!(self.poll_flush_out(cx))?;
            let step = if self.starved {
                Step::NeedInput
            } else {
                self.process(None)?
            };
            match step {
                Step::Progress => {}
                // Nothing in `incoming` to process: once this is sent, the
                // next round would say so again (during the handshake: wait
                // for input; after it: say that the handshake is done).
                Step::Transmitted => self.starved = self.conn.is_handshaking(),
                Step::Data | Step::Idle if !self.conn.is_handshaking() => {
                    return Poll::Ready(Ok(()));
                }
                Step::Data | Step::Idle | Step::NeedInput => {
                    if !matches!(step, Step::Data) {
                        self.starved = true;
                    }
                    if ready!(self.poll_fill(cx))? == 0 {
                        return Poll::Ready(Err(io::ErrorKind::UnexpectedEof.into()));
                    }
                }
                Step::Wrote | Step::PeerClosed | Step::Closed => {
                    return Poll::Ready(Err(io::ErrorKind::UnexpectedEof.into()))
                }
            }
        }
    }

    /// One round of rustls's record processing over what has arrived
    /// (always all of it: rustls remembers positions in it between rounds).
    /// In the state where application data may be sent, `write` (if any)
    /// encrypts into `outgoing`.
    fn process(&mut self, write: Option<Writer<'_>>) -> io::Result<Step> {
        if self.failed {
            return Err(io::Error::new(
                io::ErrorKind::InvalidData,
                "the TLS session failed",
            ));
        }
        let UnbufferedStatus { mut discard, state } =
            self.conn.process_tls_records(&mut self.incoming);
        let step = match state {
            Err(e) => Err(tls_error(e)),
            Ok(ConnectionState::ReadTraffic(mut r)) => {
                let mut got = Ok(Step::Data);
                while let Some(record) = r.next_record() {
                    match record {
                        Ok(record) => {
                            discard += record.discard;
                            if self.plain_at == self.plain.len() {
                                self.plain.clear();
                                self.plain_at = 0;
                            }
                            self.plain.extend_from_slice(record.payload);
                        }
                        Err(e) => {
                            got = Err(tls_error(e));
                            break;
                        }
                    }
                }
                got
            }
            Ok(ConnectionState::EncodeTlsData(mut e)) => append(
                &mut self.outgoing,
                4096,
                |b| e.encode(b),
                encode_size,
                other,
            )
            .map(|()| Step::Progress),
            Ok(ConnectionState::TransmitTlsData(t)) => {
                // Written in order with everything after it (`outgoing` is
                // one queue), so rustls may consider it sent now.
                t.done();
                Ok(Step::Transmitted)
            }
            Ok(ConnectionState::BlockedHandshake) => Ok(Step::NeedInput),
            Ok(ConnectionState::WriteTraffic(mut w)) => match write {
                None => Ok(Step::Idle),
                Some(f) => f(&mut w, &mut self.outgoing).map(|()| Step::Wrote),
            },
            Ok(ConnectionState::PeerClosed) => Ok(Step::PeerClosed),
            Ok(ConnectionState::Closed) => Ok(Step::Closed),
            Ok(other_state) => Err(io::Error::other(format!(
                "unexpected TLS state {other_state:?}"
            ))),
        };
        if discard > 0 {
            // A fresh copy of what is left: the buffer does not keep the
            // capacity of a burst.
            self.incoming = self.incoming.get(discard..).unwrap_or_default().to_vec();
        }
        if step.is_err() {
            self.failed = true;
        }
        step
    }

    /// Read more from the socket into `incoming`, never past its bound (see
    /// the module docs); `Ok(0)` at its end.
    fn poll_fill(&mut self, cx: &mut Context<'_>) -> Poll<io::Result<usize>> {
        let bound = if self.conn.is_handshaking() {
            MAX_HANDSHAKE_INCOMING
        } else {
            MAX_RECORD_INCOMING
        };
        let room = bound.saturating_sub(self.incoming.len());
        if room == 0 {
            return Poll::Ready(Err(io::Error::new(
                io::ErrorKind::InvalidData,
                "TLS message larger than allowed",
            )));
        }
        let mut stack = [0u8; READ_CHUNK];
        let mut rb = ReadBuf::new(&mut stack[..room.min(READ_CHUNK)]);
        ready!(Pin::new(&mut self.io).poll_read(cx, &mut rb))?;
        let got = rb.filled();
        let (len, n) = (self.incoming.len(), got.len());
        if self.incoming.capacity() < len + n {
            // Doubling, but the capacity too stays within the bound.
            let want = (self.incoming.capacity() * 2).clamp(len + n, bound);
            self.incoming.reserve_exact(want - len);
        }
        self.incoming.extend_from_slice(got);
        if n > 0 {
            self.starved = false;
        }
        Poll::Ready(Ok(n))
    }

    /// Write everything encrypted so far.
    fn poll_flush_out(&mut self, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        let mut at = 0;
        let result = loop {
            if at == self.outgoing.len() {
                break Poll::Ready(Ok(()));
            }
            match Pin::new(&mut self.io).poll_write(cx, &self.outgoing[at..]) {
                Poll::Ready(Ok(0)) => break Poll::Ready(Err(io::ErrorKind::WriteZero.into())),
                Poll::Ready(Ok(n)) => at += n,
                Poll::Ready(Err(e)) => break Poll::Ready(Err(e)),
                Poll::Pending => break Poll::Pending,
            }
        };
        if at > 0 {
            self.outgoing = self.outgoing[at..].to_vec();
        }
        result
    }

    /// Encode whatever rustls wants to send on its own, then encrypt `data`
    /// (at most one record of it); returns how much of `data` was taken.
    fn encrypt(&mut self, data: &[u8]) -> io::Result<usize> {
        if self.closing {
            return Err(io::ErrorKind::BrokenPipe.into());
        }
        let data = &data[..data.len().min(MAX_PLAINTEXT)];
        let mut write = |w: &mut WriteTraffic<'_, ServerConnectionData>, out: &mut Vec<u8>| {
            append(
                out,
                data.len() + 64,
                |b| w.encrypt(data, b),
                encrypt_size,
                other,
            )
        };
        loop {
            match self.process(Some(&mut write))? {
                Step::Wrote => return Ok(data.len()),
                // Decrypted data waits in `plain` for the reader (bounded by
                // what was already read from the socket).
                Step::Data | Step::Progress | Step::Transmitted => {}
                Step::PeerClosed => self.eof = true,
                Step::Closed => return Err(io::ErrorKind::BrokenPipe.into()),
                Step::Idle | Step::NeedInput => {
                    return Err(io::Error::other("TLS not ready for application data"))
                }
            }
        }
    }
}

impl<IO: AsyncRead + AsyncWrite + Unpin> AsyncRead for TlsStream<IO> {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        loop {
            if this.plain_at < this.plain.len() {
                let n = (this.plain.len() - this.plain_at).min(buf.remaining());
                buf.put_slice(&this.plain[this.plain_at..this.plain_at + n]);
                this.plain_at += n;
                if this.plain_at == this.plain.len() {
                    this.plain = Vec::new();
                    this.plain_at = 0;
                }
                return Poll::Ready(Ok(()));
            }
            if this.eof {
                return Poll::Ready(Ok(()));
            }
            // Records rustls sends on its own (tickets, a key update's
            // answer) go out whenever the socket takes them.
            if !this.outgoing.is_empty() {
                if let Poll::Ready(Err(e)) = this.poll_flush_out(cx) {
                    return Poll::Ready(Err(e));
                }
            }
            let step = match this.process(None) {
                Ok(step) => step,
                Err(e) => {
                    // Tell the peer why, if the socket takes it now.
                    this.queue_alert();
                    let _ = this.poll_flush_out(cx);
                    return Poll::Ready(Err(e));
                }
            };
            match step {
                Step::Data | Step::Progress | Step::Transmitted | Step::Wrote => {}
                Step::PeerClosed | Step::Closed => this.eof = true,
                Step::Idle | Step::NeedInput => {
                    if ready!(this.poll_fill(cx))? == 0 {
                        // The socket ended without close_notify: a
                        // truncation, as tokio-rustls reports it.
                        this.eof = true;
                        return Poll::Ready(Err(io::ErrorKind::UnexpectedEof.into()));
                    }
                }
            }
        }
    }
}

impl<IO: AsyncRead + AsyncWrite + Unpin> AsyncWrite for TlsStream<IO> {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        let this = self.get_mut();
        // One record waits at most: the previous write goes out first.
        ready!(this.poll_flush_out(cx))?;
        let n = this.encrypt(buf)?;
        // Start sending now; what the socket does not take goes next time.
        if let Poll::Ready(Err(e)) = this.poll_flush_out(cx) {
            return Poll::Ready(Err(e));
        }
        Poll::Ready(Ok(n))
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        ready!(this.poll_flush_out(cx))?;
        Pin::new(&mut this.io).poll_flush(cx)
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        if !this.closing && !this.failed {
            ready!(this.poll_flush_out(cx))?;
            let mut close = |w: &mut WriteTraffic<'_, ServerConnectionData>, out: &mut Vec<u8>| {
                append(out, 64, |b| w.queue_close_notify(b), encrypt_size, other)
            };
            loop {
                match this.process(Some(&mut close)) {
                    Ok(Step::Data | Step::Progress | Step::Transmitted) => {}
                    Ok(Step::PeerClosed) => this.eof = true,
                    // Queued; or closed already, or in no state to say so.
                    _ => break,
                }
            }
            this.closing = true;
        }
        ready!(this.poll_flush_out(cx))?;
        Pin::new(&mut this.io).poll_shutdown(cx)
    }
}

#[cfg(test)]
mod tests {
    //! Against tokio-rustls's client (an independent TLS implementation's
    //! driver over the same library), on real loopback sockets.
    use super::*;
    use herdgate_testkit::pki::Pki;
    use herdgate_testkit::tls_client_config;
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    use tokio::net::{TcpListener, TcpStream};

    /// A test CA and a server config with its leaf.
    fn server() -> (Pki, Arc<rustls::ServerConfig>) {
        let pki = Pki::new();
        let (cert, key, _) = pki.leaf("leaf", false);
        let store = Arc::new(crate::tls::CertStore::load(&cert, &key).unwrap());
        let config = crate::tls::server_config(store).unwrap();
        (pki, config)
    }

    /// A client that sends `bytes` instead of a handshake: the server's
    /// error, and the client's socket.
    async fn refused(bytes: &[u8]) -> (io::Error, TcpStream) {
        let (_pki, config) = server();
        let l = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let mut c = TcpStream::connect(l.local_addr().unwrap()).await.unwrap();
        c.write_all(bytes).await.unwrap();
        let (tcp, _) = l.accept().await.unwrap();
        let err = TlsStream::accept(config, tcp).await.err().expect("refused");
        (err, c)
    }

    async fn pair(
        versions: &[&'static rustls::SupportedProtocolVersion],
    ) -> (
        TlsStream<TcpStream>,
        tokio_rustls::client::TlsStream<TcpStream>,
    ) {
        let (pki, config) = server();
        let l = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = l.local_addr().unwrap();
        let client = tokio::spawn({
            let cfg = tls_client_config(&pki.ca_der, versions);
            async move {
                let tcp = TcpStream::connect(addr).await.unwrap();
                let name = rustls::pki_types::ServerName::try_from("localhost").unwrap();
                tokio_rustls::TlsConnector::from(cfg)
                    .connect(name, tcp)
                    .await
                    .unwrap()
            }
        });
        let (tcp, _) = l.accept().await.unwrap();
        let server = TlsStream::accept(config, tcp).await.unwrap();
        (server, client.await.unwrap())
    }

    fn idle(s: &TlsStream<TcpStream>) -> bool {
        s.incoming.capacity() == 0 && s.outgoing.capacity() == 0 && s.plain.capacity() == 0
    }

    #[tokio::test]
    async fn both_versions_carry_data_both_ways_and_keep_no_buffer_when_quiet() {
        for versions in [
            &[&rustls::version::TLS13][..],
            &[&rustls::version::TLS12][..],
        ] {
            let (mut server, mut client) = pair(versions).await;
            assert_eq!(client.get_ref().1.alpn_protocol(), Some(&b"http/1.1"[..]));
            // Larger than a record and than a read: crosses both boundaries.
            let big: Vec<u8> = (0..100_000u32).map(|i| (i % 251) as u8).collect();
            let sent = big.clone();
            let echo = tokio::spawn(async move {
                client.write_all(&sent).await.unwrap();
                client.flush().await.unwrap();
                let mut back = vec![0u8; sent.len()];
                client.read_exact(&mut back).await.unwrap();
                assert!(back == sent, "the echo came back whole");
                client
            });
            let mut got = vec![0u8; big.len()];
            server.read_exact(&mut got).await.unwrap();
            assert!(got == big, "read whole and in order");
            server.write_all(&got).await.unwrap();
            server.flush().await.unwrap();
            let mut client = echo.await.unwrap();
            assert!(idle(&server), "{versions:?}: nothing kept between messages");
            // The client closes: the server reads the end; then it closes too.
            client.shutdown().await.unwrap();
            let mut rest = Vec::new();
            server.read_to_end(&mut rest).await.unwrap();
            assert!(rest.is_empty());
            server.shutdown().await.unwrap();
        }
    }

    #[tokio::test]
    async fn the_server_closing_sends_close_notify() {
        let (mut server, mut client) = pair(&[&rustls::version::TLS13]).await;
        server.write_all(b"bye").await.unwrap();
        server.shutdown().await.unwrap();
        let mut got = Vec::new();
        // A clean end (close_notify), not an unexpected EOF error.
        client.read_to_end(&mut got).await.unwrap();
        assert_eq!(got, b"bye");
    }

    #[tokio::test]
    async fn a_key_update_from_the_client_is_followed() {
        let (mut server, mut client) = pair(&[&rustls::version::TLS13]).await;
        for round in 0..3u8 {
            client.get_mut().1.refresh_traffic_keys().unwrap();
            client.write_all(&[round; 20_000]).await.unwrap();
            client.flush().await.unwrap();
            let mut got = vec![0u8; 20_000];
            server.read_exact(&mut got).await.unwrap();
            assert!(got.iter().all(|&b| b == round));
            server.write_all(&got).await.unwrap();
            server.flush().await.unwrap();
            let mut back = vec![0u8; 20_000];
            client.read_exact(&mut back).await.unwrap();
            assert!(back == got, "round {round}: the answer under the new keys");
        }
    }

    /// A bad handshake message followed by the first byte of another: the
    /// error path (sending the alert) must not trip over the fragment
    /// rustls still points into.
    #[tokio::test]
    async fn a_bad_handshake_message_with_a_trailing_fragment_is_an_error() {
        // One plaintext handshake record: a Finished (type 20) of length 0,
        // then one byte of a next message.
        let (err, _) = refused(&[0x16, 0x03, 0x01, 0x00, 0x05, 0x14, 0x00, 0x00, 0x00, 0x01]).await;
        assert_eq!(err.kind(), io::ErrorKind::InvalidData, "{err}");
    }

    /// A ClientHello sent one byte per record: rustls keeps joining it (all
    /// of it stays in `incoming`, six bytes on the wire per byte of message)
    /// and the stream stops at its handshake bound, as stock rustls's reader
    /// does ("message buffer full"), instead of holding more.
    #[tokio::test]
    async fn a_handshake_message_in_tiny_records_stops_at_the_handshake_bound() {
        let (_pki, config) = server();
        let l = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = l.local_addr().unwrap();
        let client = tokio::spawn(async move {
            let mut c = TcpStream::connect(addr).await.unwrap();
            // A ClientHello header claiming 60,000 bytes, then its body.
            let message = [&[1u8, 0x00, 0xea, 0x60][..], &[0u8; 12_000]].concat();
            let mut wire = Vec::new();
            for b in message {
                wire.extend_from_slice(&[0x16, 0x03, 0x03, 0x00, 0x01, b]);
            }
            assert!(wire.len() > MAX_HANDSHAKE_INCOMING);
            let _ = c.write_all(&wire).await;
            c
        });
        let (tcp, _) = l.accept().await.unwrap();
        let err = TlsStream::accept(config, tcp).await.err().expect("refused");
        assert_eq!(err.kind(), io::ErrorKind::InvalidData, "{err}");
        assert_eq!(err.to_string(), "TLS message larger than allowed");
        drop(client.await.unwrap());
    }

    #[tokio::test]
    async fn garbage_instead_of_a_client_hello_is_an_error() {
        let (err, mut c) = refused(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n").await;
        assert_eq!(err.kind(), io::ErrorKind::InvalidData, "{err}");
        let mut buf = [0u8; 16];
        let n = c.read(&mut buf).await.unwrap_or(0);
        assert!(
            n == 0 || buf[0] == 0x15,
            "an alert or the end, got {:?}",
            &buf[..n]
        );
    }
}
