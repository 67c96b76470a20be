//! The RabbitMQ backend against the whole conformance suite (`BUSBAR_AMQP_URL`).

fn main() {
    if std::env::var("BUSBAR_AMQP_WIP").as_deref() != Ok("1") {
        eprintln!(
            "IGNORED the amqp conformance suite: busbar-amqp is work in progress (issue #8): about 1 \
             run in 10 stalls in the crash-and-join ordering case (a lapin connection error). \
             Run it with BUSBAR_AMQP_WIP=1."
        );
        return;
    }
    busbar_conformance::main(busbar_conformance::Harness::from_env(
        "amqp",
        "BUSBAR_AMQP_URL",
        "amqp://guest:guest@127.0.0.1:5672/%2f",
        "scripts/brokers.sh up (or set BUSBAR_AMQP_URL)",
        busbar_amqp::connect_boxed,
    ));
}
