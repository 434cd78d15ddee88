//! SOCKS5 and HTTP proxy front ends over [`DirectDialer`] (loopback only, no root): curl downloads through
//! each front end, raw SOCKS5 exchanges (auth, UDP ASSOCIATE, BIND, malformed input) and HTTP error replies.
use std::cell::RefCell;
use std::future::Future;
use std::net::SocketAddr;
use std::process::Command;
use std::rc::Rc;
use std::time::Duration;

use paqet::front::dial::DirectDialer;
use paqet::front::http::{self, HttpConfig};
use paqet::front::socks5::{self, Socks5Config};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream, UdpSocket};

const FILE_LEN: usize = 8 << 20;

/// Runs `f` on a current-thread runtime inside a `LocalSet` (as the daemon does).
fn local<F: Future>(f: F) -> F::Output {
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .expect("runtime");
    tokio::task::LocalSet::new().block_on(&rt, f)
}

/// Deterministic pseudo-random file contents (xorshift32).
fn file_bytes() -> Rc<Vec<u8>> {
    let mut x: u32 = 0x9e37_79b9;
    Rc::new(
        (0..FILE_LEN)
            .map(|_| {
                x ^= x << 13;
                x ^= x >> 17;
                x ^= x << 5;
                x as u8
            })
            .collect(),
    )
}

/// A tiny HTTP/1.1 origin: `GET /file` → the file (Connection: close); records every request head.
struct Origin {
    addr: SocketAddr,
    heads: Rc<RefCell<Vec<String>>>,
}

async fn start_origin(file: Rc<Vec<u8>>) -> Origin {
    let l = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = l.local_addr().unwrap();
    let heads: Rc<RefCell<Vec<String>>> = Rc::default();
    let h = heads.clone();
    tokio::task::spawn_local(async move {
        loop {
            let (mut c, _) = l.accept().await.unwrap();
            let file = file.clone();
            let heads = h.clone();
            tokio::task::spawn_local(async move {
                let mut buf = Vec::new();
                let mut chunk = [0u8; 1024];
                while !buf.windows(4).any(|w| w == b"\r\n\r\n") {
                    match c.read(&mut chunk).await {
                        Ok(0) | Err(_) => return,
                        Ok(n) => buf.extend_from_slice(&chunk[..n]),
                    }
                }
                let head = String::from_utf8_lossy(&buf).into_owned();
                let ok = head.starts_with("GET /file ");
                heads.borrow_mut().push(head);
                if ok {
                    let hdr = format!(
                        "HTTP/1.1 200 OK\r\nContent-Length: {}\r\nConnection: close\r\n\r\n",
                        file.len()
                    );
                    let _ = c.write_all(hdr.as_bytes()).await;
                    let _ = c.write_all(&file).await;
                } else {
                    let _ = c.write_all(b"HTTP/1.1 404 Not Found\r\nContent-Length: 0\r\nConnection: close\r\n\r\n").await;
                }
                let _ = c.shutdown().await;
            });
        }
    });
    Origin { addr, heads }
}

async fn start_socks(cfg: Socks5Config) -> SocketAddr {
    let l = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = l.local_addr().unwrap();
    tokio::task::spawn_local(socks5::serve(l, cfg, Rc::new(DirectDialer)));
    addr
}

async fn start_http(cfg: HttpConfig) -> SocketAddr {
    let l = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = l.local_addr().unwrap();
    tokio::task::spawn_local(http::serve(l, cfg, Rc::new(DirectDialer)));
    addr
}

