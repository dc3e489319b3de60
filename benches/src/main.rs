//! The `strata-bench` command: parses the flags, runs, prints the report.
//!
//! Exit status: 0 for a complete run or a skipped peer, 1 when messages failed or went
//! missing, 2 when the run could not be done.

use std::process::ExitCode;

use clap::Parser;
use strata_bench::{Options, Outcome, Report};

fn main() -> ExitCode {
    let options = Options::parse();
    if options.markdown_header {
        println!("{}", Report::markdown_header());
        return ExitCode::SUCCESS;
    }
    let runtime = match tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
    {
        Ok(runtime) => runtime,
        Err(e) => {
            eprintln!("strata-bench: cannot start the async runtime: {e}");
            return ExitCode::from(2);
        }
    };
    match runtime.block_on(strata_bench::run(&options)) {
        Ok(Outcome::Report(report)) => {
            if let Some(path) = &options.save_json {
                if let Err(e) = std::fs::write(path, report.json()) {
                    eprintln!("strata-bench: cannot write {}: {e}", path.display());
                    return ExitCode::from(2);
                }
            }
            if options.json {
                println!("{}", report.json());
            } else if options.markdown {
                println!("{}", report.markdown_row());
            } else {
                print!("{}", report.human());
            }
            if report.is_complete() {
                ExitCode::SUCCESS
            } else {
                ExitCode::from(1)
            }
        }
        Ok(Outcome::Skipped { target, reason }) => {
            let target = target.as_str();
            if options.json {
                println!("{{\"target\": \"{target}\", \"skipped\": {reason:?}}}");
            } else if options.markdown {
                println!("<!-- {target}: skipped: {reason} -->");
            } else {
                println!("skipped: {reason}");
            }
            ExitCode::SUCCESS
        }
        Err(e) => {
            eprintln!("strata-bench: {e}");
            ExitCode::from(2)
        }
    }
}
