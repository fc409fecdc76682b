//! `nixdock`: the operator's command (status, stop, gc, logs, doctor, install, uninstall,
//! demo, image build). See `nixdock --help`.

fn main() {
    std::process::exit(nixdock::cli::main());
}
