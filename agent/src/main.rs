//! `autocore-agent`: the binary entry point; the command line lives in `autocore_agent::cli`.

fn main() -> anyhow::Result<()> {
    autocore_agent::cli::main()
}
