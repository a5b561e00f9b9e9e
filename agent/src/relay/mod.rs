//! TEMPORARY byte copy until the MCP relay (branch `relay`) lands.
use std::sync::Arc;

use tokio::io::{AsyncRead, AsyncWrite, AsyncWriteExt};

use crate::session::Session;

pub async fn relay_stdio<CI, CO, SI, SO>(
    mut client_in: CI,
    mut client_out: CO,
    mut server_in: SI,
    mut server_out: SO,
    _session: Arc<Session>,
) -> std::io::Result<()>
where
    CI: AsyncRead + Unpin + Send + 'static,
    CO: AsyncWrite + Unpin + Send + 'static,
    SI: AsyncWrite + Unpin + Send + 'static,
    SO: AsyncRead + Unpin + Send + 'static,
{
    let up = tokio::spawn(async move {
        let r = tokio::io::copy(&mut client_in, &mut server_in).await;
        let _ = server_in.shutdown().await;
        r
    });
    tokio::io::copy(&mut server_out, &mut client_out).await?;
    client_out.flush().await?;
    up.abort();
    Ok(())
}
