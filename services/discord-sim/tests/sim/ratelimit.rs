//! Rate-limit headers and 429 semantics.

use std::time::Duration;

use discord_sim::{seed, SimConfig};
use reqwest::Method;
use serde_json::json;

use crate::helpers::*;

fn limited(route_limit: u32, global: u32) -> SimConfig {
    let mut c = test_config();
    c.rate_limits.route_limit = route_limit;
    c.rate_limits.route_window = Duration::from_secs(30);
    c.rate_limits.global_per_second = global;
    c
}

#[tokio::test]
async fn every_response_carries_bucket_headers_and_the_bucket_runs_out_with_a_user_scope_429() {
    let sim = start(limited(2, 50)).await;
    let path = format!("/guilds/{}/roles", seed::GUILD_ID);
    let (s1, h1, _) = api(&sim, Method::GET, &path, None).await;
    assert_eq!(s1, 200);
    assert_eq!(header(&h1, "x-ratelimit-limit"), "2");
    assert_eq!(header(&h1, "x-ratelimit-remaining"), "1");
    assert!(!header(&h1, "x-ratelimit-bucket").is_empty());
    let reset_after: f64 = header(&h1, "x-ratelimit-reset-after")
        .parse()
        .expect("float");
    assert!(reset_after > 29.0 && reset_after <= 30.0, "{reset_after}");
    let reset: f64 = header(&h1, "x-ratelimit-reset").parse().expect("epoch");
    assert!(reset > 1.7e9);
    let (_, h2, _) = api(&sim, Method::GET, &path, None).await;
    assert_eq!(header(&h2, "x-ratelimit-remaining"), "0");
    let (s3, h3, body) = api(&sim, Method::GET, &path, None).await;
    assert_eq!(s3, 429);
    assert_eq!(header(&h3, "x-ratelimit-scope"), "user");
    assert!(h3.get("x-ratelimit-global").is_none());
    assert_eq!(body["global"], false);
    assert_eq!(body["message"], "You are being rate limited.");
    let retry = body["retry_after"].as_f64().expect("retry_after");
    assert!(retry > 0.0 && retry <= 30.0);
    assert!(header(&h3, "retry-after").parse::<u64>().expect("secs") >= 1);
    // Another guild (major parameter) has its own bucket.
    let other = sim.create_guild("other").expect("guild");
    let (s, _, _) = api(&sim, Method::GET, &format!("/guilds/{other}/roles"), None).await;
    assert_eq!(s, 200);
    sim.shutdown().await;
}

#[tokio::test]
async fn routes_sharing_a_bucket_id_share_the_remaining_count() {
    let sim = start(limited(3, 50)).await;
    let g = seed::GUILD_ID;
    let (_, _, role) = api(
        &sim,
        Method::POST,
        &format!("/guilds/{g}/roles"),
        Some(json!({"name": "r"})),
    )
    .await;
    let rid = role["id"].as_str().expect("id").to_owned();
    let alice = seed::USERS[0].0;
    let path = format!("/guilds/{g}/members/{alice}/roles/{rid}");
    let (_, put, _) = api(&sim, Method::PUT, &path, None).await;
    let (_, del, _) = api(&sim, Method::DELETE, &path, None).await;
    assert_eq!(
        header(&put, "x-ratelimit-bucket"),
        header(&del, "x-ratelimit-bucket")
    );
    assert_eq!(header(&put, "x-ratelimit-remaining"), "2");
    assert_eq!(header(&del, "x-ratelimit-remaining"), "1");
    let (_, get, _) = api(&sim, Method::GET, &format!("/guilds/{g}/roles"), None).await;
    assert_ne!(
        header(&get, "x-ratelimit-bucket"),
        header(&put, "x-ratelimit-bucket")
    );
    sim.shutdown().await;
}

#[tokio::test]
async fn the_global_limit_answers_429_with_global_headers() {
    let sim = start(limited(100, 3)).await;
    let mut last = None;
    for _ in 0..4 {
        last = Some(
            api(
                &sim,
                Method::GET,
                &format!("/guilds/{}/channels", seed::GUILD_ID),
                None,
            )
            .await,
        );
    }
    let (status, h, body) = last.expect("responses");
    assert_eq!(status, 429);
    assert_eq!(header(&h, "x-ratelimit-global"), "true");
    assert_eq!(header(&h, "x-ratelimit-scope"), "global");
    assert_eq!(body["global"], true);
    sim.shutdown().await;
}

#[tokio::test]
async fn invalid_requests_are_counted_and_past_the_limit_everything_is_403() {
    let mut c = limited(100, 50);
    c.rate_limits.invalid_request_limit = 3;
    let sim = start(c).await;
    for _ in 0..3 {
        let resp = http()
            .get(format!("{}/guilds/{}/roles", sim.api_url(), seed::GUILD_ID))
            .send()
            .await
            .expect("get");
        assert_eq!(resp.status(), 401);
    }
    assert_eq!(sim.invalid_request_count(), 3);
    let (status, _, body) = api(
        &sim,
        Method::GET,
        &format!("/guilds/{}/roles", seed::GUILD_ID),
        None,
    )
    .await;
    assert_eq!(status, 403, "{body}");
    sim.reset_rate_limits();
    let (status, _, _) = api(
        &sim,
        Method::GET,
        &format!("/guilds/{}/roles", seed::GUILD_ID),
        None,
    )
    .await;
    assert_eq!(status, 200);
    sim.shutdown().await;
}

#[tokio::test]
async fn a_bucket_resets_after_its_window() {
    let mut c = limited(1, 50);
    c.rate_limits.route_window = Duration::from_secs(1);
    let sim = start(c).await;
    let path = format!("/guilds/{}/roles", seed::GUILD_ID);
    assert_eq!(api(&sim, Method::GET, &path, None).await.0, 200);
    let (status, h, _) = api(&sim, Method::GET, &path, None).await;
    assert_eq!(status, 429);
    let wait: f64 = header(&h, "x-ratelimit-reset-after")
        .parse()
        .expect("float");
    tokio::time::sleep(Duration::from_secs_f64(wait + 0.05)).await; // honouring Reset-After is the behaviour under test
    assert_eq!(api(&sim, Method::GET, &path, None).await.0, 200);
    sim.shutdown().await;
}