/// Runs curl (off the runtime thread) and returns its stdout; fails the test on a non-zero exit.
async fn curl(args: Vec<String>) -> Vec<u8> {
    let shown = args.join(" ");
    let out = tokio::task::spawn_blocking(move || {
        Command::new("curl")
            .args(["-sS", "--max-time", "120", "--noproxy", ""])
            .args(&args)
            .env_remove("http_proxy")
            .env_remove("https_proxy")
            .env_remove("all_proxy")
            .env_remove("HTTP_PROXY")
            .env_remove("HTTPS_PROXY")
            .env_remove("ALL_PROXY")
            .output()
    })
    .await
    .unwrap()
    .expect("curl must be installed to run the front-end tests");
    assert!(
        out.status.success(),
        "curl {shown} failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    out.stdout
}

fn assert_same(got: &[u8], want: &[u8]) {
    assert_eq!(got.len(), want.len(), "length differs");
    assert!(got == want, "content differs");
}

async fn read_n(c: &mut TcpStream, n: usize) -> Vec<u8> {
    let mut v = vec![0u8; n];
    c.read_exact(&mut v).await.unwrap();
    v
}

/// Reads to EOF (the server closed), returning what came before it.
async fn read_to_eof(c: &mut TcpStream) -> Vec<u8> {
    let mut v = Vec::new();
    let _ = c.read_to_end(&mut v).await;
    v
}

#[test]
fn socks5_connect_carries_curl_download() {
    local(async {
        let file = file_bytes();
        let origin = start_origin(file.clone()).await;
        let s = start_socks(Socks5Config::default()).await;
        let got = curl(vec![
            "--socks5-hostname".into(),
            s.to_string(),
            format!("http://{}/file", origin.addr),
        ])
        .await;
        assert_same(&got, &file);
    });
}

#[test]
fn http_proxy_absolute_uri_carries_curl_download() {
    local(async {
        let file = file_bytes();
        let origin = start_origin(file.clone()).await;
        let h = start_http(HttpConfig::default()).await;
        let got = curl(vec![
            "-x".into(),
            format!("http://{h}"),
            format!("http://{}/file", origin.addr),
        ])
        .await;
        assert_same(&got, &file);
        let heads = origin.heads.borrow();
        assert_eq!(heads.len(), 1);
        assert!(
            heads[0].starts_with("GET /file HTTP/1.1\r\n"),
            "origin saw {:?}",
            heads[0]
        );
        assert!(
            !heads[0].to_ascii_lowercase().contains("proxy-"),
            "origin saw {:?}",
            heads[0]
        );
        assert!(
            heads[0].contains("\r\nConnection: close\r\n"),
            "origin saw {:?}",
            heads[0]
        );
    });
}

#[test]
fn http_proxy_connect_carries_curl_download() {
    local(async {
        let file = file_bytes();
        let origin = start_origin(file.clone()).await;
        let h = start_http(HttpConfig::default()).await;
        let got = curl(vec![
            "-p".into(),
            "-x".into(),
            format!("http://{h}"),
            format!("http://{}/file", origin.addr),
        ])
        .await;
        assert_same(&got, &file);
        // Through CONNECT the origin sees curl's own origin-form request.
        assert!(origin.heads.borrow()[0].starts_with("GET /file HTTP/1.1\r\n"));
    });
}

#[test]
fn http_proxy_auth_and_error_replies() {
    local(async {
        let file = file_bytes();
        let origin = start_origin(file.clone()).await;
        let h = start_http(HttpConfig {
            username: "bob".into(),
            password: "pw".into(),
        })
        .await;
        // Good credentials through curl.
        let got = curl(vec![
            "-x".into(),
            format!("http://{h}"),
            "-U".into(),
            "bob:pw".into(),
            format!("http://{}/file", origin.addr),
        ])
        .await;
        assert_same(&got, &file);

        // Sends `req`, then (for the error cases) half-closes, and returns everything up to EOF.
        let exchange_with = move |req: Vec<u8>, half_close: bool| async move {
            let mut c = TcpStream::connect(h).await.unwrap();
            c.write_all(&req).await.unwrap();
            if half_close {
                c.shutdown().await.unwrap();
            }
            String::from_utf8_lossy(&read_to_eof(&mut c).await).into_owned()
        };
        let exchange = move |req: Vec<u8>| exchange_with(req, true);
        let target = format!("http://{}/file", origin.addr);
        // Missing and wrong credentials → 407 with a challenge.
        let r = exchange(format!("GET {target} HTTP/1.1\r\nHost: x\r\n\r\n").into_bytes()).await;
        assert!(r.starts_with("HTTP/1.1 407 "), "{r}");
        assert!(r.contains("Proxy-Authenticate: Basic"), "{r}");
        let r = exchange(
            format!("GET {target} HTTP/1.1\r\nProxy-Authorization: Basic Ym9iOng=\r\n\r\n")
                .into_bytes(),
        )
        .await;
        assert!(r.starts_with("HTTP/1.1 407 "), "{r}");
        // Good credentials by hand (base64 "bob:pw" = Ym9iOnB3).
        let auth = "Proxy-Authorization: Basic Ym9iOnB3\r\n";
        // Malformed request line → 400; https absolute URI → 400; oversized head → 431.
        let r = exchange(b"garbage\r\n\r\n".to_vec()).await;
        assert!(r.starts_with("HTTP/1.1 400 "), "{r}");
        let r =
            exchange(format!("GET https://{}/ HTTP/1.1\r\n{auth}\r\n", origin.addr).into_bytes())
                .await;
        assert!(r.starts_with("HTTP/1.1 400 "), "{r}");
        let mut big = format!("GET {target} HTTP/1.1\r\n{auth}X-Big: ").into_bytes();
        big.extend(std::iter::repeat_n(b'a', 70 * 1024));
        let r = exchange(big).await;
        assert!(r.starts_with("HTTP/1.1 431 "), "{r}");
        // Unreachable target → 502.
        let closed = TcpListener::bind("127.0.0.1:0")
            .await
            .unwrap()
            .local_addr()
            .unwrap();
        let r = exchange(format!("CONNECT {closed} HTTP/1.1\r\n{auth}\r\n").into_bytes()).await;
        assert!(r.starts_with("HTTP/1.1 502 "), "{r}");
        // Raw bytes, no head end, then close → no reply, no panic; the proxy still serves.
        let r = exchange(vec![0xff, 0x00, 0x13]).await;
        assert!(r.is_empty(), "{r}");
        let r = exchange_with(
            format!("GET {target} HTTP/1.1\r\n{auth}\r\n").into_bytes(),
            false,
        )
        .await;
        assert!(
            r.starts_with("HTTP/1.1 200 OK\r\n"),
            "{}",
            &r[..r.len().min(200)]
        );
    });
}

#[test]
fn socks5_userpass_good_and_bad() {
    local(async {
        let file = file_bytes();
        let origin = start_origin(file.clone()).await;
        let s = start_socks(Socks5Config {
            username: "alice".into(),
            password: "s3cret".into(),
        })
        .await;

        // Good credentials, then CONNECT by hand; the reply carries the SOCKS connection's local address.
        let mut c = TcpStream::connect(s).await.unwrap();
        c.write_all(&[5, 2, 0, 2]).await.unwrap();
        assert_eq!(read_n(&mut c, 2).await, [5, 2]);
        c.write_all(&[[1u8, 5].as_slice(), b"alice", &[6], b"s3cret"].concat())
            .await
            .unwrap();
        assert_eq!(read_n(&mut c, 2).await, [1, 0]);
        let port = origin.addr.port().to_be_bytes();
        c.write_all(&[5, 1, 0, 1, 127, 0, 0, 1, port[0], port[1]])
            .await
            .unwrap();
        let sp = s.port().to_be_bytes();
        assert_eq!(
            read_n(&mut c, 10).await,
            [5, 0, 0, 1, 127, 0, 0, 1, sp[0], sp[1]]
        );
        c.write_all(b"GET /file HTTP/1.1\r\nHost: x\r\n\r\n")
            .await
            .unwrap();
        let resp = read_to_eof(&mut c).await;
        assert!(resp.starts_with(b"HTTP/1.1 200 OK\r\n"));
        assert!(resp.ends_with(&file[file.len() - 4096..]));

        // Bad password → 01 01 and the connection is closed.
        let mut c = TcpStream::connect(s).await.unwrap();
        c.write_all(&[5, 1, 2]).await.unwrap();
        assert_eq!(read_n(&mut c, 2).await, [5, 2]);
        c.write_all(&[[1u8, 5].as_slice(), b"alice", &[5], b"wrong"].concat())
            .await
            .unwrap();
        assert_eq!(read_to_eof(&mut c).await, [1, 1]);

        // No-auth offered to a server requiring user/pass → 05 FF.
        let mut c = TcpStream::connect(s).await.unwrap();
        c.write_all(&[5, 1, 0]).await.unwrap();
        assert_eq!(read_to_eof(&mut c).await, [5, 0xff]);

        // curl with credentials works end to end.
        let got = curl(vec![
            "-x".into(),
            format!("socks5h://alice:s3cret@{s}"),
            format!("http://{}/file", origin.addr),
        ])
        .await;
        assert_same(&got, &file);
    });
}

/// Greets a no-auth SOCKS5 server.
async fn greet(s: SocketAddr) -> TcpStream {
    let mut c = TcpStream::connect(s).await.unwrap();
    c.write_all(&[5, 1, 0]).await.unwrap();
    assert_eq!(read_n(&mut c, 2).await, [5, 0]);
    c
}

#[test]
fn socks5_bind_and_malformed_requests() {
    local(async {
        let s = start_socks(Socks5Config::default()).await;
        let zero_reply = |rep: u8| vec![5, rep, 0, 1, 0, 0, 0, 0, 0, 0];

        // BIND → 07.
        let mut c = greet(s).await;
        c.write_all(&[5, 2, 0, 1, 127, 0, 0, 1, 0, 80])
            .await
            .unwrap();
        assert_eq!(read_to_eof(&mut c).await, zero_reply(7));
        // Unknown command → 07.
        let mut c = greet(s).await;
        c.write_all(&[5, 9, 0, 1, 127, 0, 0, 1, 0, 80])
            .await
            .unwrap();
        assert_eq!(read_to_eof(&mut c).await, zero_reply(7));
        // Unknown ATYP → 08.
        let mut c = greet(s).await;
        c.write_all(&[5, 1, 0, 7, 1, 2, 3, 4]).await.unwrap();
        assert_eq!(read_to_eof(&mut c).await, zero_reply(8));
        // CONNECT to a closed port → 05 01.
        let closed = TcpListener::bind("127.0.0.1:0")
            .await
            .unwrap()
            .local_addr()
            .unwrap()
            .port()
            .to_be_bytes();
        let mut c = greet(s).await;
        c.write_all(&[5, 1, 0, 1, 127, 0, 0, 1, closed[0], closed[1]])
            .await
            .unwrap();
        assert_eq!(read_to_eof(&mut c).await, zero_reply(1));
        // Wrong version in the greeting → closed without a reply.
        let mut c = TcpStream::connect(s).await.unwrap();
        c.write_all(&[4, 1, 0]).await.unwrap();
        assert!(read_to_eof(&mut c).await.is_empty());
        // Zero methods / only unknown methods → 05 FF.
        for greeting in [&[5u8, 0][..], &[5, 2, 0x80, 0x02]] {
            let mut c = TcpStream::connect(s).await.unwrap();
            c.write_all(greeting).await.unwrap();
            assert_eq!(
                read_to_eof(&mut c).await,
                [5, 0xff],
                "greeting {greeting:?}"
            );
        }
        // Wrong version in the request → closed after the method reply only.
        let mut c = greet(s).await;
        c.write_all(&[4, 1, 0, 1, 127, 0, 0, 1, 0, 80])
            .await
            .unwrap();
        assert!(read_to_eof(&mut c).await.is_empty());
        // Truncated greeting / request, then close → no reply beyond the method; no panic.
        let mut c = TcpStream::connect(s).await.unwrap();
        c.write_all(&[5, 3, 0]).await.unwrap();
        c.shutdown().await.unwrap();
        assert!(read_to_eof(&mut c).await.is_empty());
        let mut c = greet(s).await;
        c.write_all(&[5, 1, 0, 3, 50, b'a', b'b']).await.unwrap();
        c.shutdown().await.unwrap();
        assert!(read_to_eof(&mut c).await.is_empty());
        // Pseudo-random junk greetings: whatever the reply, the server keeps serving.
        let mut x: u32 = 12345;
        for _ in 0..64 {
            let junk: Vec<u8> = (0..24)
                .map(|_| {
                    x = x.wrapping_mul(1_103_515_245).wrapping_add(12345);
                    (x >> 16) as u8
                })
                .collect();
            let mut c = TcpStream::connect(s).await.unwrap();
            let _ = c.write_all(&junk).await;
            let _ = c.shutdown().await;
            let _ = read_to_eof(&mut c).await;
        }
        let mut c = greet(s).await;
        c.write_all(&[5, 2, 0, 1, 0, 0, 0, 0, 0, 0]).await.unwrap();
        assert_eq!(read_to_eof(&mut c).await, zero_reply(7));
    });
}

/// A UDP echo server that also records what it received.
async fn start_echo() -> (SocketAddr, Rc<RefCell<Vec<Vec<u8>>>>) {
    let sock = UdpSocket::bind("127.0.0.1:0").await.unwrap();
    let addr = sock.local_addr().unwrap();
    let seen: Rc<RefCell<Vec<Vec<u8>>>> = Rc::default();
    let s2 = seen.clone();
    tokio::task::spawn_local(async move {
        let mut buf = vec![0u8; 65536];
        loop {
            let (n, from) = sock.recv_from(&mut buf).await.unwrap();
            s2.borrow_mut().push(buf[..n].to_vec());
            let _ = sock.send_to(&buf[..n], from).await;
        }
    });
    (addr, seen)
}

#[test]
fn socks5_udp_associate_round_trip() {
    local(async {
        let (echo, seen) = start_echo().await;
        let s = start_socks(Socks5Config::default()).await;
        let client = UdpSocket::bind("127.0.0.1:0").await.unwrap();

        // ASSOCIATE with an unspecified address: the source port is learned from the first datagram.
        let mut ctrl = greet(s).await;
        ctrl.write_all(&[5, 3, 0, 1, 0, 0, 0, 0, 0, 0])
            .await
            .unwrap();
        let r = read_n(&mut ctrl, 10).await;
        assert_eq!(&r[..4], &[5, 0, 0, 1]);
        assert_eq!(
            &r[4..8],
            &[127, 0, 0, 1],
            "relay bound on the control connection's local IP"
        );
        let relay = SocketAddr::from(([127, 0, 0, 1], u16::from_be_bytes([r[8], r[9]])));
        assert_ne!(relay.port(), 0);

        let ep = echo.port().to_be_bytes();
        let hdr = [0u8, 0, 0, 1, 127, 0, 0, 1, ep[0], ep[1]];
        let mut buf = vec![0u8; 8192];

        client
            .send_to(&[&hdr[..], b"hello"].concat(), relay)
            .await
            .unwrap();
        let n = client.recv(&mut buf).await.unwrap();
        assert_eq!(
            &buf[..n],
            [&hdr[..], b"hello"].concat(),
            "reply wrapped with the request's header"
        );

        // Dropped: FRAG≠0, payload over 4096 bytes, a datagram from another source port.
        let mut frag = [&hdr[..], b"fragment"].concat();
        frag[2] = 1;
        client.send_to(&frag, relay).await.unwrap();
        client
            .send_to(&[&hdr[..], &vec![7u8; 4097]].concat(), relay)
            .await
            .unwrap();
        let intruder = UdpSocket::bind("127.0.0.1:0").await.unwrap();
        intruder
            .send_to(&[&hdr[..], b"intruder"].concat(), relay)
            .await
            .unwrap();
        // Accepted again: exactly 4096 bytes, then a domain-addressed datagram re-wrapped with its own header.
        let max = vec![9u8; 4096];
        client
            .send_to(&[&hdr[..], &max].concat(), relay)
            .await
            .unwrap();
        let n = client.recv(&mut buf).await.unwrap();
        assert_eq!(&buf[..n], [&hdr[..], &max].concat());

        let (echo2, seen2) = start_echo().await;
        let ep2 = echo2.port().to_be_bytes();
        let dhdr = [&[0u8, 0, 0, 3, 9][..], b"127.0.0.1", &ep2].concat();
        client
            .send_to(&[&dhdr[..], b"by-name"].concat(), relay)
            .await
            .unwrap();
        let n = client.recv(&mut buf).await.unwrap();
        assert_eq!(&buf[..n], [&dhdr[..], b"by-name"].concat());

        assert_eq!(*seen.borrow(), vec![b"hello".to_vec(), max.clone()]);
        assert_eq!(*seen2.borrow(), vec![b"by-name".to_vec()]);
        // Two flows (one per target), each a live channel with its idle timer (`paqet_socks5_udp_channels`).
        assert_eq!(socks5::udp_channels(), 2);

        // Closing the control connection ends the association: the relay port is released.
        drop(ctrl);
        let mut released = false;
        for _ in 0..400 {
            if std::net::UdpSocket::bind(relay).is_ok() {
                released = true;
                break;
            }
            tokio::time::sleep(Duration::from_millis(25)).await;
        }
        assert!(
            released,
            "relay socket {relay} still bound after the control connection closed"
        );
        assert_eq!(
            socks5::udp_channels(),
            0,
            "the association's channels outlived it"
        );
    });
}
