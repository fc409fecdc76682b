fn main() {
    eprintln!("nixdock-hook: not implemented yet");
    std::process::exit(1);
}
