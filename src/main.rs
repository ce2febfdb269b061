//! The `flashsale` binary: everything lives in the library; see `flashsale::cli`.

fn main() -> std::process::ExitCode {
    flashsale::cli::main()
}
