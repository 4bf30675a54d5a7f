//! Events relay through a node that did not write them: A's events reach C
//! through B's export, keep A's signatures, and all three converge.

mod common;

use common::weftlog;
use serde_json::Value;

fn ok(data: &std::path::Path, args: &[&str]) -> Value {
    let r = weftlog(data, args);
    assert_eq!(r.code, Some(0), "weftlog {args:?}: {}", r.stderr);
    serde_json::from_str(r.stdout.lines().last().unwrap_or("null")).unwrap()
}

#[test]
fn events_relay_through_a_third_node_and_all_converge() {
    let tmp = tempfile::tempdir().unwrap();
    let [a, b, c] = ["a", "b", "c"].map(|n| tmp.path().join(n));
    for d in [&a, &b, &c] {
        ok(d, &["init"]);
    }
    let file = |name: &str| tmp.path().join(name).to_str().unwrap().to_string();
    // A writes a record and seats in three separate commits.
    ok(
        &a,
        &[
            "append",
            "--stream",
            "customer/1",
            "--kind",
            "Registered",
            "--set",
            "name=\"Ada\"",
        ],
    );
    ok(
        &a,
        &[
            "append",
            "--stream",
            "event/1",
            "--kind",
            "SeatsOpened",
            "--escrow-init",
            "seats=10",
        ],
    );
    ok(
        &a,
        &[
            "append",
            "--stream",
            "event/1",
            "--kind",
            "SeatsSold",
            "--escrow-consume",
            "seats=2",
        ],
    );
    // A -> B; B adds its own edit; B -> C (carrying A's events).
    ok(&a, &["export", "--out", &file("a.weft")]);
    assert_eq!(ok(&b, &["import", &file("a.weft")])["imported"], 3);
    ok(
        &b,
        &[
            "append",
            "--stream",
            "customer/1",
            "--kind",
            "Noted",
            "--set",
            "note=\"vip\"",
        ],
    );
    ok(&b, &["export", "--out", &file("b.weft")]);
    assert_eq!(ok(&c, &["import", &file("b.weft")])["imported"], 4);
    // C -> A closes the loop: A only lacks B's event.
    std::fs::write(file("a.status"), weftlog(&a, &["status"]).stdout).unwrap();
    ok(
        &c,
        &[
            "export",
            "--since",
            &file("a.status"),
            "--out",
            &file("c.weft"),
        ],
    );
    let r = ok(&a, &["import", &file("c.weft")]);
    assert_eq!(
        (r["imported"].as_u64(), r["duplicates"].as_u64()),
        (Some(1), Some(0))
    );
    let hashes: Vec<Value> = [&a, &b, &c]
        .map(|d| ok(d, &["status"])["state_hash"].clone())
        .into();
    assert!(hashes.windows(2).all(|w| w[0] == w[1]), "{hashes:?}");
    let got = ok(&c, &["get", "--stream", "customer/1"]);
    assert_eq!(got["fields"]["name"]["value"], "Ada");
    assert_eq!(got["fields"]["note"]["value"], "vip");
    assert_eq!(
        ok(&c, &["get", "--stream", "event/1"])["escrow"]["seats"]["consumed"],
        2
    );
}
