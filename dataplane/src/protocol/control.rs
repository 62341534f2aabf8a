//! The sealed control channel: typed messages in sealed frames over the control connection.
//!
//! Both halves work over any writer or reader (a `TcpStream` by default), so the fuzz target
//! in `dataplane/fuzz` can feed the receiving half bytes from a slice.

use std::io::{Read, Write};
use std::net::TcpStream;

use serde::Serialize;
use serde::de::DeserializeOwned;

use super::{CONTROL_FRAME_SIZE, CONTROL_STREAM, ProtocolError};
use crate::crypto::{Direction, MigrationKeys, Opener, Sealer, StreamKey};
use crate::frame::{FrameBuf, HEADER_LEN};

/// Sending half.
#[derive(Debug)]
pub struct ControlTx<W = TcpStream> {
    stream: W,
    sealer: Sealer,
    frame: FrameBuf,
}

/// Receiving half. Partial frames survive a read timeout, so callers may poll.
#[derive(Debug)]
pub struct ControlRx<R = TcpStream> {
    stream: R,
    opener: Opener,
    buf: Vec<u8>,
    /// Bytes of the current frame read so far.
    have: usize,
    /// The current frame's length, once its header is checked (0 before).
    total: usize,
}

/// Both halves of a control connection; `we_send` is the direction this end seals.
pub fn control_channel(
    stream: &TcpStream,
    keys: &MigrationKeys,
    we_send: Direction,
) -> Result<(ControlTx, ControlRx), ProtocolError> {
    let they_send = match we_send {
        Direction::SourceToDest => Direction::DestToSource,
        Direction::DestToSource => Direction::SourceToDest,
    };
    let clone = |s: &TcpStream| {
        s.try_clone()
            .map_err(|e| ProtocolError::io("cloning the control socket", e))
    };
    Ok((
        ControlTx::new(clone(stream)?, &keys.stream_key(CONTROL_STREAM, we_send)),
        ControlRx::new(clone(stream)?, &keys.stream_key(CONTROL_STREAM, they_send)),
    ))
}

impl<W: Write> ControlTx<W> {
    /// Seals messages with `key` (the control stream's, this end's direction) onto `stream`.
    pub fn new(stream: W, key: &StreamKey) -> Self {
        ControlTx {
            stream,
            sealer: Sealer::new(key),
            frame: FrameBuf::new(CONTROL_FRAME_SIZE),
        }
    }

    /// What the messages are written to.
    pub fn get_ref(&self) -> &W {
        &self.stream
    }

    /// Seals and sends one message.
    pub fn send<T: Serialize>(&mut self, msg: &T) -> Result<(), ProtocolError> {
        let bytes = postcard::to_allocvec(msg).map_err(|e| ProtocolError::Malformed {
            what: "outgoing control",
            detail: e.to_string(),
        })?;
        self.frame.clear();
        if bytes.len() > self.frame.body_capacity() {
            return Err(ProtocolError::TooLarge(bytes.len()));
        }
        self.frame.append_raw_records(&bytes, 1);
        let wire = self.sealer.seal(&mut self.frame);
        self.stream
            .write_all(wire)
            .map_err(|e| ProtocolError::io("sending a control message", e))
    }
}

impl ControlTx<TcpStream> {
    /// Closes the connection both ways (unblocks the receiving half).
    pub fn shutdown(&self) {
        let _ = self.stream.shutdown(std::net::Shutdown::Both);
    }
}

impl<R: Read> ControlRx<R> {
    /// Opens messages from `stream` with `key` (the control stream's, the peer's direction).
    pub fn new(stream: R, key: &StreamKey) -> Self {
        ControlRx {
            stream,
            opener: Opener::new(key, CONTROL_FRAME_SIZE),
            buf: vec![0; CONTROL_FRAME_SIZE],
            have: 0,
            total: 0,
        }
    }

    /// Waits for, opens and parses the next message. With a timeout set, a timed-out call
    /// returns an I/O error of kind `WouldBlock`/`TimedOut` and keeps what it had read.
    pub fn recv<T: DeserializeOwned>(&mut self) -> Result<T, ProtocolError> {
        loop {
            if self.total == 0 && self.have == HEADER_LEN {
                self.total = self.opener.check_header(&self.buf[..HEADER_LEN])?;
            }
            if self.total != 0 && self.have == self.total {
                let total = std::mem::take(&mut self.total);
                self.have = 0;
                let opened = self.opener.open(&mut self.buf[..total])?;
                return postcard::from_bytes(opened.body).map_err(|e| ProtocolError::Malformed {
                    what: "control",
                    detail: e.to_string(),
                });
            }
            let want = if self.total == 0 {
                HEADER_LEN
            } else {
                self.total
            };
            match self.stream.read(&mut self.buf[self.have..want]) {
                Ok(0) => {
                    return Err(ProtocolError::Closed {
                        context: "waiting for a control message",
                    });
                }
                Ok(n) => self.have += n,
                Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
                Err(e) => return Err(ProtocolError::io("waiting for a control message", e)),
            }
        }
    }
}

impl ControlRx<TcpStream> {
    /// Limits how long [`recv`](Self::recv) waits (`None`: forever).
    pub fn set_timeout(&self, t: Option<std::time::Duration>) -> Result<(), ProtocolError> {
        self.stream
            .set_read_timeout(t)
            .map_err(|e| ProtocolError::io("setting the control timeout", e))
    }
}
