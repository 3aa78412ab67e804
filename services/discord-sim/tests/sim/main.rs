//! Integration tests: the simulator on real sockets (port 0), driven by raw websocket / HTTP
//! clients and by serenity, an independent Discord client.

// Test code: a panic here (unwrap, expect, an index or an overflow) is a failed test.
#![allow(
    clippy::unwrap_used,
    clippy::expect_used,
    clippy::panic,
    clippy::indexing_slicing,
    clippy::string_slice,
    clippy::arithmetic_side_effects
)]

mod helpers;

mod control;
mod faults;
mod gateway;
mod oauth;
mod ratelimit;
mod rest;
mod serenity_gateway;
mod serenity_http;
