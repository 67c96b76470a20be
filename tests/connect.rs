//! `busbar::connect` picks the backend by scheme and explains what it cannot open.

use busbar::ErrorKind;

#[tokio::test]
async fn memory_scheme_connects() {
    let bus = busbar::connect("memory://").await.expect("memory");
    assert_eq!(bus.backend(), "memory");
    assert!(bus.capabilities().consumer_groups);
}

#[tokio::test]
async fn unknown_scheme_lists_the_known_ones() {
    let e = busbar::connect("mqtt://127.0.0.1:1883")
        .await
        .expect_err("unknown scheme");
    assert_eq!(e.kind(), ErrorKind::Config);
    assert!(e.message().contains("known schemes: "), "{e}");
    assert!(e.message().contains("memory"), "{e}");
}

#[tokio::test]
async fn malformed_url_is_a_config_error() {
    for url in ["", "not a url", "memory:/x"] {
        let e = busbar::connect(url).await.expect_err(url);
        assert_eq!(e.kind(), ErrorKind::Config, "{url}");
    }
}

#[cfg(not(feature = "redis"))]
#[tokio::test]
async fn a_backend_whose_feature_is_off_names_the_feature() {
    let e = busbar::connect("redis://127.0.0.1:6379")
        .await
        .expect_err("feature off");
    assert_eq!(e.kind(), ErrorKind::Config);
    assert!(e.message().contains("enable the `redis` feature"), "{e}");
}

#[cfg(feature = "redis")]
#[tokio::test]
async fn redis_scheme_connects_when_the_feature_is_on() {
    let url = first_url("BUSBAR_REDIS_URL", "redis://127.0.0.1:6379");
    match busbar::connect(&url).await {
        Ok(bus) => assert_eq!(bus.backend(), "redis"),
        Err(e)
            if e.kind() == ErrorKind::Connection
                && std::env::var("BUSBAR_REQUIRE_BROKERS").as_deref() != Ok("1") =>
        {
            eprintln!("IGNORED: no Redis at {url}; start one with scripts/brokers.sh up");
        }
        Err(e) => panic!("connect {url}: {e}"),
    }
}

#[cfg(feature = "nats")]
#[tokio::test]
async fn nats_scheme_connects_when_the_feature_is_on() {
    let url = first_url("BUSBAR_NATS_URL", "nats://127.0.0.1:4222");
    match busbar::connect(&url).await {
        Ok(bus) => assert_eq!(bus.backend(), "nats"),
        Err(e)
            if e.kind() == ErrorKind::Connection
                && std::env::var("BUSBAR_REQUIRE_BROKERS").as_deref() != Ok("1") =>
        {
            eprintln!("IGNORED: no NATS at {url}; start one with scripts/brokers.sh up");
        }
        Err(e) => panic!("connect {url}: {e}"),
    }
}

#[cfg(feature = "kafka")]
#[tokio::test]
async fn kafka_scheme_connects_when_the_feature_is_on() {
    let url = first_url("BUSBAR_KAFKA_URL", "kafka://127.0.0.1:9092");
    match busbar::connect(&url).await {
        Ok(bus) => assert_eq!(bus.backend(), "kafka"),
        Err(e)
            if e.kind() == ErrorKind::Connection
                && std::env::var("BUSBAR_REQUIRE_BROKERS").as_deref() != Ok("1") =>
        {
            eprintln!("IGNORED: no Kafka at {url}; start one with scripts/brokers.sh up");
        }
        Err(e) => panic!("connect {url}: {e}"),
    }
}

#[cfg(feature = "sqs")]
#[tokio::test]
async fn sqs_scheme_connects_when_the_feature_is_on() {
    let url = first_url(
        "BUSBAR_SQS_URL",
        "sqs://test:test@127.0.0.1:4566?region=us-east-1&tls=false",
    );
    match busbar::connect(&url).await {
        Ok(bus) => assert_eq!(bus.backend(), "sqs"),
        Err(e)
            if e.kind() == ErrorKind::Connection
                && std::env::var("BUSBAR_REQUIRE_BROKERS").as_deref() != Ok("1") =>
        {
            eprintln!("IGNORED: no SQS endpoint at {url}; start fauxqs with scripts/brokers.sh up");
        }
        Err(e) => panic!("connect {}: {e}", busbar_core::raw::redact_url(&url)),
    }
}

#[cfg(feature = "amqp")]
#[tokio::test]
async fn amqp_scheme_connects_when_the_feature_is_on() {
    let url = first_url("BUSBAR_AMQP_URL", "amqp://guest:guest@127.0.0.1:5672/%2f");
    match busbar::connect(&url).await {
        Ok(bus) => assert_eq!(bus.backend(), "amqp"),
        Err(e)
            if e.kind() == ErrorKind::Connection
                && std::env::var("BUSBAR_REQUIRE_BROKERS").as_deref() != Ok("1") =>
        {
            eprintln!("IGNORED: no RabbitMQ at {url}; start one with scripts/brokers.sh up");
        }
        Err(e) => panic!("connect {}: {e}", busbar_core::raw::redact_url(&url)),
    }
}

/// The URL in `var` (the first, where it lists a matrix of servers), or `default`.
#[allow(dead_code)]
fn first_url(var: &str, default: &str) -> String {
    std::env::var(var)
        .ok()
        .and_then(|v| v.split_whitespace().next().map(str::to_owned))
        .unwrap_or_else(|| default.to_owned())
}
