//! The HTML report of `weftlog simulate --report FILE`: one self-contained
//! page (inline SVG, no scripts) with, per scenario, the summary, the
//! failing seeds and their replay commands, plots of one run (divergence
//! between nodes over time with the partitions and crashes marked, seats
//! sold, oversold and compensated when the run sells from escrow counters,
//! convergence after each heal, traffic), the distribution of convergence
//! times over all seeds, and a row per seed.

use std::fmt::Write as _;

use crate::cli::Outcome;
use crate::report::{human_bytes, percentiles, RunReport, Seats, Summary};

const W: f64 = 860.0;
const H: f64 = 220.0;
const PAD_L: f64 = 64.0;
const PAD_R: f64 = 16.0;
const PAD_T: f64 = 24.0;
const PAD_B: f64 = 36.0;

fn esc(s: &str) -> String {
    s.replace('&', "&amp;")
        .replace('<', "&lt;")
        .replace('>', "&gt;")
        .replace('"', "&quot;")
}

/// A "nice" upper bound for an axis.
fn nice(max: f64) -> f64 {
    if max <= 0.0 {
        return 1.0;
    }
    let mag = 10f64.powf(max.log10().floor());
    for m in [1.0, 2.0, 2.5, 5.0, 10.0] {
        if m * mag >= max {
            return m * mag;
        }
    }
    10.0 * mag
}

fn fmt_num(x: f64) -> String {
    if x >= 1e6 {
        format!("{:.1}M", x / 1e6)
    } else if x >= 1e4 {
        format!("{:.0}k", x / 1e3)
    } else if x >= 100.0 || x == x.trunc() {
        format!("{x:.0}")
    } else {
        format!("{x:.1}")
    }
}

/// A chart frame: axes, ticks and labels; returns the SVG opening and the
/// mapping functions' parameters.
struct Frame {
    x_max: f64,
    y_max: f64,
}

impl Frame {
    fn x(&self, v: f64) -> f64 {
        PAD_L + (W - PAD_L - PAD_R) * (v / self.x_max).clamp(0.0, 1.0)
    }
    fn y(&self, v: f64) -> f64 {
        H - PAD_B - (H - PAD_T - PAD_B) * (v / self.y_max).clamp(0.0, 1.0)
    }

    fn open(&self, title: &str, x_label: &str, y_label: &str) -> String {
        let mut s = String::new();
        let _ = write!(
            s,
            r#"<svg viewBox="0 0 {W} {H}" width="{W}" height="{H}" xmlns="http://www.w3.org/2000/svg" font-family="sans-serif" font-size="11">"#
        );
        let _ = write!(
            s,
            r#"<text x="{PAD_L}" y="14" font-size="13" font-weight="bold">{}</text>"#,
            esc(title)
        );
        for i in 0..=4 {
            let v = self.y_max * i as f64 / 4.0;
            let y = self.y(v);
            let _ = write!(
                s,
                r##"<line x1="{PAD_L}" x2="{}" y1="{y:.1}" y2="{y:.1}" stroke="#ddd"/><text x="{}" y="{:.1}" text-anchor="end">{}</text>"##,
                W - PAD_R,
                PAD_L - 4.0,
                y + 4.0,
                fmt_num(v)
            );
        }
        for i in 0..=5 {
            let v = self.x_max * i as f64 / 5.0;
            let x = self.x(v);
            let _ = write!(
                s,
                r#"<text x="{x:.1}" y="{}" text-anchor="middle">{}</text>"#,
                H - PAD_B + 14.0,
                fmt_num(v)
            );
        }
        let _ = write!(
            s,
            r#"<text x="{}" y="{}" text-anchor="middle">{}</text>"#,
            (PAD_L + W - PAD_R) / 2.0,
            H - 4.0,
            esc(x_label)
        );
        let _ = write!(
            s,
            r#"<text x="12" y="{}" transform="rotate(-90 12 {})" text-anchor="middle">{}</text>"#,
            H / 2.0,
            H / 2.0,
            esc(y_label)
        );
        s
    }
}

/// A named, coloured line of a [`line_chart`].
struct Series<'a> {
    name: &'a str,
    colour: &'a str,
    /// Drawn dashed: a reference, not a measure.
    dashed: bool,
    points: Vec<(f64, f64)>,
}

