//! `autocore-agent`: the binary entry point; the command line lives in `autocore_agent::cli`.

fn main() -> std::process::ExitCode {
    autocore_agent::cli::exit(autocore_agent::cli::main())
}
