//! How many frames each socket write carried: sidecast's `/metrics` counters
//! `sidecast_messages_sent_total` and `sidecast_socket_writes_total`, read before and after
//! a window (`--metrics`, the admin address). 1.0 means every frame went out alone. The
//! soak reads its gauges the same way.

use std::net::SocketAddr;

use tokio::io::{AsyncReadExt, AsyncWriteExt};

/// (frames written, write calls) so far, or None when the server does not answer them.
pub async fn counters(admin: Option<SocketAddr>) -> Option<(u64, u64)> {
    let text = scrape(admin).await?;
    Some((
        value(&text, "sidecast_messages_sent_total")?,
        value(&text, "sidecast_socket_writes_total")?,
    ))
}

/// The server's `/metrics` text, or None when it does not answer.
pub async fn scrape(admin: Option<SocketAddr>) -> Option<String> {
    let mut tcp = tokio::net::TcpStream::connect(admin?).await.ok()?;
    tcp.write_all(b"GET /metrics HTTP/1.1\r\nHost: bench\r\nConnection: close\r\n\r\n")
        .await
        .ok()?;
    let mut text = String::new();
    tcp.read_to_string(&mut text).await.ok()?;
    Some(text)
}

/// The value of an unlabelled metric in `/metrics` text.
pub fn value(text: &str, name: &str) -> Option<u64> {
    text.lines()
        .find_map(|line| line.strip_prefix(name)?.strip_prefix(' ')?.parse().ok())
}

/// Frames per write between two readings.
pub fn per_write(before: Option<(u64, u64)>, after: Option<(u64, u64)>) -> Option<f64> {
    let ((frames0, writes0), (frames1, writes1)) = (before?, after?);
    let writes = writes1.checked_sub(writes0).filter(|w| *w > 0)?;
    Some((frames1 - frames0) as f64 / writes as f64)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ratio_of_differences() {
        assert_eq!(per_write(Some((10, 5)), Some((110, 55))), Some(2.0));
        assert_eq!(per_write(Some((10, 5)), Some((10, 5))), None);
        assert_eq!(per_write(None, Some((10, 5))), None);
    }
}
