//! Fidelity: serenity's HTTP client performs voicerooms' REST calls against the simulator and
//! gets Discord-shaped successes and errors.

use std::time::Duration;

use discord_sim::{seed, RestFault, RestFaultKind};
use serenity::all::{
    AddMember, ChannelId, ChannelType, CreateChannel, EditRole, GuildId, Http, HttpBuilder,
    HttpError, PermissionOverwrite, PermissionOverwriteType, Permissions, RoleId, UserId,
};

use crate::helpers::*;

fn serenity_http(sim: &discord_sim::SimHandle) -> Http {
    HttpBuilder::new(&sim.config().bot_token)
        .proxy(sim.http_url())
        .ratelimiter_disabled(true)
        .build()
}

/// (HTTP status, Discord JSON code) of a serenity error.
fn discord_error(e: serenity::Error) -> (u16, isize) {
    match e {
        serenity::Error::Http(HttpError::UnsuccessfulRequest(r)) => {
            (r.status_code.as_u16(), r.error.code)
        }
        other => panic!("expected a Discord error response, got {other:?}"),
    }
}

#[tokio::test]
async fn serenity_creates_a_private_voice_room_adds_a_member_and_moves_them() {
    let sim = start_default().await;
    let http = serenity_http(&sim);
    let guild = GuildId::new(seed::GUILD_ID);
    let role = guild
        .create_role(&http, EditRole::new().name("room-1"))
        .await
        .expect("role");
    let everyone = RoleId::new(seed::GUILD_ID);
    let channel = guild
        .create_channel(
            &http,
            CreateChannel::new("room-1")
                .kind(ChannelType::Voice)
                .user_limit(4)
                .permissions([
                    PermissionOverwrite {
                        allow: Permissions::empty(),
                        deny: Permissions::VIEW_CHANNEL | Permissions::CONNECT,
                        kind: PermissionOverwriteType::Role(everyone),
                    },
                    PermissionOverwrite {
                        allow: Permissions::VIEW_CHANNEL | Permissions::CONNECT,
                        deny: Permissions::empty(),
                        kind: PermissionOverwriteType::Role(role.id),
                    },
                ]),
        )
        .await
        .expect("channel");
    assert_eq!(channel.kind, ChannelType::Voice);
    assert_eq!(channel.user_limit, Some(4));
    assert_eq!(channel.permission_overwrites.len(), 2);

    // A new player logs in with OAuth2 and is added with the room role.
    let frank = sim.create_user("frank").expect("user");
    let token = access_token(&sim, frank).await;
    let member = guild
        .add_member(&http, frank, AddMember::new(token.clone()).roles([role.id]))
        .await
        .expect("add");
    assert_eq!(member.expect("201 with the member").roles, vec![role.id]);
    let again = guild
        .add_member(&http, frank, AddMember::new(token))
        .await
        .expect("add again");
    assert!(again.is_none(), "204 when already a member");

    // Not in voice: Discord refuses the move with 40032.
    let err = guild
        .move_member(&http, frank, channel.id)
        .await
        .expect_err("not in voice");
    assert_eq!(discord_error(err), (400, 40032));

    // The player joins the lobby by themself, the bot moves them into the room.
    sim.connect_voice(frank, seed::LOBBY_CHANNEL_ID)
        .expect("join lobby");
    guild
        .move_member(&http, frank, channel.id)
        .await
        .expect("moved");
    assert_eq!(
        sim.voice_channel_of(frank),
        Some((seed::GUILD_ID, channel.id.get()))
    );
    guild
        .disconnect_member(&http, frank)
        .await
        .expect("disconnected");
    assert_eq!(sim.voice_channel_of(frank), None);

    let fetched = guild
        .member(&http, UserId::new(frank))
        .await
        .expect("member");
    assert_eq!(fetched.user.name, "frank");
    assert!(guild
        .channels(&http)
        .await
        .expect("channels")
        .contains_key(&channel.id));
    assert!(guild
        .roles(&http)
        .await
        .expect("roles")
        .contains_key(&role.id));

    http.remove_member_role(guild, UserId::new(frank), role.id, None)
        .await
        .expect("role removed");
    http.add_member_role(guild, UserId::new(frank), role.id, None)
        .await
        .expect("role added");
    channel.id.delete(&http).await.expect("channel deleted");
    guild
        .delete_role(&http, role.id)
        .await
        .expect("role deleted");
    sim.shutdown().await;
}

#[tokio::test]
async fn serenity_sees_discord_errors_for_unknown_channels_missing_permissions_and_access() {
    let sim = start_default().await;
    let http = serenity_http(&sim);
    let err = http
        .get_channel(ChannelId::new(42))
        .await
        .expect_err("unknown");
    assert_eq!(discord_error(err), (404, 10003));

    sim.set_bot_permissions(seed::GUILD_ID, 0)
        .expect("strip the bot");
    let err = GuildId::new(seed::GUILD_ID)
        .create_channel(&http, CreateChannel::new("x").kind(ChannelType::Voice))
        .await
        .expect_err("no MANAGE_CHANNELS");
    assert_eq!(discord_error(err), (403, 50013));

    let other = sim
        .create_guild_with(None, "not ours", false)
        .expect("guild");
    let err = GuildId::new(other)
        .channels(&http)
        .await
        .expect_err("not a member");
    assert_eq!(discord_error(err), (403, 50001));
    sim.shutdown().await;
}

#[tokio::test]
async fn serenity_gets_a_429_when_a_bucket_is_exhausted() {
    let mut config = test_config();
    config.rate_limits.route_limit = 1;
    config.rate_limits.route_window = Duration::from_secs(30);
    let sim = start(config).await;
    let http = serenity_http(&sim);
    let guild = GuildId::new(seed::GUILD_ID);
    guild.roles(&http).await.expect("first");
    let err = guild.roles(&http).await.expect_err("limited");
    assert_eq!(discord_error(err).0, 429);

    sim.reset_rate_limits();
    sim.inject_rest_fault(RestFault {
        kind: RestFaultKind::Status(502),
        remaining: 1,
        path_contains: None,
    })
    .expect("fault");
    let err = guild.roles(&http).await.expect_err("502");
    match err {
        serenity::Error::Http(HttpError::UnsuccessfulRequest(r)) => {
            assert_eq!(r.status_code.as_u16(), 502)
        }
        other => panic!("{other:?}"),
    }
    guild.roles(&http).await.expect("fault used up");
    sim.shutdown().await;
}
