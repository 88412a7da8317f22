//! The reader of a connection's frames: fills a buffer from the socket and decodes it with
//! `wire::inbound::decode`.
//!
//! The reader holds no buffer while a connection is idle: on plain TCP it waits until the
//! socket is readable before it allocates one ([`READ_CHUNK`] or the size of the frame
//! being read), and lets it go as soon as every byte in it has been decoded. An idle
//! connection therefore costs no read buffer, where a reader that owns one for its whole
//! life would keep several kilobytes per connection.

use std::io;
use std::pin::Pin;
use std::task::{ready, Context, Poll};

use bytes::BytesMut;
use tokio::io::{AsyncRead, ReadBuf};

use crate::wire::inbound::{decode, Decoded, Frame, FrameError};

/// What a read asks for when the decoder needs more bytes than a small frame.
pub const READ_CHUNK: usize = 4096;

/// Where the reader's bytes come from. Poll-based, so that a connection waiting for a frame
/// holds no future for it (the waker is kept by the socket's registration).
pub trait Fill {
    /// Appends at least one byte to `buf` (which should grow to `needed` bytes), allocating
    /// only once the source has bytes when it can tell; Ok(0) at the end of the stream.
    /// A poll that returns Pending has read nothing.
    fn poll_fill(
        &mut self,
        cx: &mut Context<'_>,
        buf: &mut BytesMut,
        needed: usize,
    ) -> Poll<io::Result<usize>>;
}

/// Makes room for the next read: the rest of the frame being read, at least a chunk and at
/// most four, so that a header announcing a large frame does not reserve its whole size
/// before the bytes come.
pub fn reserve(buf: &mut BytesMut, needed: usize) {
    if buf.capacity() == buf.len() {
        buf.reserve(
            needed
                .saturating_sub(buf.len())
                .clamp(READ_CHUNK, 4 * READ_CHUNK),
        );
    }
}

/// Any other stream (TLS). At the start of a burst it reads into a stack buffer inside
/// each poll (a poll that returns `Pending` has read nothing), so that it holds no buffer
/// while waiting either; the rest of a frame is read into `buf`.
pub struct AnyRead<R>(pub R);

impl<R: AsyncRead + Unpin + Send> Fill for AnyRead<R> {
    fn poll_fill(
        &mut self,
        cx: &mut Context<'_>,
        buf: &mut BytesMut,
        needed: usize,
    ) -> Poll<io::Result<usize>> {
        if !buf.is_empty() {
            reserve(buf, needed);
            return tokio_util::io::poll_read_buf(Pin::new(&mut self.0), cx, buf);
        }
        let mut stack = [0u8; READ_CHUNK];
        let mut read = ReadBuf::new(&mut stack);
        ready!(Pin::new(&mut self.0).poll_read(cx, &mut read))?;
        buf.extend_from_slice(read.filled());
        Poll::Ready(Ok(read.filled().len()))
    }
}

/// Why reading frames stopped.
#[derive(Debug, thiserror::Error)]
pub enum ReadError {
    #[error(transparent)]
    Frame(#[from] FrameError),
    #[error("connection closed without a close frame")]
    Eof,
    #[error(transparent)]
    Io(#[from] io::Error),
}

/// Decodes frames from a [`Fill`], holding a buffer only while bytes are in it.
pub struct Reader<F> {
    source: F,
    buf: BytesMut,
    max_payload: usize,
}

impl<F: Fill> Reader<F> {
    pub fn new(source: F, max_payload: usize) -> Reader<F> {
        Reader {
            source,
            buf: BytesMut::new(),
            max_payload,
        }
    }

    /// The next frame. Cancel-safe: bytes read before a cancellation stay in the buffer.
    pub async fn frame(&mut self) -> Result<Frame, ReadError> {
        std::future::poll_fn(|cx| self.poll_frame(cx)).await
    }

    /// The next frame, once all its bytes came. Cancel-safe: what was read stays in the
    /// buffer.
    pub fn poll_frame(&mut self, cx: &mut Context<'_>) -> Poll<Result<Frame, ReadError>> {
        loop {
            match decode(&mut self.buf, self.max_payload)? {
                Decoded::Frame(frame) => {
                    if self.buf.is_empty() {
                        // Let the allocation go with the frame's payload.
                        self.buf = BytesMut::new();
                    }
                    return Poll::Ready(Ok(frame));
                }
                Decoded::Incomplete(needed) => {
                    if ready!(self.source.poll_fill(cx, &mut self.buf, needed))? == 0 {
                        return Poll::Ready(Err(ReadError::Eof));
                    }
                }
            }
        }
    }

    /// Bytes of buffer held right now (0 when idle).
    #[cfg(test)]
    pub fn buffer_capacity(&self) -> usize {
        self.buf.capacity()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A masked client text frame.
    fn client_text(payload: &[u8]) -> Vec<u8> {
        let mask = [0x12, 0x34, 0x56, 0x78];
        let mut out = vec![0x81, 0x80 | payload.len() as u8];
        out.extend_from_slice(&mask);
        out.extend(payload.iter().enumerate().map(|(i, b)| b ^ mask[i % 4]));
        out
    }

    #[test]
    fn a_large_frame_reserves_at_most_four_chunks() {
        let mut buf = BytesMut::from(&[0u8; 14][..]);
        reserve(&mut buf, usize::MAX);
        assert!(buf.capacity() <= 14 + 4 * READ_CHUNK + 64);
    }

    #[tokio::test]
    async fn the_reader_lets_its_buffer_go_between_messages() {
        let mut wire = client_text(b"one");
        wire.extend(client_text(b"two"));
        let (mut client, server) = tokio::io::duplex(64);
        let mut reader = Reader::new(AnyRead(server), 1000);
        tokio::io::AsyncWriteExt::write_all(&mut client, &wire)
            .await
            .unwrap();
        assert_eq!(&reader.frame().await.unwrap().payload[..], b"one");
        assert!(
            reader.buffer_capacity() > 0,
            "the second frame is still buffered"
        );
        assert_eq!(&reader.frame().await.unwrap().payload[..], b"two");
        assert_eq!(reader.buffer_capacity(), 0, "nothing left to hold");
        drop(client);
        assert!(matches!(reader.frame().await, Err(ReadError::Eof)));
    }
}
