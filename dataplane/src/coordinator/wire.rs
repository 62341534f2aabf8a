//! The coordinator's protocol: JSON lines over TCP, after a mutual proof of the pre-shared
//! key (`crypto::coordinator_proof` over both sides' nonces). Each request gets one reply.

use std::io::{BufRead, BufReader, Read, Write};
use std::net::TcpStream;
use std::time::Duration;

use serde::de::DeserializeOwned;
use serde::{Deserialize, Serialize};

use super::group::{Group, GroupFailure, Progress, Verdict};
use crate::crypto::{HandshakeNonce, PreSharedKey, coordinator_proof};

/// Longest line accepted.
const MAX_LINE: u64 = 256 << 10;

/// Member -> coordinator.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(tag = "op", rename_all = "kebab-case", deny_unknown_fields)]
pub enum Request {
    /// Join `group` as `member`.
    Join {
        /// Group.
        group: String,
        /// Member (the guest's name).
        member: String,
        /// Guest pages.
        pages: u64,
        /// Members the group has (0: whoever has joined).
        size: usize,
        /// The group's failure policy (the first member's wins).
        on_failure: GroupFailure,
    },
    /// An iteration ended.
    Report {
        /// Group.
        group: String,
        /// Member.
        member: String,
        /// Its figures.
        progress: Progress,
    },
    /// A held member waits (paced) for up to `ms` instead of iterating.
    Wait {
        /// Group.
        group: String,
        /// Member.
        member: String,
        /// Longest wait.
        ms: u64,
    },
    /// The member committed.
    Done {
        /// Group.
        group: String,
        /// Member.
        member: String,
    },
    /// The member failed or was aborted.
    Fail {
        /// Group.
        group: String,
        /// Member.
        member: String,
        /// Why.
        why: String,
    },
    /// The group, for `skyferry status --group`.
    Show {
        /// Group.
        group: String,
    },
}

/// Coordinator -> member.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(tag = "reply", rename_all = "kebab-case")]
pub enum Reply {
    /// Done.
    Ok,
    /// What to do next.
    Verdict {
        /// The verdict.
        verdict: Verdict,
    },
    /// The group.
    Group {
        /// Its state.
        group: Box<Group>,
    },
    /// Refused.
    Error {
        /// Why.
        message: String,
    },
}

/// Sends one value as a JSON line.
pub fn send<T: Serialize>(s: &mut impl Write, v: &T) -> std::io::Result<()> {
    let mut line = serde_json::to_vec(v).map_err(std::io::Error::other)?;
    line.push(b'\n');
    s.write_all(&line)
}

/// Reads one JSON line (bounded). Any buffered reader (callers pass a
/// `BufReader<TcpStream>`; the fuzz target a byte slice).
pub fn recv<T: DeserializeOwned>(r: &mut impl BufRead) -> std::io::Result<T> {
    let mut line = String::new();
    let n = r.by_ref().take(MAX_LINE).read_line(&mut line)?;
    if n == 0 {
        return Err(std::io::ErrorKind::UnexpectedEof.into());
    }
    if !line.ends_with('\n') {
        return Err(std::io::Error::new(
            std::io::ErrorKind::InvalidData,
            "coordinator line too long",
        ));
    }
    serde_json::from_str(&line).map_err(|e| std::io::Error::new(std::io::ErrorKind::InvalidData, e))
}

#[derive(Serialize, Deserialize)]
struct Hello {
    nonce: [u8; 32],
}

#[derive(Serialize, Deserialize)]
struct Proof {
    nonce: [u8; 32],
    proof: [u8; 32],
}

fn refused(why: &str) -> std::io::Error {
    std::io::Error::new(std::io::ErrorKind::PermissionDenied, why.to_string())
}

fn fresh() -> std::io::Result<HandshakeNonce> {
    HandshakeNonce::random().map_err(std::io::Error::other)
}

/// Client side: proves the key, checks the coordinator's proof.
pub fn client_handshake(
    s: &mut TcpStream,
    r: &mut BufReader<TcpStream>,
    psk: &PreSharedKey,
) -> std::io::Result<()> {
    let server = HandshakeNonce(recv::<Hello>(r)?.nonce);
    let client = fresh()?;
    send(
        s,
        &Proof {
            nonce: client.0,
            proof: coordinator_proof(psk, &server, &client, b"member"),
        },
    )?;
    // The coordinator hangs up on a member whose proof fails.
    let theirs: Proof = recv(r).map_err(|e| match e.kind() {
        std::io::ErrorKind::UnexpectedEof => refused(
            "the coordinator closed the connection: it does not hold this host's pre-shared key",
        ),
        _ => e,
    })?;
    if theirs.proof != coordinator_proof(psk, &server, &client, b"coordinator") {
        return Err(refused(
            "the coordinator does not hold this host's pre-shared key",
        ));
    }
    Ok(())
}

/// Server side: checks the member's proof, proves the key back.
pub fn server_handshake(
    s: &mut TcpStream,
    r: &mut BufReader<TcpStream>,
    psk: &PreSharedKey,
) -> std::io::Result<()> {
    let server = fresh()?;
    send(s, &Hello { nonce: server.0 })?;
    let theirs: Proof = recv(r)?;
    let client = HandshakeNonce(theirs.nonce);
    if theirs.proof != coordinator_proof(psk, &server, &client, b"member") {
        return Err(refused("the member does not hold the pre-shared key"));
    }
    send(
        s,
        &Proof {
            nonce: [0; 32],
            proof: coordinator_proof(psk, &server, &client, b"coordinator"),
        },
    )
}

/// Bounds the handshake so a silent peer cannot hold a thread.
pub const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);
