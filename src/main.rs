use clap::Parser;
use std::process::ExitCode;

fn main() -> ExitCode {
    mo_align::memory::keep_freed_memory();
    let cli = mo_align::cli::Cli::parse();
    match mo_align::cli::run(cli) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) if e.is::<mo_align::train::trainer::Interrupted>() => {
            eprintln!("{e}");
            ExitCode::from(130)
        }
        Err(e) => {
            // One line: the whole context chain, outermost first.
            let msg = format!("{e:#}").replace('\n', " ");
            eprintln!("error: {msg}");
            ExitCode::from(2)
        }
    }
}
