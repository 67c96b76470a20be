//! Every backend's URL parser on any text: a config or a `Config` error, never a panic, and
//! never the password in the error.
#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|url: &str| {
    let errors = [
        busbar_core::memory::MemoryConfig::from_url(url).err(),
        busbar_redis::RedisConfig::from_url(url).err(),
        busbar_nats::NatsConfig::from_url(url).err(),
        busbar_amqp::AmqpConfig::from_url(url).err(),
        busbar_kafka::KafkaConfig::from_url(url).err(),
        busbar_sqs::SqsConfig::from_url(url).err(),
    ];
    for e in errors.into_iter().flatten() {
        assert_eq!(e.kind(), busbar_core::ErrorKind::Config, "{url:?}: {e}");
        // A password long enough to be unmistakable must not be echoed back.
        if let Some(pw) = password(url).filter(|p| p.len() >= 12) {
            assert!(
                !e.to_string().contains(pw),
                "{url:?}: the error shows the password: {e}"
            );
        }
    }
});

/// The password of `scheme://user:password@host…`, as written.
fn password(url: &str) -> Option<&str> {
    let rest = url.split_once("://")?.1;
    let userinfo = rest.split_once('@')?.0;
    Some(userinfo.split_once(':')?.1)
}
