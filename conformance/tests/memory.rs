//! The memory backend against the whole conformance suite.

fn main() {
    busbar_conformance::main([busbar_conformance::Harness::from_env(
        "memory",
        "BUSBAR_MEMORY_URL",
        "memory://busbar-conformance",
        "nothing to start: the memory backend is embedded",
        busbar_core::memory::connect_boxed,
    )]);
}
