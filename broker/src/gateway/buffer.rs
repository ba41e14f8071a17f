//! Per-connection read buffers that follow the traffic. Every connected machine holds two of
//! them for as long as it is connected, so a fixed bulk-sized buffer (256 KiB) would cost
//! half a megabyte per idle machine once a rollout had touched its pages. These start small,
//! double while reads fill them (chunk frames are 64 KiB: one read then carries several), and
//! fall back to the small size once the connection has been quiet for [`IDLE`].

use std::time::Duration;

use tokio::io::{AsyncRead, AsyncReadExt};

/// Size of an idle connection's buffer.
pub const MIN: usize = 4 * 1024;
/// Largest buffer a busy connection grows to.
pub const MAX: usize = 256 * 1024;
/// A grown buffer shrinks back to [`MIN`] after this long without data.
pub const IDLE: Duration = Duration::from_secs(2);

#[derive(Debug)]
pub struct ReadBuf {
    buf: Vec<u8>,
    /// The last read filled the buffer: the next one gets twice the room.
    grow: bool,
}

impl Default for ReadBuf {
    fn default() -> Self {
        Self {
            buf: vec![0; MIN],
            grow: false,
        }
    }
}

impl ReadBuf {
    #[cfg(test)]
    pub fn capacity(&self) -> usize {
        self.buf.len()
    }

    /// Reads once from `rd` and returns the bytes read (empty at end of stream). A grown
    /// buffer that sees no data for [`IDLE`] shrinks, and the read goes on (reads are
    /// cancel-safe, so nothing is lost).
    pub async fn read_from<R: AsyncRead + Unpin>(&mut self, rd: &mut R) -> std::io::Result<&[u8]> {
        if std::mem::take(&mut self.grow) {
            self.buf = vec![0; (self.buf.len() * 2).min(MAX)];
        }
        let n = loop {
            if self.buf.len() == MIN {
                break rd.read(&mut self.buf).await?;
            }
            match tokio::time::timeout(IDLE, rd.read(&mut self.buf)).await {
                Ok(r) => break r?,
                Err(_) => self.buf = vec![0; MIN],
            }
        };
        self.grow = n == self.buf.len() && n < MAX;
        Ok(&self.buf[..n])
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tokio::io::AsyncWriteExt;

    #[tokio::test(start_paused = true)]
    async fn a_buffer_grows_under_bulk_and_shrinks_when_the_connection_goes_quiet() {
        let (mut tx, mut rx) = tokio::io::duplex(4 * MAX);
        let mut buf = ReadBuf::default();
        assert_eq!(buf.capacity(), MIN);
        // A burst bigger than the largest buffer: reads fill the buffer, which doubles.
        let burst: Vec<u8> = (0..3 * MAX).map(|i| i as u8).collect();
        tx.write_all(&burst).await.unwrap();
        let mut got = Vec::new();
        while got.len() < burst.len() {
            got.extend_from_slice(buf.read_from(&mut rx).await.unwrap());
        }
        assert_eq!(got, burst, "every byte, in order, across the resizes");
        assert_eq!(buf.capacity(), MAX);
        // Quiet for longer than IDLE, then one small message: it arrives, in a small buffer.
        let reader = tokio::spawn(async move {
            let n = buf.read_from(&mut rx).await.unwrap().to_vec();
            (n, buf.capacity())
        });
        tokio::time::sleep(IDLE * 3).await;
        tx.write_all(b"ping").await.unwrap();
        let (n, cap) = reader.await.unwrap();
        assert_eq!(n, b"ping");
        assert_eq!(cap, MIN);
    }

    #[tokio::test]
    async fn end_of_stream_reads_as_empty() {
        let (tx, mut rx) = tokio::io::duplex(64);
        drop(tx);
        let mut buf = ReadBuf::default();
        assert!(buf.read_from(&mut rx).await.unwrap().is_empty());
    }
}
