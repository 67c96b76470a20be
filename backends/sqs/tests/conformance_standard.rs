//! The SQS + SNS backend in standard mode (`fifo=false`: standard topics and queues, no
//! ordering, delayed publish) against the whole conformance suite (`BUSBAR_SQS_URL` plus
//! `fifo=false`).

fn main() {
    let base = std::env::var("BUSBAR_SQS_URL")
        .unwrap_or_else(|_| "sqs://test:test@127.0.0.1:4566?region=us-east-1&tls=false".into());
    let separator = if base.contains('?') { '&' } else { '?' };
    busbar_conformance::main([busbar_conformance::Harness::new(
        "sqs-standard",
        format!("{base}{separator}fifo=false"),
        "scripts/brokers.sh up (starts fauxqs@1.9.2 on 127.0.0.1:4566), or set BUSBAR_SQS_URL",
        busbar_core::raw::connect_boxed::<busbar_sqs::Sqs>,
    )]);
}
