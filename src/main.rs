use clap::Parser;
use std::process::ExitCode;

fn main() -> ExitCode {
    mo_align::util::memory::keep_freed_memory();
    mo_align::util::cpu::pin_thread_count();
    let cli = mo_align::cli::Cli::parse();
    match mo_align::cli::run(cli) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) if e.is::<mo_align::train::trainer::Interrupted>() => {
            eprintln!("{e}");
            ExitCode::from(130)
        }
        Err(e) => {
            // One line: the context chain, outermost first, each cause by its first line
            // (candle appends a multi-line backtrace to some of its errors).
            let msg = e
                .chain()
                .map(|c| {
                    c.to_string()
                        .lines()
                        .next()
                        .unwrap_or("")
                        .trim()
                        .to_string()
                })
                .filter(|l| !l.is_empty())
                .collect::<Vec<_>>()
                .join(": ");
            eprintln!("error: {msg}");
            ExitCode::from(2)
        }
    }
}
