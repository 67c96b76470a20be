//! Which RabbitMQ the bus talks to: the version the server announces in its
//! `connection.start` (its `server-properties`), read by a short handshake of our own since the
//! client library does not expose them. Capabilities and queue arguments that differ between
//! server versions are decided from it (see [`Server`]).

use std::time::Duration;

use lapin::protocol::{connection, AMQPClass};
use lapin::types::AMQPValue;
use tokio::io::{AsyncReadExt, AsyncWriteExt};

/// What busbar needs to know about the server.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub(crate) struct Server {
    /// The announced version (`4.0.5`), when it could be read.
    pub(crate) version: Option<String>,
}

impl Server {
    /// The server's major version, when known.
    fn major(&self) -> Option<u32> {
        self.version.as_deref()?.split('.').next()?.parse().ok()
    }

    /// The `x-delivery-limit` to declare on partition queues when the user set none, so a
    /// message handed back (a member closing or crashing with it unacked) is never dropped by
    /// the server:
    /// - 3.x: none (quorum queues have no delivery limit unless one is set; -1 would make 3.x
    ///   drop a message on its first return);
    /// - 4.x: -1, "unlimited" (4.0 set a DEFAULT limit of 20 deliveries, after which a message
    ///   without a dead-letter exchange is dropped);
    /// - unknown (TLS, or an unreadable handshake): a limit no message reaches.
    pub(crate) fn unlimited_delivery_limit(&self) -> Option<i64> {
        match self.major() {
            Some(m) if m < 4 => None,
            Some(_) => Some(-1),
            None => Some(i64::from(i32::MAX)),
        }
    }
}

/// Reads the server's version from its `connection.start`: connects to `host:port`, sends the
/// AMQP 0-9-1 protocol header and closes once the first frame arrived (the server logs a
/// handshake timeout or a closed connection; nothing else happens). Only over plain TCP;
/// `None` for `amqps://` or when anything goes wrong, within `limit`.
pub(crate) async fn probe(uri: &str, limit: Duration) -> Server {
    let Ok(url) = url::Url::parse(uri) else {
        return Server::default();
    };
    if url.scheme() != "amqp" {
        return Server::default();
    }
    let host = url.host_str().unwrap_or("127.0.0.1").to_owned();
    let port = url.port().unwrap_or(5672);
    let version = tokio::time::timeout(limit, read_version(host, port))
        .await
        .ok()
        .flatten();
    if version.is_none() {
        tracing::debug!("amqp: the server's version could not be read from its handshake");
    }
    Server { version }
}

async fn read_version(host: String, port: u16) -> Option<String> {
    let mut tcp = tokio::net::TcpStream::connect((host.as_str(), port))
        .await
        .ok()?;
    tcp.write_all(b"AMQP\x00\x00\x09\x01").await.ok()?;
    // A frame: type (1), channel (2), size (4), payload, end marker (1).
    let mut head = [0u8; 7];
    tcp.read_exact(&mut head).await.ok()?;
    let size = u32::from_be_bytes([head[3], head[4], head[5], head[6]]) as usize;
    if size > 1 << 20 {
        return None;
    }
    let mut frame = head.to_vec();
    frame.resize(7 + size + 1, 0);
    tcp.read_exact(&mut frame[7..]).await.ok()?;
    let (_, parsed) = amq_protocol::frame::parse_frame(frame.as_slice()).ok()?;
    match parsed {
        amq_protocol::frame::AMQPFrame::Method(
            _,
            AMQPClass::Connection(connection::AMQPMethod::Start(start)),
        ) => match start.server_properties.inner().get("version") {
            Some(AMQPValue::LongString(v)) => Some(v.to_string()),
            Some(AMQPValue::ShortString(v)) => Some(v.to_string()),
            _ => None,
        },
        _ => None,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn server(v: Option<&str>) -> Server {
        Server {
            version: v.map(str::to_owned),
        }
    }

    #[test]
    fn delivery_limit_by_version() {
        assert_eq!(server(Some("3.10.8")).unlimited_delivery_limit(), None);
        assert_eq!(server(Some("3.13.7")).unlimited_delivery_limit(), None);
        assert_eq!(server(Some("4.0.5")).unlimited_delivery_limit(), Some(-1));
        assert_eq!(server(Some("4.2.0")).unlimited_delivery_limit(), Some(-1));
        assert_eq!(
            server(None).unlimited_delivery_limit(),
            Some(i64::from(i32::MAX))
        );
        assert_eq!(
            server(Some("garbage")).unlimited_delivery_limit(),
            Some(i64::from(i32::MAX))
        );
    }
}
