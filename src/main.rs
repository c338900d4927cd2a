use clap::Parser;
use std::process::ExitCode;

fn main() -> ExitCode {
    mo_align::util::memory::keep_freed_memory();
    mo_align::util::cpu::pin_thread_count();
    let cli = match mo_align::cli::Cli::try_parse() {
        Ok(cli) => cli,
        Err(e) => return usage_error(e),
    };
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

/// Help and version print as clap writes them; a usage error becomes one line like every other
/// error ("error: unexpected argument '--foo' found; Usage: mo-align sft [OPTIONS]; ...").
fn usage_error(e: clap::Error) -> ExitCode {
    use clap::error::ErrorKind;
    if matches!(
        e.kind(),
        ErrorKind::DisplayHelp
            | ErrorKind::DisplayVersion
            | ErrorKind::DisplayHelpOnMissingArgumentOrSubcommand
    ) {
        e.exit();
    }
    let line = e
        .to_string()
        .lines()
        .map(str::trim)
        .filter(|l| !l.is_empty())
        .collect::<Vec<_>>()
        .join("; ");
    eprintln!("{line}");
    ExitCode::from(2)
}
