fn main() -> std::process::ExitCode {
    fedimdb::logging::run_main(|| anyhow::bail!("the server is not built yet: see issue 4"))
}
