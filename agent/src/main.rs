fn main() -> std::process::ExitCode {
    mcp_warden::cli::main()
}
