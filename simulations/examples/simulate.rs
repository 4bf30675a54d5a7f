//! `weftlog simulate` without the node's CLI: the same flags, a plain
//! progress line on stderr, the summary on stdout, exit status 1 when an
//! oracle failed.
//!
//! ```text
//! cargo run --release --example simulate -- --scenario venue --seeds 1..20
//! ```

use std::io::Write as _;

use weftlog_sim::cli;

fn main() {
    let args = match cli::parse_args(std::env::args().skip(1)) {
        Ok(a) => a,
        Err(e) => {
            eprintln!("error: {e}");
            std::process::exit(2);
        }
    };
    let mut last = 0u64;
    let outcome = cli::simulate(&args, &mut |u| {
        if u.run.is_none() && u.seeds_done != last {
            last = u.seeds_done;
            eprint!(
                "\r{} {}/{} seeds, {} failed   ",
                u.scenario, u.seeds_done, u.seeds_total, u.failures
            );
            let _ = std::io::stderr().flush();
        }
    });
    eprintln!();
    match outcome {
        Ok(o) => {
            if args.verbose && !args.json {
                print!("{}", o.per_seed());
            }
            print!("{}", o.render(args.json));
            if o.failed() {
                std::process::exit(1);
            }
        }
        Err(e) => {
            eprintln!("error: {e}");
            std::process::exit(2);
        }
    }
}
