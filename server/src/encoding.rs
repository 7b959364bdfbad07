//! Message encodings on the gRPC port beyond what tonic decodes itself.
//!
//! Elkeid's agent compresses every message it sends with snappy, in
//! golang/snappy's framed stream format, and says so with `grpc-encoding:
//! snappy`; tonic decodes gzip and zstd (enabled on the Transfer service) but
//! has no snappy and would refuse the stream with UNIMPLEMENTED. [`Encodings`]
//! sits in front of tonic:
//! - a request marked snappy has each compressed message decompressed here (at
//!   most `grpc.max_message_bytes` of it) and reaches tonic as identity; a
//!   message that does not decompress ends the stream with INVALID_ARGUMENT, one
//!   too large with RESOURCE_EXHAUSTED;
//! - when such a client also accepts snappy (`grpc-accept-encoding`), and tonic
//!   did not compress the answer itself, each answer message is compressed the
//!   same way and the response marked `grpc-encoding: snappy`;
//! - a request in an encoding nobody here decodes is logged with the peer's
//!   identity before tonic refuses it.
//!
//! Requests in identity, gzip or zstd pass through untouched: nothing is wrapped.

use std::collections::VecDeque;
use std::io::{Read, Write};
use std::net::SocketAddr;
use std::pin::Pin;
use std::task::{Context, Poll};

use bytes::{Buf, Bytes, BytesMut};
use http::header::{HeaderMap, HeaderValue};
use http_body::{Body as HttpBody, Frame};
use tonic::Status;
use tonic::body::Body;
use tonic::transport::server::{TcpConnectInfo, TlsConnectInfo};
use tracing::warn;

/// The encodings the Transfer stream takes: tonic's own and snappy here.
pub const ACCEPTED: [&str; 4] = ["identity", "gzip", "zstd", SNAPPY];

/// Elkeid's name for golang/snappy's framed format.
pub const SNAPPY: &str = "snappy";

const ENCODING: &str = "grpc-encoding";
const ACCEPT_ENCODING: &str = "grpc-accept-encoding";
/// A gRPC message's prefix: the compressed flag and the length.
const PREFIX: usize = 5;

/// The layer that adds [`Encodings`] in front of tonic's routes.
#[derive(Debug, Clone, Copy)]
pub struct EncodingsLayer {
    /// The largest message taken, compressed or not.
    pub max_message_bytes: usize,
}

impl<S> tower::Layer<S> for EncodingsLayer {
    type Service = Encodings<S>;
    fn layer(&self, inner: S) -> Encodings<S> {
        Encodings {
            inner,
            max_message_bytes: self.max_message_bytes,
        }
    }
}

/// Decodes snappy requests and encodes snappy answers; see the module docs.
#[derive(Debug, Clone)]
pub struct Encodings<S> {
    inner: S,
    max_message_bytes: usize,
}

impl<S> tower::Service<http::Request<Body>> for Encodings<S>
where
    S: tower::Service<http::Request<Body>, Response = http::Response<Body>>,
    S::Future: Send + 'static,
{
    type Response = http::Response<Body>;
    type Error = S::Error;
    type Future = Pin<Box<dyn Future<Output = Result<Self::Response, Self::Error>> + Send>>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, req: http::Request<Body>) -> Self::Future {
        let encoding = req
            .headers()
            .get(ENCODING)
            .map(|v| v.to_str().unwrap_or("(not text)").to_owned());
        let Some(encoding) = encoding else {
            return Box::pin(self.inner.call(req));
        };
        if encoding != SNAPPY {
            if !ACCEPTED.contains(&encoding.as_str()) {
                let (agent_id, peer) = identity(&req);
                warn!(
                    agent_id,
                    ?peer,
                    encoding,
                    path = req.uri().path(),
                    "refused stream: messages in an encoding the server does not decode"
                );
            }
            return Box::pin(self.inner.call(req));
        }
        let answer_snappy = accepts(req.headers(), SNAPPY);
        let max = self.max_message_bytes;
        let (mut parts, body) = req.into_parts();
        parts.headers.remove(ENCODING);
        let req = http::Request::from_parts(parts, Body::new(Reframed::new(body, Direction::Decompress, max)));
        let answer = self.inner.call(req);
        Box::pin(async move {
            let res = answer.await?;
            if !answer_snappy || res.headers().contains_key(ENCODING) {
                return Ok(res);
            }
            let (mut parts, body) = res.into_parts();
            parts.headers.insert(ENCODING, HeaderValue::from_static(SNAPPY));
            Ok(http::Response::from_parts(
                parts,
                Body::new(Reframed::new(body, Direction::Compress, usize::MAX)),
            ))
        })
    }
}

