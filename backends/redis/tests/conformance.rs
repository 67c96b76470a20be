//! The Redis backend against the whole conformance suite (a real Redis, `BUSBAR_REDIS_URL`).

fn main() {
    busbar_conformance::main(busbar_conformance::Harness::matrix_from_env(
        "redis",
        "BUSBAR_REDIS_URL",
        "redis://127.0.0.1:6379",
        "scripts/brokers.sh up (or set BUSBAR_REDIS_URL)",
        busbar_core::raw::connect_boxed::<busbar_redis::Redis>,
    ));
}
