//! pyleak: find memory leaks in running Python programs from the outside. The binary
//! (`main.rs`) calls [`main`]; the library exists so that the fuzz targets (`fuzz/`) can
//! reach the parsers through [`fuzz`].

mod analysis;
mod attach;
mod census;
mod cli;
mod collect;
mod errors;
mod host;
mod layers;
mod live;
mod multi_uprobe;
mod proctext;
mod python;
mod record;
mod report;
mod symbolize;
mod targets;
mod tracefs;

pub mod fuzz;

use clap::Parser as _;

/// Runs the command line and exits: one line on stderr for any error.
pub fn main() -> ! {
    env_logger::Builder::from_env(env_logger::Env::default().default_filter_or("warn")).init();
    let cli = match cli::Cli::try_parse() {
        Ok(cli) => cli,
        Err(e) if !e.use_stderr() => e.exit(), // --help, --version
        Err(e) => {
            eprintln!("pyleak: {}", cli::one_line(&e.render().to_string()));
            std::process::exit(2);
        }
    };
    let result = match cli.command {
        cli::Command::Record(args) => record::run(args, record::View::StatusLine),
        cli::Command::Top(args) => record::run(args, record::View::Top),
        cli::Command::Report(args) => report::rerender(&args.input, &args.out),
        cli::Command::Census(args) => census::run(&args),
    };
    match result {
        Ok(code) => std::process::exit(code),
        Err(e) => {
            // One line: the user-facing error, then its causes.
            let msg: Vec<String> = e.chain().map(|c| c.to_string()).collect();
            eprintln!("pyleak: {}", msg.join(": "));
            std::process::exit(1);
        }
    }
}
