//! TCP tuning for migration streams.

use std::net::TcpStream;
use std::str::FromStr;

use socket2::SockRef;

/// TCP congestion control algorithm.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, serde::Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Congestion {
    /// BBR: keeps long fat pipes full despite random loss (the WAN default).
    #[default]
    Bbr,
    /// CUBIC: Linux's default.
    Cubic,
}

impl Congestion {
    /// The kernel's name for it.
    pub fn name(self) -> &'static str {
        match self {
            Congestion::Bbr => "bbr",
            Congestion::Cubic => "cubic",
        }
    }
}

impl FromStr for Congestion {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        match s {
            "bbr" => Ok(Congestion::Bbr),
            "cubic" => Ok(Congestion::Cubic),
            other => Err(format!(
                "unknown congestion control {other:?}; use bbr or cubic"
            )),
        }
    }
}

/// Options applied to every migration socket.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
pub struct SocketOptions {
    /// SO_SNDBUF in bytes (the kernel doubles it); 0 leaves the default.
    pub send_buffer: usize,
    /// SO_RCVBUF in bytes; 0 leaves the default.
    pub recv_buffer: usize,
    /// TCP_NODELAY: frames are already large, and control messages must not wait.
    pub nodelay: bool,
    /// TCP congestion control.
    pub congestion: Congestion,
}

impl Default for SocketOptions {
    fn default() -> Self {
        SocketOptions {
            // A WAN's bandwidth-delay product: 1 Gbit/s x 50 ms = 6 MiB.
            send_buffer: 8 << 20,
            recv_buffer: 8 << 20,
            nodelay: true,
            congestion: Congestion::Bbr,
        }
    }
}

impl SocketOptions {
    /// Applies the options. A congestion control the kernel lacks is an error that names it.
    pub fn apply(&self, stream: &TcpStream) -> std::io::Result<()> {
        let s = SockRef::from(stream);
        if self.send_buffer > 0 {
            s.set_send_buffer_size(self.send_buffer)?;
        }
        if self.recv_buffer > 0 {
            s.set_recv_buffer_size(self.recv_buffer)?;
        }
        s.set_tcp_nodelay(self.nodelay)?;
        s.set_tcp_congestion(self.congestion.name().as_bytes())
            .map_err(|e| {
                std::io::Error::new(
                    e.kind(),
                    format!(
                        "congestion control {} unavailable ({e}); see /proc/sys/net/ipv4/tcp_available_congestion_control",
                        self.congestion.name()
                    ),
                )
            })
    }
}
