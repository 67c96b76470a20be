//! The RabbitMQ backend against the whole conformance suite (`BUSBAR_AMQP_URL`).

fn main() {
    busbar_conformance::main(busbar_conformance::Harness::matrix_from_env(
        "amqp",
        "BUSBAR_AMQP_URL",
        "amqp://guest:guest@127.0.0.1:5672/%2f",
        "scripts/brokers.sh up (or set BUSBAR_AMQP_URL)",
        busbar_core::raw::connect_boxed::<busbar_amqp::Amqp>,
    ));
}