impl<'a> Series<'a> {
    fn new(name: &'a str, colour: &'a str, points: Vec<(f64, f64)>) -> Series<'a> {
        Series {
            name,
            colour,
            dashed: false,
            points,
        }
    }

    fn dashed(mut self) -> Series<'a> {
        self.dashed = true;
        self
    }
}

/// A line chart over time (seconds) with shaded intervals and markers.
fn line_chart(
    title: &str,
    y_label: &str,
    series: &[Series<'_>],
    bands: &[(f64, f64, String)],
    marks: &[(f64, String)],
    x_max: f64,
) -> String {
    let y_max = nice(
        series
            .iter()
            .flat_map(|l| l.points.iter().map(|p| p.1))
            .fold(0.0, f64::max),
    );
    let f = Frame {
        x_max: x_max.max(1e-9),
        y_max,
    };
    let mut s = f.open(title, "virtual time (s)", y_label);
    for (a, b, label) in bands {
        let (x1, x2) = (f.x(*a), f.x(*b));
        let _ = write!(
            s,
            r##"<rect x="{x1:.1}" y="{PAD_T}" width="{:.1}" height="{}" fill="#f4c7c3" opacity="0.45"><title>{}</title></rect>"##,
            (x2 - x1).max(1.0),
            H - PAD_T - PAD_B,
            esc(label)
        );
    }
    for (t, label) in marks {
        let x = f.x(*t);
        let _ = write!(
            s,
            r##"<line x1="{x:.1}" x2="{x:.1}" y1="{PAD_T}" y2="{}" stroke="#555" stroke-dasharray="3,3"><title>{}</title></line>"##,
            H - PAD_B,
            esc(label)
        );
    }
    for (i, l) in series.iter().enumerate() {
        let (name, color) = (l.name, l.colour);
        let path: Vec<String> = l
            .points
            .iter()
            .map(|(x, y)| format!("{:.1},{:.1}", f.x(*x), f.y(*y)))
            .collect();
        let dash = if l.dashed {
            r#" stroke-dasharray="6,4""#
        } else {
            ""
        };
        let _ = write!(
            s,
            r#"<polyline fill="none" stroke="{color}" stroke-width="1.5"{dash} points="{}"/>"#,
            path.join(" ")
        );
        let lx = W - PAD_R - 160.0;
        let ly = PAD_T + 12.0 + 14.0 * i as f64;
        let _ = write!(
            s,
            r#"<rect x="{lx}" y="{}" width="10" height="3" fill="{color}"/><text x="{}" y="{ly}">{}</text>"#,
            ly - 4.0,
            lx + 14.0,
            esc(name)
        );
    }
    s.push_str("</svg>");
    s
}

/// Bars at positions (a scatter of vertical bars).
fn bar_chart(title: &str, x_label: &str, y_label: &str, bars: &[(f64, f64)], x_max: f64) -> String {
    let y_max = nice(bars.iter().map(|b| b.1).fold(0.0, f64::max));
    let f = Frame {
        x_max: x_max.max(1e-9),
        y_max,
    };
    let mut s = f.open(title, x_label, y_label);
    let width = ((W - PAD_L - PAD_R) / (bars.len().max(1) as f64 * 1.5)).clamp(2.0, 14.0);
    for (x, y) in bars {
        let (px, py) = (f.x(*x), f.y(*y));
        let _ = write!(
            s,
            r##"<rect x="{:.1}" y="{py:.1}" width="{width:.1}" height="{:.1}" fill="#4a7bd0"><title>{}: {}</title></rect>"##,
            px - width / 2.0,
            (H - PAD_B - py).max(0.5),
            fmt_num(*x),
            fmt_num(*y)
        );
    }
    s.push_str("</svg>");
    s
}

fn histogram(title: &str, xs: &[u64]) -> String {
    if xs.is_empty() {
        return String::new();
    }
    let max = *xs.iter().max().expect("not empty") as f64;
    let top = nice(max.max(1.0));
    let bins = 30usize;
    let mut counts = vec![0u64; bins];
    for &x in xs {
        let b = ((x as f64 / top) * bins as f64) as usize;
        counts[b.min(bins - 1)] += 1;
    }
    let bars: Vec<(f64, f64)> = counts
        .iter()
        .enumerate()
        .map(|(i, &c)| ((i as f64 + 0.5) * top / bins as f64, c as f64))
        .collect();
    bar_chart(
        title,
        "convergence after heal (virtual ms)",
        "heals",
        &bars,
        top,
    )
}

fn summary_table(s: &Summary) -> String {
    let mut o = String::from("<table class=\"kv\">");
    let mut row = |k: &str, v: String| {
        let _ = write!(o, "<tr><th>{}</th><td>{}</td></tr>", esc(k), esc(&v));
    };
    row("seeds", format!("{} run, {} passed", s.seeds, s.passed));
    row("nodes", s.nodes.to_string());
    row(
        "events",
        format!(
            "{} acknowledged of {} commands; {} lost unacknowledged in crashes",
            s.events, s.appends.attempted, s.appends.lost_unacked
        ),
    );
    row(
        "refused",
        format!(
            "{} expected-version, {} escrow rights (oversell attempts), {} at a down node",
            s.appends.refused_version, s.appends.refused_rights, s.appends.node_down
        ),
    );
    row(
        "traffic",
        format!(
            "{} messages, {}; {} duplicate event deliveries",
            s.messages,
            human_bytes(s.bytes),
            s.duplicate_deliveries
        ),
    );
    let faults: Vec<String> = s
        .faults
        .iter()
        .filter(|(_, v)| **v > 0)
        .map(|(k, v)| format!("{k}: {v}"))
        .collect();
    row("faults", faults.join(", "));
    if let Some(h) = s.held() {
        row("held", h);
    }
    if let Some(a) = s.adversary() {
        row("adversary", a);
    }
    if let Some(r) = s.restores() {
        row("restores", r);
    }
    row(
        "conflicts",
        format!(
            "{} fields in conflict at the end; {} pairs of concurrent same-field writes",
            s.conflicts, s.concurrent_writes
        ),
    );
    row(
        "convergence after heal",
        format!(
            "{} heals: p50 {} ms, p99 {} ms, max {} ms",
            s.convergence.count, s.convergence.p50_ms, s.convergence.p99_ms, s.convergence.max_ms
        ),
    );
    row(
        "escrow",
        format!(
            "{} of {} rights consumed; {} oversell attempts refused",
            s.escrow_consumed, s.escrow_capacity, s.oversell_refused
        ),
    );
    if s.oversold.seats > 0 {
        row(
            "oversold",
            format!(
                "{} seats marked oversold, {} compensated ({} released by cancel or waitlist, {} honoured)",
                s.oversold.seats, s.oversold.compensated, s.oversold.released, s.oversold.honoured
            ),
        );
    }
    if s.retries.sent > 0 {
        row(
            "client retries",
            format!(
                "{} commands retried at another node ({} answered with the event in effect); {} ran on two nodes; {} duplicate events took no effect",
                s.retries.sent,
                s.retries.answered_existing,
                s.retries.carried_twice,
                s.retries.duplicates
            ),
        );
    }
    row(
        "time",
        format!(
            "{:.0} virtual s in {:.1} wall s ({:.0} events per wall s)",
            s.virtual_s, s.wall_s, s.events_per_wall_s
        ),
    );
    o.push_str("</table>");
    o
}

/// Seats sold, oversold and compensated over the run, with the capacity,
/// and a caption; empty when the run has no escrow counter.
fn seats_chart(r: &RunReport, bands: &[(f64, f64, String)], x_max: f64) -> String {
    let seats = &r.timeline.seats;
    let Some(end) = seats.last() else {
        return String::new();
    };
    let line = |f: fn(&Seats) -> u64| -> Vec<(f64, f64)> {
        seats
            .iter()
            .map(|s| (s.at_ms as f64 / 1000.0, f(s) as f64))
            .collect()
    };
    let mut o = line_chart(
        "Seats over time (shaded: partitions)",
        "seats",
        &[
            Series::new("sold", "#2c7fb8", line(|s| s.sold)),
            Series::new("capacity", "#777", line(|s| s.capacity)).dashed(),
            Series::new("oversold", "#c0392b", line(|s| s.oversold)),
            Series::new("compensated", "#27ae60", line(|s| s.compensated)),
        ],
        bands,
        &[],
        x_max,
    );
    let _ = write!(
        o,
        "<p class=\"caption\">Every escrow counter of the run, summed, as the union of \
         the events durable on any node shows them: what every replica shows once all \
         have met, sampled every {} ms of virtual time and at the end. <b>Sold</b>: seats \
         consumed by the sales in effect (a seat a compensation released stays counted). \
         <b>Oversold</b>: seats the read model marks beyond the capacity. \
         <b>Compensated</b>: marked seats with a compensation standing, written by a node \
         once it holds the events that mark the sale (so it follows a heal); where it \
         meets oversold it covers that line. <b>Capacity</b> (dashed): the initial seats \
         plus those an <code>honour</code> kept. At the end: \
         {} sold of {}, {} oversold, {} compensated.</p>",
        r.timeline.sample_ms, end.sold, end.capacity, end.oversold, end.compensated
    );
    o
}

fn run_plots(r: &RunReport) -> String {
    let t = &r.timeline;
    let step = t.sample_ms as f64 / 1000.0;
    let at = |i: usize| (i + 1) as f64 * step;
    let x_max = r.virtual_ms as f64 / 1000.0;
    let bands: Vec<(f64, f64, String)> = t
        .partitions
        .iter()
        .map(|(a, b, shape)| {
            (
                *a as f64 / 1000.0,
                *b as f64 / 1000.0,
                format!("partition: {shape}"),
            )
        })
        .collect();
    let mut marks: Vec<(f64, String)> = t
        .crashes
        .iter()
        .map(|(a, n, b)| {
            (
                *a as f64 / 1000.0,
                format!("node {n} crashed, restarts at {b} ms"),
            )
        })
        .collect();
    marks.push((t.final_heal_ms as f64 / 1000.0, "final heal".to_string()));
    let divergence: Vec<(f64, f64)> = t
        .divergence
        .iter()
        .enumerate()
        .map(|(i, &d)| (at(i), d as f64))
        .collect();
    let per_s = 1.0 / step.max(1e-9);
    let kbytes: Vec<(f64, f64)> = t
        .bytes
        .iter()
        .enumerate()
        .map(|(i, &b)| (at(i), b as f64 * per_s / 1000.0))
        .collect();
    let msgs: Vec<(f64, f64)> = t
        .messages
        .iter()
        .enumerate()
        .map(|(i, &m)| (at(i), m as f64 * per_s))
        .collect();
    let appends: Vec<(f64, f64)> = t
        .appends
        .iter()
        .enumerate()
        .map(|(i, &m)| (at(i), m as f64 * per_s))
        .collect();
    let heals: Vec<(f64, f64)> = t
        .heals
        .iter()
        .filter_map(|(h, c)| c.map(|c| (*h as f64 / 1000.0, c as f64)))
        .collect();
    let mut o = String::new();
    o.push_str(&line_chart(
        "Divergence between nodes (shaded: partitions; dashed: crashes, final heal)",
        "(node, missing event) pairs",
        &[Series::new("missing", "#c0392b", divergence)],
        &bands,
        &marks,
        x_max,
    ));
    o.push_str(&seats_chart(r, &bands, x_max));
    o.push_str(&bar_chart(
        "Convergence after each heal",
        "heal at virtual time (s)",
        "virtual ms to converge",
        &heals,
        x_max,
    ));
    o.push_str(&line_chart(
        "Traffic",
        "per second",
        &[
            Series::new("kB/s", "#2c7fb8", kbytes),
            Series::new("messages/s", "#7fcdbb", msgs),
            Series::new("appends/s", "#d95f0e", appends),
        ],
        &bands,
        &[],
        x_max,
    ));
    o
}

/// The whole page.
pub fn report(outcome: &Outcome) -> String {
    let mut o = String::new();
    o.push_str(
        "<!doctype html><html><head><meta charset=\"utf-8\"><title>weftlog simulation report</title><style>\
         body{font-family:sans-serif;margin:24px;max-width:940px;color:#222}\
         table{border-collapse:collapse;margin:8px 0 16px}\
         td,th{border:1px solid #ccc;padding:3px 8px;font-size:13px;text-align:left;vertical-align:top}\
         table.kv th{background:#f3f3f3;width:190px}\
         .fail{color:#b00;font-weight:bold}.ok{color:#080;font-weight:bold}\
         code{background:#f3f3f3;padding:1px 4px}svg{display:block;margin:8px 0 18px}\
         p.caption{font-size:13px;color:#444;margin:-12px 0 18px}\
         </style></head><body><h1>weftlog simulation report</h1>",
    );
    let _ = write!(
        o,
        "<p>{} scenario(s), {} seed(s): {}</p>",
        outcome.summaries.len(),
        outcome.runs.len(),
        if outcome.failed() {
            "<span class=\"fail\">oracles violated</span>"
        } else {
            "<span class=\"ok\">every oracle held</span>"
        }
    );
    for s in &outcome.summaries {
        let runs: Vec<&RunReport> = outcome
            .runs
            .iter()
            .filter(|r| r.scenario == s.scenario)
            .collect();
        let _ = write!(o, "<h2>{}</h2>", esc(&s.scenario));
        o.push_str(&summary_table(s));
        if !s.failures.is_empty() {
            o.push_str("<h3 class=\"fail\">Failing seeds</h3><ul>");
            for f in &s.failures {
                let _ = write!(
                    o,
                    "<li>seed {}: <code>{}</code><ul>",
                    f.seed,
                    esc(&f.replay)
                );
                for v in &f.violations {
                    let _ = write!(
                        o,
                        "<li>[{}] at {} ms: {}</li>",
                        esc(&v.oracle),
                        v.at_ms,
                        esc(&v.detail)
                    );
                }
                o.push_str("</ul></li>");
            }
            o.push_str("</ul>");
        }
        // Plot the first failing seed, or the one with the most heals.
        let featured = runs.iter().find(|r| !r.passed()).or_else(|| {
            runs.iter()
                .max_by_key(|r| (r.timeline.heals.len(), std::cmp::Reverse(r.seed)))
        });
        if let Some(r) = featured {
            let _ = write!(
                o,
                "<h3>Seed {} ({} events, {} faults)</h3><p>Replay: <code>{}</code></p>",
                r.seed,
                r.events,
                r.faults.values().sum::<u64>(),
                esc(&r.replay)
            );
            o.push_str(&run_plots(r));
        }
        let all: Vec<u64> = runs
            .iter()
            .flat_map(|r| r.convergence_ms.iter().copied())
            .collect();
        o.push_str(&histogram("Convergence after heal, all seeds", &all));
        o.push_str(
            "<table><tr><th>seed</th><th>events</th><th>faults</th><th>conflicts</th>\
             <th>convergence p50 / max (ms)</th><th>oversell refused</th><th>trace hash</th><th>result</th></tr>",
        );
        for r in &runs {
            let (p50, _, max) = percentiles(&r.convergence_ms);
            let _ = write!(
                o,
                "<tr><td>{}</td><td>{}</td><td>{}</td><td>{}</td><td>{p50} / {max}</td><td>{}</td><td><code>{}</code></td><td>{}</td></tr>",
                r.seed,
                r.events,
                r.faults.values().sum::<u64>(),
                r.conflicts,
                r.oversell_refused,
                esc(r.trace_hash.get(..16).unwrap_or("")),
                if r.passed() {
                    "<span class=\"ok\">ok</span>".to_string()
                } else {
                    format!("<span class=\"fail\">{} violations</span>", r.violations.len())
                }
            );
        }
        o.push_str("</table>");
    }
    o.push_str("</body></html>\n");
    o
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::report::Timeline;

    fn run(seats: Vec<Seats>) -> RunReport {
        RunReport {
            scenario: "venue".into(),
            virtual_ms: 2000,
            timeline: Timeline {
                sample_ms: 1000,
                divergence: vec![0, 0],
                bytes: vec![0, 0],
                messages: vec![0, 0],
                appends: vec![0, 0],
                connections: vec![0, 0],
                seats,
                ..Timeline::default()
            },
            ..RunReport::default()
        }
    }

    #[test]
    fn the_seats_chart_shows_only_for_a_run_with_escrow_counters() {
        assert!(!run_plots(&run(Vec::new())).contains("Seats over time"));
        let seats = |at_ms, sold, oversold, compensated| Seats {
            at_ms,
            sold,
            capacity: 10,
            oversold,
            compensated,
        };
        let page = run_plots(&run(vec![seats(1000, 11, 1, 0), seats(2000, 12, 2, 2)]));
        assert!(page.contains("Seats over time"), "{page}");
        assert!(
            page.contains("At the end: 12 sold of 10, 2 oversold, 2 compensated."),
            "{page}"
        );
        // Four lines: sold, capacity (dashed), oversold, compensated.
        assert_eq!(page.matches("stroke-dasharray=\"6,4\"").count(), 1);
    }
}
