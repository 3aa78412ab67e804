//! The benchmark runs end to end (a few seconds): every process starts, players log in through
//! the simulator's OAuth, rooms are created and joined, clients subscribe, and every voice change
//! made at the simulator reaches every client of its room, with the clients in this process or
//! split over worker processes. Figures are not checked here
//! (benchmarks are not timed tests).

// Test code: a panic here is a failed test.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use std::process::Command;

/// The service binaries' directory of this build (built first when missing).
fn bin_dir() -> std::path::PathBuf {
    let mut dir = None;
    for name in ["discord-sim", "gateway-listener", "room-manager", "edge"] {
        dir = ops_e2e::bin(name).parent().map(|d| d.to_path_buf());
    }
    dir.expect("binary directory")
}

fn run_bench(extra: &[&str]) -> String {
    let out = Command::new(env!("CARGO_BIN_EXE_vr-bench"))
        .args(["--players", "3", "--rooms", "2", "--clients", "6"])
        .args(["--rate", "20", "--seconds", "2"])
        .args(extra)
        .arg("--bin-dir")
        .arg(bin_dir())
        .output()
        .expect("running vr-bench");
    let stdout = String::from_utf8_lossy(&out.stdout).into_owned();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "vr-bench failed:\n{stdout}\n{stderr}");
    assert!(
        stdout.contains("frames: 120 of 120 delivered, 0 lost"),
        "{stdout}\n{stderr}"
    );
    assert!(
        stdout.contains("latency change request → client read"),
        "{stdout}"
    );
    assert!(stdout.contains("CPU (cores over"), "{stdout}");
    stdout
}

#[test]
fn a_small_run_delivers_every_change_to_every_client() {
    run_bench(&[]);
}

#[test]
fn clients_split_over_worker_processes_and_edges_receive_every_change() {
    let stdout = run_bench(&["--workers", "2", "--edges", "2"]);
    assert!(stdout.contains("from 2 client process(es)"), "{stdout}");
    assert!(stdout.contains("0 duplicated, 0 reordered"), "{stdout}");
    assert!(stdout.contains("client workers: RSS"), "{stdout}");
}
