//! The NATS JetStream backend against the whole conformance suite (`BUSBAR_NATS_URL`).

fn main() {
    busbar_conformance::main(busbar_conformance::Harness::matrix_from_env(
        "nats",
        "BUSBAR_NATS_URL",
        "nats://127.0.0.1:4222",
        "scripts/brokers.sh up (or set BUSBAR_NATS_URL)",
        busbar_core::raw::connect_boxed::<busbar_nats::Nats>,
    ));
}