/// Whether `grpc-accept-encoding` lists `name`.
fn accepts(headers: &HeaderMap, name: &str) -> bool {
    headers
        .get_all(ACCEPT_ENCODING)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(','))
        .any(|e| e.trim() == name)
}

/// The agent ID in the client certificate (unchecked here: the handshake
/// verified it) and the peer address, for logging.
fn identity(req: &http::Request<Body>) -> (String, Option<SocketAddr>) {
    let info = req.extensions().get::<TlsConnectInfo<TcpConnectInfo>>();
    let peer = info.and_then(|i| i.get_ref().remote_addr());
    let agent_id = info
        .and_then(|i| i.peer_certs())
        .and_then(|certs| certs.first().and_then(|c| crate::pki::peer_cert(c)))
        .map_or_else(|| "(no certificate)".to_owned(), |c| c.agent_id);
    (agent_id, peer)
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Direction {
    /// Compressed messages in, identity out.
    Decompress,
    /// Identity messages in, compressed out.
    Compress,
}

/// A gRPC body whose messages are re-encoded one by one as they complete.
struct Reframed {
    inner: Body,
    direction: Direction,
    max: usize,
    /// Bytes of a message not complete yet.
    buf: BytesMut,
    /// Re-encoded messages to hand out.
    ready: VecDeque<Bytes>,
    /// Trailers, once the inner body ended with them.
    trailers: Option<HeaderMap>,
    ended: bool,
}

impl Reframed {
    fn new(inner: Body, direction: Direction, max: usize) -> Self {
        Self {
            inner,
            direction,
            max,
            buf: BytesMut::new(),
            ready: VecDeque::new(),
            trailers: None,
            ended: false,
        }
    }

    /// Moves every complete message from `buf` to `ready`.
    fn split(&mut self) -> Result<(), Status> {
        while self.buf.len() >= PREFIX {
            let flag = self.buf[0];
            let len = u32::from_be_bytes([self.buf[1], self.buf[2], self.buf[3], self.buf[4]]) as usize;
            if len > self.max {
                return Err(Status::resource_exhausted(format!(
                    "message of {len} bytes, over the limit of {} bytes",
                    self.max
                )));
            }
            if self.buf.len() < PREFIX + len {
                break;
            }
            self.buf.advance(PREFIX);
            let message = self.buf.split_to(len);
            let out = match (self.direction, flag) {
                (Direction::Decompress, 1) => frame(0, &decompress(&message, self.max)?),
                (Direction::Compress, 0) => frame(1, &compress(&message)?),
                (Direction::Decompress, 0) => frame(0, &message),
                (_, flag) => {
                    return Err(Status::internal(format!("message with compressed flag {flag}")));
                }
            };
            self.ready.push_back(out);
        }
        Ok(())
    }
}

/// A message with its prefix.
fn frame(flag: u8, message: &[u8]) -> Bytes {
    let mut out = BytesMut::with_capacity(PREFIX + message.len());
    out.extend_from_slice(&[flag]);
    out.extend_from_slice(&u32::try_from(message.len()).unwrap_or(u32::MAX).to_be_bytes());
    out.extend_from_slice(message);
    out.freeze()
}

/// Decompresses one message in the snappy framed format, refusing more than `max`
/// bytes of output.
pub fn decompress(message: &[u8], max: usize) -> Result<Vec<u8>, Status> {
    let mut out = Vec::new();
    let limit = u64::try_from(max).unwrap_or(u64::MAX).saturating_add(1);
    snap::read::FrameDecoder::new(message)
        .take(limit)
        .read_to_end(&mut out)
        .map_err(|e| Status::invalid_argument(format!("snappy message does not decompress: {e}")))?;
    if out.len() > max {
        return Err(Status::resource_exhausted(format!(
            "snappy message decompresses to more than the limit of {max} bytes"
        )));
    }
    Ok(out)
}

/// Compresses one message in the snappy framed format.
pub fn compress(message: &[u8]) -> Result<Vec<u8>, Status> {
    let mut encoder = snap::write::FrameEncoder::new(Vec::with_capacity(message.len() / 2 + 32));
    encoder
        .write_all(message)
        .map_err(|e| Status::internal(format!("snappy: {e}")))?;
    encoder
        .into_inner()
        .map_err(|e| Status::internal(format!("snappy: {}", e.error())))
}

impl HttpBody for Reframed {
    type Data = Bytes;
    type Error = Status;

    fn poll_frame(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Result<Frame<Bytes>, Status>>> {
        let this = &mut *self;
        loop {
            if let Some(message) = this.ready.pop_front() {
                return Poll::Ready(Some(Ok(Frame::data(message))));
            }
            if this.ended {
                if !this.buf.is_empty() {
                    this.buf.clear();
                    return Poll::Ready(Some(Err(Status::invalid_argument("the stream ended inside a message"))));
                }
                return Poll::Ready(this.trailers.take().map(|t| Ok(Frame::trailers(t))));
            }
            match std::task::ready!(Pin::new(&mut this.inner).poll_frame(cx)) {
                Some(Ok(frame)) => match frame.into_data() {
                    Ok(data) => {
                        this.buf.extend_from_slice(&data);
                        if let Err(status) = this.split() {
                            this.ended = true;
                            this.buf.clear();
                            return Poll::Ready(Some(Err(status)));
                        }
                    }
                    Err(frame) => {
                        this.trailers = frame.into_trailers().ok();
                        this.ended = true;
                    }
                },
                Some(Err(status)) => return Poll::Ready(Some(Err(status))),
                None => this.ended = true,
            }
        }
    }

    fn is_end_stream(&self) -> bool {
        self.ended && self.ready.is_empty() && self.buf.is_empty() && self.trailers.is_none()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use http_body_util::BodyExt;

    fn body(chunks: Vec<Bytes>) -> Body {
        let stream = futures::stream::iter(chunks.into_iter().map(|c| Ok::<_, Status>(Frame::data(c))));
        Body::new(http_body_util::StreamBody::new(stream))
    }

    async fn collect(b: Reframed) -> Result<Vec<u8>, Status> {
        Ok(b.collect().await?.to_bytes().to_vec())
    }

    #[tokio::test]
    async fn compressed_messages_split_anywhere_come_out_whole_and_plain() {
        let one = b"first message".repeat(50);
        let two = b"second".to_vec();
        let mut wire = frame(1, &compress(&one).unwrap()).to_vec();
        wire.extend_from_slice(&frame(0, &two));
        wire.extend_from_slice(&frame(1, &compress(&two).unwrap()));
        // Cut into 7-byte pieces: prefixes and messages straddle chunks.
        let chunks = wire.chunks(7).map(Bytes::copy_from_slice).collect();
        let out = collect(Reframed::new(body(chunks), Direction::Decompress, 1 << 20))
            .await
            .unwrap();
        let mut want = frame(0, &one).to_vec();
        want.extend_from_slice(&frame(0, &two));
        want.extend_from_slice(&frame(0, &two));
        assert_eq!(out, want);
    }

    #[tokio::test]
    async fn answers_are_compressed_and_decompress_back() {
        let msg = b"an answer".repeat(20);
        let out = collect(Reframed::new(
            body(vec![frame(0, &msg)]),
            Direction::Compress,
            usize::MAX,
        ))
        .await
        .unwrap();
        assert_eq!(out[0], 1, "marked compressed");
        assert!(out.len() < PREFIX + msg.len(), "smaller than the plain message");
        assert_eq!(decompress(&out[PREFIX..], 1 << 20).unwrap(), msg);
    }

    #[tokio::test]
    async fn garbage_is_invalid_and_a_bomb_is_too_large() {
        let garbage = frame(1, b"not snappy at all");
        let err = collect(Reframed::new(body(vec![garbage]), Direction::Decompress, 1 << 20))
            .await
            .unwrap_err();
        assert_eq!(err.code(), tonic::Code::InvalidArgument, "{err}");
        assert!(err.message().contains("does not decompress"), "{err}");

        let bomb = frame(1, &compress(&vec![0u8; 100_000]).unwrap());
        assert!(bomb.len() < 10_000, "compresses well: {}", bomb.len());
        let err = collect(Reframed::new(body(vec![bomb]), Direction::Decompress, 50_000))
            .await
            .unwrap_err();
        assert_eq!(err.code(), tonic::Code::ResourceExhausted, "{err}");

        let long = Bytes::from_static(&[1, 0, 1, 0, 0]);
        let err = collect(Reframed::new(body(vec![long]), Direction::Decompress, 1000))
            .await
            .unwrap_err();
        assert_eq!(err.code(), tonic::Code::ResourceExhausted, "{err}");
        assert!(err.message().contains("65536 bytes"), "{err}");

        let cut = Bytes::copy_from_slice(&frame(0, b"whole")[..6]);
        let err = collect(Reframed::new(body(vec![cut]), Direction::Decompress, 1000))
            .await
            .unwrap_err();
        assert!(err.message().contains("inside a message"), "{err}");
    }

    #[test]
    fn accept_encoding_is_a_list() {
        let mut h = HeaderMap::new();
        h.insert(ACCEPT_ENCODING, HeaderValue::from_static("gzip, snappy"));
        assert!(accepts(&h, "snappy"));
        assert!(!accepts(&h, "zstd"));
    }
}
