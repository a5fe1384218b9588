//! The buffering proxy that docs/operations.md recommends in front of
//! respawn, tested: nginx reads each request head whole before it opens a
//! connection to a worker, so clients that trickle or stay silent hold an
//! nginx connection (cheap, event-driven), never a worker.
//!
//! Needs nginx (`apt-get install nginx-light`); without it the test is
//! skipped, loudly and in `make test`'s summary (CI has nginx, and fails
//! if it skips).

use respawn_tests::*;
use std::io::Write;
use std::net::{TcpListener, TcpStream};
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

/// The configuration of docs/operations.md ("A buffering proxy in front"),
/// with the paths a test needs: everything under `prefix`, one process.
fn nginx_conf(listen: u16, upstream: std::net::SocketAddr) -> String {
    format!(
        r#"
master_process off;
pid nginx.pid;
error_log stderr warn;
events {{ worker_connections 1024; }}
http {{
    access_log off;
    client_body_temp_path tmp; proxy_temp_path tmp; fastcgi_temp_path tmp;
    uwsgi_temp_path tmp; scgi_temp_path tmp;

    upstream respawn {{
        server {upstream};
    }}
    server {{
        listen 127.0.0.1:{listen};
        # A client has this long to send its request head, and its body.
        client_header_timeout 10s;
        client_body_timeout 10s;
        location / {{
            proxy_pass http://respawn;
            # Read the whole request before a worker is involved, and the
            # whole answer before the client is fed: a worker serves at
            # memory speed, whatever the client's speed.
            proxy_request_buffering on;
            proxy_buffering on;
            proxy_set_header Host $host;
            proxy_set_header X-Forwarded-For $proxy_add_x_forwarded_for;
        }}
    }}
}}
"#
    )
}

/// nginx, killed on drop.
struct Nginx(Child);

impl Drop for Nginx {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

fn start_nginx(nginx: &Path, prefix: &Path, conf: &str) -> Nginx {
    std::fs::create_dir_all(prefix.join("tmp")).unwrap();
    std::fs::write(prefix.join("nginx.conf"), conf).unwrap();
    let child = Command::new(nginx)
        .arg("-p")
        .arg(prefix)
        .args(["-c", "nginx.conf", "-g", "daemon off;"])
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .spawn()
        .expect("starting nginx");
    Nginx(child)
}

/// GET through the proxy, asking it to close after the answer (nginx keeps
/// a client's connection open otherwise, and the harness reads to the end).
fn get_via(proxy: std::net::SocketAddr, path: &str) -> std::io::Result<Response> {
    let mut conn = TcpStream::connect(proxy)?;
    conn.set_read_timeout(Some(PATIENCE))?;
    write!(
        conn,
        "GET {path} HTTP/1.1\r\nHost: respawn\r\nConnection: close\r\n\r\n"
    )?;
    let mut answer = String::new();
    std::io::Read::read_to_string(&mut conn, &mut answer)?;
    let status = answer.get(9..12).and_then(|s| s.parse().ok()).unwrap_or(0);
    let body = answer.split_once("\r\n\r\n").map_or("", |(_, b)| b).to_owned();
    Ok(Response { status, body })
}

#[test]
fn a_buffering_proxy_keeps_slow_clients_off_the_workers() {
    if !require(
        "a_buffering_proxy_keeps_slow_clients_off_the_workers",
        Need::Nginx,
    ) {
        return;
    }
    let nginx = nginx().expect("nginx, found a moment ago");
    let respawn = Respawn::with_workers(2, &[]);
    let port = TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let prefix = std::env::temp_dir().join(format!("respawn-proxy-test-{}", std::process::id()));
    let _nginx = start_nginx(&nginx, &prefix, &nginx_conf(port, respawn.addr));
    let proxy = format!("127.0.0.1:{port}").parse().unwrap();
    assert!(
        wait_until(PATIENCE, || get_via(proxy, "/").is_ok_and(|r| r.status == 200)),
        "nginx does not answer on {proxy}"
    );

    // Twenty clients that send half a request head and stop, and twenty
    // that send nothing: straight to two workers, they would hold both for
    // the head deadline, again and again.
    let mut held = Vec::new();
    for i in 0..40 {
        let mut conn = TcpStream::connect(proxy).unwrap();
        if i % 2 == 0 {
            conn.write_all(b"GET /sleep/1 HTTP/1.1\r\nHost: x\r\n").unwrap();
        }
        held.push(conn);
    }
    let asked = Instant::now();
    let answer = get_via(proxy, "/").expect("an answer through the proxy");
    let took = asked.elapsed();
    assert_eq!(answer.status, 200);
    assert!(answer.body.starts_with("handle by child "), "{answer:?}");
    // The head deadline is 5 s: a worker held by a slow client would make
    // this wait at least that long.
    assert!(
        took < Duration::from_secs(4),
        "the answer took {took:?}: a slow client held a worker\n{}",
        respawn.dump()
    );
    assert_eq!(
        respawn.count_log("dropped a slow connection"),
        0,
        "no slow connection reached a worker\n{}",
        respawn.dump()
    );
    drop(held);
    let _ = std::fs::remove_dir_all(&prefix);
}
