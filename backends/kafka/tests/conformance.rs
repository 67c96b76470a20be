//! The Kafka backend against the whole conformance suite (`BUSBAR_KAFKA_URL`).

fn main() {
    busbar_conformance::main(busbar_conformance::Harness::matrix_from_env(
        "kafka",
        "BUSBAR_KAFKA_URL",
        "kafka://127.0.0.1:9092",
        "scripts/brokers.sh up (or set BUSBAR_KAFKA_URL)",
        busbar_core::raw::connect_boxed::<busbar_kafka::Kafka>,
    ));
}
