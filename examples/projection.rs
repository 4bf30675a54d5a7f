//! A user-defined ordered projection, end to end: open a node in a
//! temporary directory, append a few registrations, run the projection
//! and print it. The first two registrants of each session, in canonical
//! order, get the early price; the projection is the same on every replica
//! that holds the same events, whatever order they arrived in.
//!
//! ```text
//! cargo run --example projection
//! ```

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::Duration;

use weftlog::projections::Projections;
use weftlog::{node, Node};
use weftlog_proto::projection::Projection;
use weftlog_proto::state::Draft;
use weftlog_proto::{Event, EventId, Meta};

/// Early-price seats per session.
const EARLY: usize = 2;

/// Per session: who registered, in canonical order, and whether early.
struct EarlyBirds;

impl Projection for EarlyBirds {
    type State = BTreeMap<String, Vec<String>>;
    type View = BTreeMap<String, Vec<(String, &'static str)>>;

    fn name(&self) -> &str {
        "early_birds"
    }

    fn version(&self) -> u32 {
        1
    }

    fn apply(&self, state: &mut Self::State, event: &Event, _id: &EventId) {
        if event.kind == "Registered" {
            let who = event.meta.user.clone().unwrap_or_default();
            state.entry(event.stream.clone()).or_default().push(who);
        }
    }

    fn view(&self, state: &Self::State) -> Self::View {
        let price = |i: usize| if i < EARLY { "early" } else { "regular" };
        let priced = |v: &Vec<String>| {
            v.iter()
                .enumerate()
                .map(|(i, w)| (w.clone(), price(i)))
                .collect()
        };
        state.iter().map(|(s, v)| (s.clone(), priced(v))).collect()
    }
}

fn main() -> anyhow::Result<()> {
    let dir = tempfile::tempdir()?;
    node::init(dir.path())?;
    let (node, _) = Node::open(dir.path())?;
    let node = Arc::new(node);
    for (session, user) in [(7, "ada"), (7, "grace"), (8, "alan"), (7, "edsger")] {
        node.append(Draft {
            stream: format!("session/{session}"),
            kind: "Registered".into(),
            meta: Meta {
                command_id: None,
                user: Some(user.into()),
            },
            ..Draft::default()
        })?;
    }
    // The shipped projections start with it; ours is registered, replayed
    // from the log, then fed live.
    let projections = Projections::start(&node);
    projections.register(EarlyBirds)?;
    let shown = loop {
        match projections.get_json("early_birds") {
            Some(v) if v["lag"] == 0 && v["position"] == 4 => break v,
            _ => std::thread::sleep(Duration::from_millis(10)),
        }
    };
    println!("{}", serde_json::to_string_pretty(&shown)?);
    let counts = projections.get_json("kind_counts");
    println!(
        "kind_counts: {}",
        counts.map_or("-".into(), |v| v["view"].to_string())
    );
    Ok(())
}
