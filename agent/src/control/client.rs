//! The control socket's client side: one request, one response line; or a
//! stream of lines after `events`.
use std::{path::Path, path::PathBuf, time::Duration};

use serde_json::Value;
use tokio::{
    io::{AsyncWriteExt, BufReader},
    net::{
        unix::{OwnedReadHalf, OwnedWriteHalf},
        UnixStream,
    },
};

use super::{response_error, server::read_line, ControlError, Request};

pub struct Client {
    rd: BufReader<OwnedReadHalf>,
    wr: OwnedWriteHalf,
    path: PathBuf,
    buf: Vec<u8>,
}

impl std::fmt::Debug for Client {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Client").field("path", &self.path).finish()
    }
}

impl Client {
    pub async fn connect(path: &Path) -> Result<Self, ControlError> {
        let s = UnixStream::connect(path)
            .await
            .map_err(|source| ControlError::Connect {
                path: path.to_path_buf(),
                source,
            })?;
        let (rd, wr) = s.into_split();
        Ok(Self {
            rd: BufReader::new(rd),
            wr,
            path: path.to_path_buf(),
            buf: Vec::new(),
        })
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Send one request line.
    pub async fn send(&mut self, req: &Request) -> Result<(), ControlError> {
        let mut line = serde_json::to_vec(req)?;
        line.push(b'\n');
        self.wr.write_all(&line).await?;
        self.wr.flush().await?;
        Ok(())
    }

    /// The next line from the agent; None when it closed the connection.
    pub async fn next(&mut self) -> Result<Option<Value>, ControlError> {
        match read_line(&mut self.rd, &mut self.buf).await? {
            Some(()) => Ok(Some(serde_json::from_slice(&self.buf)?)),
            None => Ok(None),
        }
    }

    /// Send `req` and return the agent's `ok` response (an `ok:false`
    /// response is [`ControlError::Refused`]).
    pub async fn request(&mut self, req: &Request) -> Result<Value, ControlError> {
        self.send(req).await?;
        let v = self.next().await?.ok_or(ControlError::Closed)?;
        match response_error(&v) {
            None => Ok(v),
            Some(e) => Err(ControlError::Refused(e)),
        }
    }

    /// [`Client::request`] within `limit`.
    pub async fn request_within(
        &mut self,
        req: &Request,
        limit: Duration,
    ) -> Result<Value, ControlError> {
        tokio::time::timeout(limit, self.request(req))
            .await
            .map_err(|_| ControlError::Timeout(limit))?
    }
}

/// Does an agent answer on `path`? Ok(the ping response) when it does.
pub async fn ping(path: &Path, limit: Duration) -> Result<Value, ControlError> {
    let fut = async {
        let mut c = Client::connect(path).await?;
        c.request(&Request::Ping).await
    };
    tokio::time::timeout(limit, fut)
        .await
        .map_err(|_| ControlError::Timeout(limit))?
}
