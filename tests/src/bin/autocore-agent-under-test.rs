//! The agent's own command line, built inside the harness crate so that its end-to-end tests can
//! run the agent as a separate process (and kill it with SIGKILL) through `CARGO_BIN_EXE_*`.

fn main() -> std::process::ExitCode {
    autocore_agent::cli::exit(autocore_agent::cli::main())
}
