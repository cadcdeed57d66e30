//! `byteback-gen`: writes byteback's man pages and shell completions, generated
//! from the binaries' own clap definitions (see [`byteback::docgen`]).
//!
//! ```text
//! byteback-gen man DIR           # DIR/man8/*.8, DIR/man5/byteback.toml.5
//! byteback-gen completions DIR   # DIR/bash/NAME, DIR/zsh/_NAME, DIR/fish/NAME.fish
//! ```
use std::path::PathBuf;
use std::process::ExitCode;

fn main() -> ExitCode {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let (what, dir) = match args.as_slice() {
        [what, dir] if what == "man" || what == "completions" => {
            (what.as_str(), PathBuf::from(dir))
        }
        _ => {
            eprintln!("usage: byteback-gen man DIR | byteback-gen completions DIR");
            return ExitCode::from(2);
        }
    };
    let written = if what == "man" {
        byteback::docgen::write_man_pages(&dir)
    } else {
        byteback::docgen::write_completions(&dir)
    };
    match written {
        Ok(paths) => {
            for p in paths {
                println!("{}", p.display());
            }
            ExitCode::SUCCESS
        }
        Err(e) => {
            eprintln!("byteback-gen: {}: {e}", dir.display());
            ExitCode::FAILURE
        }
    }
}
