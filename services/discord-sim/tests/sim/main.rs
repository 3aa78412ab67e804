//! Integration tests: the simulator on real sockets (port 0), driven by raw websocket / HTTP
//! clients and by serenity, an independent Discord client.

mod helpers;

mod control;
mod faults;
mod gateway;
mod oauth;
mod ratelimit;
mod rest;
mod serenity_gateway;
mod serenity_http;
