//! A minimal blocking HTTP/1.1 client for tests: requests with a `Content-Length` body,
//! responses delimited by `Content-Length`, chunked encoding or the end of the connection.
//!
//! [`request`] and [`try_request`] open one connection per request (`Connection: close`);
//! a [`Connection`] keeps one open for many requests, pipelined or not. A `Host` header is
//! added unless the caller passes one. Responses are `(status, body)`.

use std::io::{self, BufRead, BufReader, Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::time::Duration;

/// How long [`request`] and [`try_request`] wait for an answer.
pub const REQUEST_TIMEOUT: Duration = Duration::from_secs(10);

/// How long a [`Connection`] waits for a read or a write.
pub const CONNECTION_TIMEOUT: Duration = Duration::from_secs(30);

/// One request on a fresh connection (`Connection: close`); the status and the body
/// (de-chunked), or the I/O error (a writer sees those when the server is killed under it).
///
/// A server may answer (e.g. 413) before it has read a large body: a failed write of the body
/// is ignored then, and the answer read.
///
/// # Errors
/// When the connection cannot be made, the head cannot be written, or no complete response
/// arrives.
pub fn try_request(
    addr: SocketAddr,
    method: &str,
    path: &str,
    headers: &[(&str, &str)],
    body: &[u8],
) -> io::Result<(u16, Vec<u8>)> {
    let stream = TcpStream::connect(addr)?;
    stream.set_read_timeout(Some(REQUEST_TIMEOUT))?;
    stream.set_write_timeout(Some(REQUEST_TIMEOUT))?;
    let mut connection = Connection::new(stream, &addr.to_string())?;
    let mut all = headers.to_vec();
    all.push(("Connection", "close"));
    let head = head(method, path, &connection.host, &all, body.len());
    connection.reader.get_mut().write_all(&head)?;
    let _ = connection.reader.get_mut().write_all(body);
    connection.read_response()
}

/// [`try_request`] that panics on an I/O error.
///
/// # Panics
/// When [`try_request`] fails.
pub fn request(
    addr: SocketAddr,
    method: &str,
    path: &str,
    headers: &[(&str, &str)],
    body: &[u8],
) -> (u16, Vec<u8>) {
    try_request(addr, method, path, headers, body)
        .unwrap_or_else(|e| panic!("{method} {path} to {addr}: {e}"))
}

/// A keep-alive HTTP/1.1 connection.
#[derive(Debug)]
pub struct Connection {
    reader: BufReader<TcpStream>,
    host: String,
}

impl Connection {
    /// Connects to `addr` (no delay, [`CONNECTION_TIMEOUT`] for reads and writes).
    ///
    /// # Errors
    /// When the connection cannot be made.
    pub fn open(addr: SocketAddr) -> io::Result<Connection> {
        let stream = TcpStream::connect(addr)?;
        stream.set_read_timeout(Some(CONNECTION_TIMEOUT))?;
        stream.set_write_timeout(Some(CONNECTION_TIMEOUT))?;
        Connection::new(stream, &addr.to_string())
    }

    /// Speaks HTTP over `stream`, already connected (e.g. from inside a network namespace),
    /// with `host` as the `Host` header. Sets no delay; timeouts are the caller's.
    ///
    /// # Errors
    /// When `TCP_NODELAY` cannot be set.
    pub fn new(stream: TcpStream, host: &str) -> io::Result<Connection> {
        stream.set_nodelay(true)?;
        Ok(Connection {
            reader: BufReader::new(stream),
            host: host.to_owned(),
        })
    }

    /// One request, one response.
    ///
    /// # Errors
    /// When writing fails, the server closes before a complete response, or the response is
    /// not HTTP.
    pub fn request(
        &mut self,
        method: &str,
        path: &str,
        headers: &[(&str, &str)],
        body: &[u8],
    ) -> io::Result<(u16, Vec<u8>)> {
        let mut buf = head(method, path, &self.host, headers, body.len());
        buf.extend_from_slice(body);
        self.reader.get_mut().write_all(&buf)?;
        self.read_response()
    }

    /// `method` on every `(path, body)`, pipelined in windows of 64 so that neither side's
    /// buffers fill; the responses in order.
    ///
    /// # Errors
    /// As [`Connection::request`]; a pipeline is not retried.
    pub fn pipeline(
        &mut self,
        method: &str,
        requests: &[(String, Vec<u8>)],
    ) -> io::Result<Vec<(u16, Vec<u8>)>> {
        const WINDOW: usize = 64;
        let mut responses = Vec::with_capacity(requests.len());
        for window in requests.chunks(WINDOW) {
            let mut buf = Vec::new();
            for (path, body) in window {
                buf.extend(head(method, path, &self.host, &[], body.len()));
                buf.extend_from_slice(body);
            }
            self.reader.get_mut().write_all(&buf)?;
            for _ in window {
                responses.push(self.read_response()?);
            }
        }
        Ok(responses)
    }

    fn read_line(&mut self) -> io::Result<String> {
        let mut line = String::new();
        if self.reader.read_line(&mut line)? == 0 {
            return Err(io::Error::new(
                io::ErrorKind::UnexpectedEof,
                "connection closed",
            ));
        }
        Ok(line.trim_end().to_owned())
    }

    fn read_response(&mut self) -> io::Result<(u16, Vec<u8>)> {
        let status_line = self.read_line()?;
        let status: u16 = status_line
            .split_whitespace()
            .nth(1)
            .and_then(|s| s.parse().ok())
            .ok_or_else(|| io::Error::other(format!("bad status line {status_line:?}")))?;
        let mut length = None;
        let mut chunked = false;
        loop {
            let line = self.read_line()?;
            if line.is_empty() {
                break;
            }
            let Some((name, value)) = line.split_once(':') else {
                continue;
            };
            let value = value.trim();
            if name.eq_ignore_ascii_case("content-length") {
                length =
                    Some(value.parse::<usize>().map_err(|e| {
                        io::Error::other(format!("bad content-length {value:?}: {e}"))
                    })?);
            } else if name.eq_ignore_ascii_case("transfer-encoding") {
                chunked = value.eq_ignore_ascii_case("chunked");
            }
        }
        let mut body = Vec::new();
        if (100..200).contains(&status) || status == 204 || status == 304 {
            // No body, whatever the headers say.
        } else if chunked {
            loop {
                let size_line = self.read_line()?;
                let size = usize::from_str_radix(size_line.split(';').next().unwrap_or(""), 16)
                    .map_err(|e| io::Error::other(format!("bad chunk size {size_line:?}: {e}")))?;
                if size == 0 {
                    // Trailers, then the empty line.
                    while !self.read_line()?.is_empty() {}
                    break;
                }
                let start = body.len();
                body.resize(start + size, 0);
                self.reader.read_exact(&mut body[start..])?;
                self.read_line()?;
            }
        } else if let Some(length) = length {
            body.resize(length, 0);
            self.reader.read_exact(&mut body)?;
        } else {
            // Delimited by the end of the connection.
            self.reader.read_to_end(&mut body)?;
        }
        Ok((status, body))
    }
}

/// The request line and headers, `Host` first unless `headers` has one.
fn head(method: &str, path: &str, host: &str, headers: &[(&str, &str)], len: usize) -> Vec<u8> {
    let mut head = format!("{method} {path} HTTP/1.1\r\n");
    if !headers.iter().any(|(k, _)| k.eq_ignore_ascii_case("host")) {
        head.push_str(&format!("Host: {host}\r\n"));
    }
    for (k, v) in headers {
        head.push_str(&format!("{k}: {v}\r\n"));
    }
    head.push_str(&format!("Content-Length: {len}\r\n\r\n"));
    head.into_bytes()
}

#[cfg(test)]
mod tests {
    use std::net::{Ipv4Addr, TcpListener};
    use std::thread;

    use super::*;

    /// A server on the loopback that reads one request head per answer in `answers` and
    /// replies with it; returns its address and the heads it read.
    fn serve(answers: Vec<&'static [u8]>) -> (SocketAddr, thread::JoinHandle<Vec<String>>) {
        let listener =
            TcpListener::bind((Ipv4Addr::LOCALHOST, 0)).unwrap_or_else(|e| panic!("{e}"));
        let addr = listener.local_addr().unwrap_or_else(|e| panic!("{e}"));
        let handle = thread::spawn(move || {
            let (stream, _) = listener.accept().unwrap_or_else(|e| panic!("{e}"));
            stream
                .set_read_timeout(Some(Duration::from_secs(10)))
                .unwrap_or_else(|e| panic!("{e}"));
            let mut reader = BufReader::new(stream);
            let mut heads = Vec::new();
            for answer in answers {
                let mut head = String::new();
                let mut length = 0;
                loop {
                    let mut line = String::new();
                    reader
                        .read_line(&mut line)
                        .unwrap_or_else(|e| panic!("{e}"));
                    if let Some(v) = line.strip_prefix("Content-Length: ") {
                        length = v.trim().parse().unwrap_or_else(|e| panic!("{e}"));
                    }
                    head.push_str(&line);
                    if line == "\r\n" {
                        break;
                    }
                }
                let mut body = vec![0; length];
                reader
                    .read_exact(&mut body)
                    .unwrap_or_else(|e| panic!("{e}"));
                heads.push(head);
                reader
                    .get_mut()
                    .write_all(answer)
                    .unwrap_or_else(|e| panic!("{e}"));
            }
            heads
        });
        (addr, handle)
    }

    #[test]
    fn one_shot_request_reads_length_chunked_and_close_delimited_bodies() {
        for (answer, body) in [
            (&b"HTTP/1.1 200 OK\r\nContent-Length: 5\r\n\r\nhello"[..], &b"hello"[..]),
            (
                b"HTTP/1.1 201 Created\r\nTransfer-Encoding: chunked\r\n\r\n3\r\nabc\r\n2;x=y\r\nde\r\n0\r\n\r\n",
                b"abcde",
            ),
            (b"HTTP/1.0 404 Not Found\r\n\r\ngone", b"gone"),
        ] {
            let (addr, server) = serve(vec![answer]);
            let (status, got) = request(addr, "PUT", "/k", &[("X-A", "1")], b"value");
            assert!(matches!(status, 200 | 201 | 404), "{status}");
            assert_eq!(got, body);
            let heads = server.join().unwrap_or_else(|_| panic!("server panicked"));
            assert!(heads[0].starts_with("PUT /k HTTP/1.1\r\nHost: 127.0.0.1:"), "{heads:?}");
            assert!(heads[0].contains("X-A: 1\r\nConnection: close\r\nContent-Length: 5\r\n"));
        }
    }

    #[test]
    fn keep_alive_connection_pipelines_and_keeps_a_given_host() {
        let (addr, server) = serve(vec![
            b"HTTP/1.1 204 No Content\r\n\r\n",
            b"HTTP/1.1 200 OK\r\nContent-Length: 1\r\n\r\na",
            b"HTTP/1.1 200 OK\r\nContent-Length: 1\r\n\r\nb",
        ]);
        let mut c = Connection::open(addr).unwrap_or_else(|e| panic!("{e}"));
        let first = c.request("GET", "/x", &[("Host", "chorus.test")], b"");
        assert_eq!(first.unwrap_or_else(|e| panic!("{e}")), (204, vec![]));
        let requests = vec![("/a".to_owned(), b"1".to_vec()), ("/b".to_owned(), vec![])];
        let answers = c
            .pipeline("PUT", &requests)
            .unwrap_or_else(|e| panic!("{e}"));
        assert_eq!(answers, [(200, b"a".to_vec()), (200, b"b".to_vec())]);
        let heads = server.join().unwrap_or_else(|_| panic!("server panicked"));
        assert_eq!(
            heads[0],
            "GET /x HTTP/1.1\r\nHost: chorus.test\r\nContent-Length: 0\r\n\r\n"
        );
        assert!(heads[2].starts_with("PUT /b HTTP/1.1\r\n"), "{heads:?}");
    }

    #[test]
    fn a_server_that_closes_without_an_answer_is_an_error() {
        let (addr, server) = serve(vec![b""]);
        assert!(try_request(addr, "GET", "/", &[], b"").is_err());
        server.join().unwrap_or_else(|_| panic!("server panicked"));
    }
}
