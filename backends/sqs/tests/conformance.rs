//! The SQS + SNS backend against the whole conformance suite (`BUSBAR_SQS_URL`; FIFO mode).

fn main() {
    busbar_conformance::main(busbar_conformance::Harness::matrix_from_env(
        "sqs",
        "BUSBAR_SQS_URL",
        "sqs://test:test@127.0.0.1:4566?region=us-east-1&tls=false",
        "scripts/brokers.sh up (starts fauxqs@1.9.2 on 127.0.0.1:4566), or set BUSBAR_SQS_URL",
        busbar_core::raw::connect_boxed::<busbar_sqs::Sqs>,
    ));
}
