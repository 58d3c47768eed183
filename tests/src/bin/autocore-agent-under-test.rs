//! The agent's own command line, built inside the harness crate so that its end-to-end tests can
//! run the agent as a separate process (and kill it with SIGKILL) through `CARGO_BIN_EXE_*`.
//! With `AUTOCORE_TEST_POWER_CUT_VFS=1` its SQLite runs on the fault suite's power-cut VFS
//! (`autocore_stack::faults::power_cut`), so a kill can lose what a power cut would.

fn main() -> std::process::ExitCode {
    match autocore_stack::faults::power_cut::install_from_env() {
        Ok(_) => {}
        Err(e) => {
            eprintln!("the power-cut VFS: {e}");
            return std::process::ExitCode::FAILURE;
        }
    }
    autocore_agent::cli::exit(autocore_agent::cli::main())
}
