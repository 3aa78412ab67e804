//! The container health probe (`<service> healthcheck`, used by docker-compose) follows readiness:
//! a service that serves HTTP but is not ready (NATS down, gateway off, draining) is unhealthy.

// Test code: a panic here (unwrap, expect, an index or an overflow) is a failed test.
#![allow(
    clippy::unwrap_used,
    clippy::expect_used,
    clippy::panic,
    clippy::indexing_slicing,
    clippy::string_slice,
    clippy::arithmetic_side_effects
)]

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;

use actix_web::{web, App, HttpServer};
use prometheus_client::registry::Registry;
use voicerooms_platform::ops::{probe, routes, Ops};

#[actix_web::test]
async fn the_probe_fails_while_the_service_is_alive_but_not_ready() {
    let ready = Arc::new(AtomicBool::new(false));
    let flag = ready.clone();
    let ops = web::Data::new(
        Ops::new("probe-test", "i1".into(), Registry::default()).with_check("nats", move || {
            if flag.load(Ordering::SeqCst) {
                Ok(())
            } else {
                Err("not connected".into())
            }
        }),
    );
    let server = HttpServer::new(move || App::new().app_data(ops.clone()).configure(routes))
        .workers(1)
        .bind(("127.0.0.1", 0))
        .unwrap();
    let port = server.addrs()[0].port();
    let server = server.run();
    let handle = server.handle();
    let running = actix_web::rt::spawn(server);

    let not_ready = actix_web::rt::task::spawn_blocking(move || probe(port))
        .await
        .unwrap();
    let err = not_ready.expect_err("alive (healthz 200) but not ready: the probe must fail");
    assert!(err.to_string().contains("503"), "{err}");

    ready.store(true, Ordering::SeqCst);
    actix_web::rt::task::spawn_blocking(move || probe(port))
        .await
        .unwrap()
        .expect("ready: the probe passes");

    handle.stop(true).await;
    running.await.unwrap().unwrap();
}
