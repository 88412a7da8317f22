//! A minimal WebSocket client for load generation: one read buffer, frames parsed in place.
//!
//! Written by hand rather than taken from a library because the generator must stay far
//! cheaper than the server it measures: server frames are never masked, so parsing is a
//! few comparisons, and one `read` returns many frames. Client frames are masked (RFC 6455
//! §5.3) and rare (connect, subscribe, pong).

use std::net::{IpAddr, SocketAddr};

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpSocket, TcpStream};

pub struct WsConn {
    stream: TcpStream,
    buf: Vec<u8>,
    start: usize,
    end: usize,
    mask: u32,
}

/// A complete frame's opcode and the range of its payload in the connection's buffer.
pub struct FrameRef {
    pub opcode: u8,
    start: usize,
    end: usize,
}

pub const OP_TEXT: u8 = 0x1;
pub const OP_CLOSE: u8 = 0x8;

impl WsConn {
    /// Connects from `source` (a 127.0.0.x address spreads ephemeral ports) and upgrades.
    pub async fn connect(
        addr: SocketAddr,
        source: IpAddr,
        path: &str,
        rcvbuf: Option<u32>,
    ) -> std::io::Result<WsConn> {
        let socket = TcpSocket::new_v4()?;
        socket.bind(SocketAddr::new(source, 0))?;
        if let Some(size) = rcvbuf {
            socket.set_recv_buffer_size(size)?;
        }
        let mut stream = socket.connect(addr).await?;
        stream.set_nodelay(true)?;
        let request = format!(
            "GET {path} HTTP/1.1\r\nHost: {addr}\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n\
             Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Version: 13\r\n\
             Sec-WebSocket-Protocol: sidecast.v1\r\n\r\n"
        );
        stream.write_all(request.as_bytes()).await?;
        let mut conn = WsConn {
            stream,
            buf: vec![0; 4096],
            start: 0,
            end: 0,
            mask: rand::random(),
        };
        loop {
            if let Some(pos) = conn.buf[..conn.end]
                .windows(4)
                .position(|w| w == b"\r\n\r\n")
            {
                if !conn.buf.starts_with(b"HTTP/1.1 101") {
                    let head = String::from_utf8_lossy(&conn.buf[..pos]).into_owned();
                    return Err(std::io::Error::other(format!("upgrade refused: {head}")));
                }
                conn.start = pos + 4;
                return Ok(conn);
            }
            conn.fill().await?;
        }
    }

    async fn fill(&mut self) -> std::io::Result<()> {
        if self.start > 0 && self.start == self.end {
            self.start = 0;
            self.end = 0;
        }
        if self.end == self.buf.len() {
            if self.start > 0 {
                self.buf.copy_within(self.start..self.end, 0);
                self.end -= self.start;
                self.start = 0;
            } else {
                self.buf.resize(self.buf.len() * 2, 0);
            }
        }
        let n = self.stream.read(&mut self.buf[self.end..]).await?;
        if n == 0 {
            return Err(std::io::ErrorKind::UnexpectedEof.into());
        }
        self.end += n;
        Ok(())
    }

    /// The next complete frame, reading only when the buffer holds none.
    pub async fn next(&mut self) -> std::io::Result<FrameRef> {
        loop {
            if let Some(frame) = self.parse() {
                return Ok(frame);
            }
            self.fill().await?;
        }
    }

    /// The next frame if one is already buffered.
    pub fn parse(&mut self) -> Option<FrameRef> {
        let avail = &self.buf[self.start..self.end];
        if avail.len() < 2 {
            return None;
        }
        let (len, head) = match avail[1] & 0x7f {
            126 if avail.len() >= 4 => (u16::from_be_bytes([avail[2], avail[3]]) as usize, 4),
            127 if avail.len() >= 10 => (
                u64::from_be_bytes(avail[2..10].try_into().unwrap()) as usize,
                10,
            ),
            126 | 127 => return None,
            n => (n as usize, 2),
        };
        if avail.len() < head + len {
            return None;
        }
        let frame = FrameRef {
            opcode: avail[0] & 0x0f,
            start: self.start + head,
            end: self.start + head + len,
        };
        self.start += head + len;
        Some(frame)
    }

    pub fn payload(&self, frame: &FrameRef) -> &[u8] {
        &self.buf[frame.start..frame.end]
    }

    pub async fn send_text(&mut self, payload: &[u8]) -> std::io::Result<()> {
        self.send(0x81, payload).await
    }

    /// Sends a Close frame with `code` (the caller then drops the connection).
    pub async fn send_close(&mut self, code: u16) -> std::io::Result<()> {
        self.send(0x88, &code.to_be_bytes()).await
    }

    /// Sends one masked frame whose first byte is `head` (FIN and opcode).
    async fn send(&mut self, head: u8, payload: &[u8]) -> std::io::Result<()> {
        let mut out = Vec::with_capacity(payload.len() + 14);
        out.push(head);
        match payload.len() {
            n if n < 126 => out.push(0x80 | n as u8),
            n if n < 65536 => {
                out.push(0x80 | 126);
                out.extend_from_slice(&(n as u16).to_be_bytes());
            }
            n => {
                out.push(0x80 | 127);
                out.extend_from_slice(&(n as u64).to_be_bytes());
            }
        }
        self.mask = self
            .mask
            .wrapping_mul(1_664_525)
            .wrapping_add(1_013_904_223);
        let mask = self.mask.to_be_bytes();
        out.extend_from_slice(&mask);
        out.extend(payload.iter().enumerate().map(|(i, b)| b ^ mask[i % 4]));
        self.stream.write_all(&out).await
    }

    /// Reads frames until a text frame whose payload satisfies `want`; answers pings.
    pub async fn expect(&mut self, want: impl Fn(&[u8]) -> bool) -> std::io::Result<Vec<u8>> {
        loop {
            let frame = self.next().await?;
            if frame.opcode == OP_CLOSE {
                let p = self.payload(&frame);
                let code = if p.len() >= 2 {
                    u16::from_be_bytes([p[0], p[1]])
                } else {
                    1005
                };
                return Err(std::io::Error::other(format!(
                    "closed {code}: {}",
                    String::from_utf8_lossy(p.get(2..).unwrap_or_default())
                )));
            }
            if frame.opcode != OP_TEXT {
                continue;
            }
            let payload = self.payload(&frame).to_vec();
            if payload == br#"{"type":"ping"}"# {
                self.send_text(br#"{"op":"pong"}"#).await?;
                continue;
            }
            if want(&payload) {
                return Ok(payload);
            }
        }
    }
}
