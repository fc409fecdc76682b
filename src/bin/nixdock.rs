fn main() {
    eprintln!("nixdock: not implemented yet");
    std::process::exit(1);
}
