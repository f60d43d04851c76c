//! The tokio peer: an echo server on tokio's current-thread runtime, the
//! way tokio's own examples write one, for `muxserve bench` to compare
//! against (`muxserve serve --engine tokio echo@ADDR`).

use std::io;
use std::net::SocketAddr;

use tokio::io::{AsyncReadExt, AsyncWriteExt};

/// Serves echo on `addr` until the process ends; calls `ready` with the
/// bound address first.
pub fn tokio_echo(addr: SocketAddr, ready: impl FnOnce(SocketAddr)) -> io::Result<()> {
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_io()
        .build()?;
    runtime.block_on(async move {
        // tokio listens with a backlog of 1024, like muxserve.
        let listener = tokio::net::TcpListener::bind(addr).await?;
        ready(listener.local_addr()?);
        loop {
            let (mut socket, _) = listener.accept().await?;
            socket.set_nodelay(true)?;
            tokio::spawn(async move {
                // A 16 KiB buffer per connection, as common servers have.
                let mut buf = vec![0u8; 16 * 1024];
                loop {
                    let n = match socket.read(&mut buf).await {
                        Ok(0) | Err(_) => return,
                        Ok(n) => n,
                    };
                    if socket.write_all(&buf[..n]).await.is_err() {
                        return;
                    }
                }
            });
        }
    })
}
