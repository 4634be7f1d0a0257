//! The streaming methods of `weft-bench serve`'s gRPC echo, against the
//! in-process upstream: server streaming (OK, a failure after some replies,
//! a trailers-only failure, bad requests), client streaming and
//! bidirectional streaming, with exact counts, payloads and statuses.

mod common;

use std::time::Duration;

use tonic::Code;
use tonic::transport::Channel;
use weft_bench::grpc::pb::echo_client::EchoClient;
use weft_bench::grpc::pb::{EchoReply, EchoRequest, Failure, ServerStreamRequest};

/// Runs `f` with a client of a fresh in-process server, bounded in time.
fn with_client<F, Fut>(f: F)
where
    F: FnOnce(EchoClient<Channel>) -> Fut,
    Fut: Future<Output = ()>,
{
    let server = common::server(Duration::ZERO);
    let url = format!("http://{}", server.grpc_addrs()[0]);
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    rt.block_on(async {
        let channel = Channel::from_shared(url).unwrap().connect().await.unwrap();
        tokio::time::timeout(Duration::from_secs(10), f(EchoClient::new(channel)))
            .await
            .expect("the calls in time");
    });
}

/// Every message of a server stream, then how it ended (`Ok` for status OK).
async fn drain(
    mut replies: tonic::Streaming<EchoReply>,
) -> (Vec<EchoReply>, Result<(), tonic::Status>) {
    let mut got = Vec::new();
    loop {
        match replies.message().await {
            Ok(Some(r)) => got.push(r),
            Ok(None) => return (got, Ok(())),
            Err(s) => return (got, Err(s)),
        }
    }
}

fn replies(n: u32, payload: &[u8]) -> Vec<EchoReply> {
    (0..n)
        .map(|seq| EchoReply {
            payload: payload.to_vec(),
            seq,
        })
        .collect()
}

#[test]
fn unary_is_unchanged() {
    with_client(|mut c| async move {
        let r = c
            .unary(EchoRequest {
                payload: b"ping".to_vec(),
                response_size: 0,
            })
            .await
            .unwrap()
            .into_inner();
        assert_eq!(
            r,
            EchoReply {
                payload: b"ping".to_vec(),
                seq: 0
            }
        );
    });
}

#[test]
fn server_stream_sends_count_replies_in_order_then_ok() {
    with_client(|mut c| async move {
        let stream = c
            .server_stream(ServerStreamRequest {
                payload: b"abc".to_vec(),
                count: 7,
                ..Default::default()
            })
            .await
            .unwrap()
            .into_inner();
        let (got, end) = drain(stream).await;
        assert_eq!(got, replies(7, b"abc"));
        assert!(end.is_ok(), "{end:?}");

        let stream = c
            .server_stream(ServerStreamRequest {
                payload: b"ignored".to_vec(),
                response_size: 1000,
                count: 3,
                ..Default::default()
            })
            .await
            .unwrap()
            .into_inner();
        let (got, end) = drain(stream).await;
        assert_eq!(got, replies(3, &[b'x'; 1000]));
        assert!(end.is_ok(), "{end:?}");

        let stream = c
            .server_stream(ServerStreamRequest::default())
            .await
            .unwrap()
            .into_inner();
        let (got, end) = drain(stream).await;
        assert_eq!(got, []);
        assert!(end.is_ok(), "{end:?}");
    });
}

