//! The HTML report plots a venue run's seats over time: under a risk window
//! the seats sold never go down, desks cut off oversell, and by the end of
//! the run every oversold seat is compensated; the series ends where the
//! run's own figures do, and the page carries the chart.

use weftlog_sim::cli::Outcome;
use weftlog_sim::report::Summary;
use weftlog_sim::scenario::Scenario;
use weftlog_sim::RunOptions;

/// A seed whose venue run oversells under the default risk window.
const OVERSELLING_SEED: u64 = 3;

#[test]
fn a_risk_window_venue_run_plots_sold_oversold_and_compensated_seats() {
    let sc = Scenario::load("venue").expect("built-in scenario");
    let opts = RunOptions {
        scenario_arg: Some("venue".into()),
        policy: Some("risk-window".into()),
        ..RunOptions::default()
    };
    let r = weftlog_sim::run_with(&sc, OVERSELLING_SEED, &opts, &mut |_| {});
    assert!(r.passed(), "{:?}", r.violations);
    let seats = &r.timeline.seats;
    assert!(seats.len() > 100, "a sample per period: {}", seats.len());
    for w in seats.windows(2) {
        assert!(w[0].at_ms < w[1].at_ms, "{w:?}");
        assert!(w[0].sold <= w[1].sold, "sold went down: {w:?}");
    }
    let end = *seats.last().expect("samples");
    assert_eq!(end.at_ms, r.virtual_ms, "a last sample at the end");
    assert!(
        end.oversold >= 1,
        "seed {OVERSELLING_SEED} oversells: {end:?}"
    );
    assert_eq!(end.compensated, end.oversold, "{end:?}");
    assert!(end.sold > end.capacity, "{end:?}");
    // Converged: the union of the events is what node 0 shows.
    assert_eq!(
        (end.sold, end.oversold, end.compensated),
        (r.escrow_consumed, r.oversold.seats, r.oversold.compensated)
    );
    // Oversold before compensated: the marks show while desks are cut off.
    let first_mark = seats.iter().position(|s| s.oversold > 0);
    let first_comp = seats.iter().position(|s| s.compensated > 0);
    assert!(first_mark <= first_comp, "{first_mark:?} {first_comp:?}");

    let caption = format!(
        "At the end: {} sold of {}, {} oversold, {} compensated.",
        end.sold, end.capacity, end.oversold, end.compensated
    );
    let page = weftlog_sim::html::report(&Outcome {
        summaries: vec![Summary::of(std::slice::from_ref(&r), 0.0)],
        runs: vec![r],
    });
    assert!(page.contains("Seats over time"));
    assert!(page.contains(&caption), "{caption}");
    let row = format!("{} seats marked oversold", end.oversold);
    assert!(page.contains(&row), "{row}");
}
