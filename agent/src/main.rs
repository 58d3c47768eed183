//! `autocore-agent`: the binary entry point; all logic lives in the library.

fn main() -> anyhow::Result<()> {
    println!("autocore-agent {}", autocore_agent::VERSION);
    Ok(())
}
