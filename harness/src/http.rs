//! One HTTP/1.0 GET, enough to see that a pod's web server answers through
//! a hostPort or the pod network (busybox httpd in the CRI runs).
use std::io::{Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::time::Duration;

use anyhow::{bail, Context, Result};

/// GETs `path` from `server` in the calling thread's netns; the body of a
/// 200 answer.
pub fn http_get(server: SocketAddr, path: &str, connect_timeout: Duration) -> Result<String> {
    let mut s = TcpStream::connect_timeout(&server, connect_timeout)
        .with_context(|| format!("connecting to {server}"))?;
    s.set_read_timeout(Some(Duration::from_secs(5)))?;
    s.write_all(format!("GET {path} HTTP/1.0\r\nHost: pod\r\n\r\n").as_bytes())
        .with_context(|| format!("sending to {server}"))?;
    let mut text = String::new();
    s.read_to_string(&mut text)
        .with_context(|| format!("reading from {server}"))?;
    let Some((head, body)) = text.split_once("\r\n\r\n") else {
        bail!("no HTTP response from {server}: {text:?}");
    };
    if !head.starts_with("HTTP/1.") || !head.contains(" 200 ") {
        bail!("{server} answered {:?}", head.lines().next().unwrap_or(""));
    }
    Ok(body.to_string())
}
