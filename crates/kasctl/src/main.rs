//! kasctl: the admin and CI helper CLI of kas. It talks to kas's admin API (on the API
//! listener) with the admin token, through a typed client ([`client`]); it holds no
//! state of its own. [`cli`] is what it accepts, [`commands`] what each command does,
//! [`output`] how results are shown.

mod cli;
mod client;
mod commands;
mod output;

use clap::Parser;

#[tokio::main]
async fn main() {
    if let Err(e) = commands::run(cli::Cli::parse()).await {
        eprintln!("kasctl: {e:#}");
        std::process::exit(1);
    }
}
