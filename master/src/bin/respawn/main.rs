//! `respawn`: the demo. A master on 127.0.0.1:8080 keeping one worker per
//! CPU, each answering HTTP: `GET /` says which worker answered, `/crash`
//! panics in the handler, `/sleep/<ms>` answers after a while.
//!
//! It is the article's example, done with the library: start it, curl it,
//! crash a worker, and watch the log as it heals.

mod args;
mod http;

use args::{Args, Parsed};
use log::info;
use std::process::exit;

/// Exit code when workers kept failing and the master gave up (gunicorn's
/// WORKER_BOOT_ERROR is 3 too). 1 is any other failure, 2 a bad flag.
const EXIT_GAVE_UP: i32 = 3;

fn main() {
    let args = match args::parse(std::env::args_os().skip(1)) {
        Ok(Parsed::Run(args)) => args,
        Ok(Parsed::Help) => {
            print!("{}", args::HELP);
            return;
        }
        Ok(Parsed::Version) => {
            println!("respawn {}", env!("CARGO_PKG_VERSION"));
            return;
        }
        Err(err) => {
            eprintln!("respawn: {err}\n{}\ntry 'respawn --help' for more", args::USAGE);
            exit(2);
        }
    };
    init_logging();
    exit(serve(&args));
}

fn serve(args: &Args) -> i32 {
    let listener = match respawn_master::bind(&args.listen) {
        Ok(listener) => listener,
        Err(err) => {
            eprintln!("respawn: {err}");
            return 1;
        }
    };
    match listener.local_addr() {
        Ok(addr) => info!("listening on {addr}"),
        Err(err) => info!("listening on {} ({err} reading the bound address)", args.listen),
    }
    let config = respawn_master::Config::new(args.workers)
        .graceful_timeout(args.graceful_timeout)
        .restart_limit(args.max_restarts, args.restart_window)
        .min_uptime(args.min_uptime)
        .timeout(Some(args.timeout));
    let worker = respawn_worker::Config::new().max_requests(args.max_requests, args.max_requests_jitter);
    let demo = |handoff| respawn_worker::run_with(handoff, http::Demo::new(args.demo_fail_start), &worker);
    match respawn_master::run(listener, config, demo) {
        Ok(()) => 0,
        // The master logged why when it decided; say nothing twice.
        Err(respawn_master::Error::GaveUp { .. }) => EXIT_GAVE_UP,
        Err(err) => {
            eprintln!("respawn: {err}");
            1
        }
    }
}

/// Log lines on stderr, info and up unless RUST_LOG says otherwise, with
/// milliseconds: a respawn takes a few of them.
fn init_logging() {
    env_logger::Builder::from_env(env_logger::Env::default().default_filter_or("info"))
        .format_timestamp_millis()
        .format_target(false)
        .init();
}
