//! pyleak: find memory leaks in running Python programs from the outside.

mod analysis;
mod attach;
mod census;
mod cli;
mod collect;
mod errors;
mod layers;
mod live;
mod multi_uprobe;
mod python;
mod record;
mod report;
mod symbolize;
mod targets;
mod tracefs;

use clap::Parser as _;

fn main() {
    env_logger::Builder::from_env(env_logger::Env::default().default_filter_or("warn")).init();
    let cli = cli::Cli::parse();
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