#[test]
fn server_stream_ends_with_the_failure_asked_for() {
    with_client(|mut c| async move {
        let fail = |after| Failure {
            after,
            code: Code::ResourceExhausted as i32,
            message: "told to fail".into(),
        };
        let stream = c
            .server_stream(ServerStreamRequest {
                payload: b"p".to_vec(),
                count: 10,
                fail: Some(fail(4)),
                ..Default::default()
            })
            .await
            .unwrap()
            .into_inner();
        let (got, end) = drain(stream).await;
        assert_eq!(got, replies(4, b"p"));
        let status = end.expect_err("a failure");
        assert_eq!(status.code(), Code::ResourceExhausted, "{status:?}");
        assert_eq!(status.message(), "told to fail");

        // `after` past `count`: all `count` replies, then the failure.
        let stream = c
            .server_stream(ServerStreamRequest {
                payload: b"p".to_vec(),
                count: 2,
                fail: Some(fail(5)),
                ..Default::default()
            })
            .await
            .unwrap()
            .into_inner();
        let (got, end) = drain(stream).await;
        assert_eq!(got, replies(2, b"p"));
        assert_eq!(end.expect_err("a failure").code(), Code::ResourceExhausted);

        // Before any reply: a trailers-only response, the call itself fails.
        let status = c
            .server_stream(ServerStreamRequest {
                count: 10,
                fail: Some(fail(0)),
                ..Default::default()
            })
            .await
            .expect_err("a trailers-only failure");
        assert_eq!(status.code(), Code::ResourceExhausted, "{status:?}");
        assert_eq!(status.message(), "told to fail");
    });
}

#[test]
fn server_stream_refuses_bad_requests() {
    with_client(|mut c| async move {
        let bad = [
            ServerStreamRequest {
                count: u32::MAX,
                ..Default::default()
            },
            ServerStreamRequest {
                count: 1,
                response_size: u32::MAX,
                ..Default::default()
            },
            ServerStreamRequest {
                count: 1,
                fail: Some(Failure {
                    after: 0,
                    code: 0,
                    message: String::new(),
                }),
                ..Default::default()
            },
        ];
        for req in bad {
            let status = c.server_stream(req.clone()).await.expect_err("refused");
            assert_eq!(status.code(), Code::InvalidArgument, "{req:?}: {status:?}");
        }
    });
}

#[test]
fn client_stream_counts_requests_and_bytes() {
    with_client(|mut c| async move {
        let requests = (0..25u64).map(|i| EchoRequest {
            payload: vec![b'a'; i as usize * 10],
            response_size: 0,
        });
        let summary = c
            .client_stream(tokio_stream::iter(requests))
            .await
            .unwrap()
            .into_inner();
        assert_eq!(summary.count, 25);
        assert_eq!(summary.bytes, (0..25u64).map(|i| i * 10).sum::<u64>());

        let summary = c
            .client_stream(tokio_stream::iter(Vec::<EchoRequest>::new()))
            .await
            .unwrap()
            .into_inner();
        assert_eq!((summary.count, summary.bytes), (0, 0));
    });
}

#[test]
fn bidi_stream_answers_each_request_in_order() {
    with_client(|mut c| async move {
        let (tx, rx) = tokio::sync::mpsc::channel(1);
        let mut stream = c
            .bidi_stream(tokio_stream::wrappers::ReceiverStream::new(rx))
            .await
            .unwrap()
            .into_inner();
        for i in 0..20u32 {
            let (payload, response_size) = if i % 2 == 0 {
                (format!("message {i}").into_bytes(), 0)
            } else {
                (Vec::new(), i)
            };
            tx.send(EchoRequest {
                payload: payload.clone(),
                response_size,
            })
            .await
            .unwrap();
            let want = if response_size == 0 {
                payload
            } else {
                vec![b'x'; i as usize]
            };
            let got = stream.message().await.unwrap().expect("a reply");
            assert_eq!(
                got,
                EchoReply {
                    payload: want,
                    seq: i
                }
            );
        }
        drop(tx);
        assert_eq!(stream.message().await.unwrap(), None, "ends with OK");

        // A request asking for too much ends the stream with its status.
        let requests = [
            EchoRequest {
                payload: b"fine".to_vec(),
                response_size: 0,
            },
            EchoRequest {
                payload: Vec::new(),
                response_size: u32::MAX,
            },
        ];
        let stream = c
            .bidi_stream(tokio_stream::iter(requests))
            .await
            .unwrap()
            .into_inner();
        let (got, end) = drain(stream).await;
        assert_eq!(got, replies(1, b"fine"));
        assert_eq!(end.expect_err("refused").code(), Code::InvalidArgument);
    });
}
