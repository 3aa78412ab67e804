//! The benchmark runs end to end (a few seconds): every process starts, players log in through
//! the simulator's OAuth, rooms are created and joined, clients subscribe, and every voice change
//! made at the simulator reaches every client of its room. Figures are not checked here
//! (benchmarks are not timed tests).

// Test code: a panic here is a failed test.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use std::process::Command;

#[test]
fn a_small_run_delivers_every_change_to_every_client() {
    // The service binaries of this build (built first when missing).
    let mut dir = None;
    for name in ["discord-sim", "gateway-listener", "room-manager", "edge"] {
        dir = ops_e2e::bin(name).parent().map(|d| d.to_path_buf());
    }
    let out = Command::new(env!("CARGO_BIN_EXE_vr-bench"))
        .args(["--players", "3", "--rooms", "2", "--clients", "6"])
        .args(["--rate", "20", "--seconds", "2"])
        .arg("--bin-dir")
        .arg(dir.expect("binary directory"))
        .output()
        .expect("running vr-bench");
    let stdout = String::from_utf8_lossy(&out.stdout);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "vr-bench failed:\n{stdout}\n{stderr}");
    assert!(
        stdout.contains("frames: 120 of 120 delivered, 0 lost"),
        "{stdout}\n{stderr}"
    );
    assert!(
        stdout.contains("latency change request → client read: p50"),
        "{stdout}"
    );
    assert!(stdout.contains("CPU (cores over"), "{stdout}");
}
