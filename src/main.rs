fn main() {
    std::process::exit(weftlog::cli::main());
}
