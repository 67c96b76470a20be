//! A runner for backend tests that start a broker process of their own (restart, wrong
//! password, unreachable server): cases that need the broker binary are IGNORED with a hint
//! when it is missing, or FAILED with `BUSBAR_REQUIRE_BROKERS=1`.

use std::future::Future;
use std::pin::Pin;
use std::time::Duration;

pub use libtest_mimic::Failed;

/// What a private-server test returns.
pub type TestResult = Result<(), Failed>;

/// A private-server test.
pub type TestFn = fn() -> Pin<Box<dyn Future<Output = TestResult> + Send>>;

/// A free TCP port on 127.0.0.1.
pub fn free_port() -> std::io::Result<u16> {
    Ok(std::net::TcpListener::bind("127.0.0.1:0")?
        .local_addr()?
        .port())
}

/// Runs `tests` (name, whether it needs `binary`, body) as a libtest-style binary, each with
/// a 180 s limit, and exits with the result.
pub fn main(binary: &str, tests: &[(&'static str, bool, TestFn)]) -> ! {
    let args = libtest_mimic::Arguments::from_args();
    let have_binary = std::process::Command::new(binary)
        .arg("--version")
        .output()
        .is_ok();
    let required = crate::Harness::brokers_required();
    let runtime = crate::test_runtime();
    let hint = format!("{binary} is not installed; run scripts/brokers.sh up");
    let trials = tests
        .iter()
        .map(|&(name, needs_binary, test)| {
            let (rt, why) = (runtime.clone(), hint.clone());
            let missing = needs_binary && !have_binary;
            let trial = libtest_mimic::Trial::test(name, move || {
                if missing {
                    return Err(why.into());
                }
                rt.block_on(async { tokio::time::timeout(Duration::from_secs(180), test()).await })
                    .map_err(|_| Failed::from("timed out after 180 s"))?
            });
            if missing && !required {
                eprintln!("IGNORED {name}: {hint}");
                trial.with_ignored_flag(true)
            } else {
                trial
            }
        })
        .collect();
    let conclusion = libtest_mimic::run(&args, trials);
    std::process::exit(if conclusion.has_failed() { 101 } else { 0 })
}
