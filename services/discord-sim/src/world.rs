//! The simulated Discord world: users, guilds, roles, channels, members and voice states.
//!
//! Every mutation returns the gateway dispatches it causes, so REST, the control API and the
//! load generator all produce the same events (one consistent world).

use std::collections::{BTreeMap, HashMap};

use serde::Deserialize;
use serde_json::{json, Value};

use crate::config::{intents, perms};
use crate::error::SimError;
use crate::util::{iso8601, set, unix_ms};

/// Discord channel types the simulator knows.
pub mod channel_type {
    pub const GUILD_TEXT: u8 = 0;
    pub const GUILD_VOICE: u8 = 2;
    pub const GUILD_CATEGORY: u8 = 4;
    pub const GUILD_STAGE_VOICE: u8 = 13;
}

/// A gateway event produced by a world change, before sequence numbers are assigned.
#[derive(Debug, Clone)]
pub struct Dispatch {
    pub t: &'static str,
    pub d: Value,
    /// Intent a session needs to receive it (0 = always).
    pub intent: u64,
    pub guild_id: Option<u64>,
}

#[derive(Debug, Clone)]
pub struct User {
    pub id: u64,
    pub username: String,
    pub global_name: Option<String>,
    pub bot: bool,
}

#[derive(Debug, Clone)]
pub struct Role {
    pub id: u64,
    pub name: String,
    pub permissions: u64,
    pub position: i64,
    pub color: u32,
    pub hoist: bool,
    pub mentionable: bool,
    pub managed: bool,
}

/// A permission overwrite: `kind` 0 = role, 1 = member.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Overwrite {
    pub id: u64,
    pub kind: u8,
    pub allow: u64,
    pub deny: u64,
}

#[derive(Debug, Clone)]
pub struct Channel {
    pub id: u64,
    pub guild_id: u64,
    pub kind: u8,
    pub name: String,
    pub position: i64,
    pub parent_id: Option<u64>,
    pub user_limit: u32,
    pub bitrate: u32,
    pub overwrites: Vec<Overwrite>,
}

impl Channel {
    pub fn is_voice(&self) -> bool {
        matches!(
            self.kind,
            channel_type::GUILD_VOICE | channel_type::GUILD_STAGE_VOICE
        )
    }
}

#[derive(Debug, Clone)]
pub struct Member {
    pub user_id: u64,
    pub roles: Vec<u64>,
    pub nick: Option<String>,
    pub joined_at_ms: u64,
    pub mute: bool,
    pub deaf: bool,
}

#[derive(Debug, Clone, Default)]
pub struct VoiceState {
    pub user_id: u64,
    pub channel_id: u64,
    pub session_id: String,
    pub self_mute: bool,
    pub self_deaf: bool,
    pub self_stream: bool,
    pub self_video: bool,
    pub suppress: bool,
}

#[derive(Debug, Clone)]
pub struct Guild {
    pub id: u64,
    pub name: String,
    pub owner_id: u64,
    /// Whether the bot is in this guild (REST answers 50001 Missing Access when not).
    pub bot_member: bool,
    pub roles: BTreeMap<u64, Role>,
    pub channels: BTreeMap<u64, Channel>,
    pub members: BTreeMap<u64, Member>,
    pub voice: BTreeMap<u64, VoiceState>,
    pub created_ms: u64,
}

/// Optional voice flag changes (`None` = unchanged).
#[derive(Debug, Clone, Default, Deserialize)]
pub struct VoiceFlags {
    pub self_mute: Option<bool>,
    pub self_deaf: Option<bool>,
    pub self_stream: Option<bool>,
    pub self_video: Option<bool>,
    pub mute: Option<bool>,
    pub deaf: Option<bool>,
}

/// What a new channel looks like (REST body or control request).
#[derive(Debug, Clone)]
pub struct ChannelSpec {
    pub id: Option<u64>,
    pub name: String,
    pub kind: u8,
    pub parent_id: Option<u64>,
    pub user_limit: u32,
    pub bitrate: Option<u32>,
    pub position: Option<i64>,
    pub overwrites: Vec<Overwrite>,
}

/// Changes to a channel (`PATCH /channels/{c}`).
#[derive(Debug, Clone, Default)]
pub struct ChannelPatch {
    pub name: Option<String>,
    pub user_limit: Option<u32>,
    pub parent_id: Option<Option<u64>>,
    pub position: Option<i64>,
    pub overwrites: Option<Vec<Overwrite>>,
    pub bitrate: Option<u32>,
}

/// Who is making a voice change: the user themself (checks permissions and user_limit), or a
/// moderator / the bot (MOVE_MEMBERS bypasses user_limit; the bot is not checked per channel).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Actor {
    User,
    Moderator,
}

pub type Outcome<T> = Result<(T, Vec<Dispatch>), SimError>;

/// Discord's per-guild maxima (errors 30013 and 30005).
pub const MAX_CHANNELS_PER_GUILD: usize = 500;
pub const MAX_ROLES_PER_GUILD: usize = 250;

/// Fixed ids of the default seeded world (the binary and tests rely on them).
pub mod seed {
    pub const GUILD_ID: u64 = 200_000_000_000_000_001;
    pub const LOBBY_CHANNEL_ID: u64 = 200_000_000_000_000_101;
    pub const GAMING_CHANNEL_ID: u64 = 200_000_000_000_000_102;
    pub const TEXT_CHANNEL_ID: u64 = 200_000_000_000_000_103;
    pub const BOT_ROLE_ID: u64 = 200_000_000_000_000_201;
    /// alice, bob, carol, dave, erin.
    pub const USERS: [(u64, &str); 5] = [
        (300_000_000_000_000_001, "alice"),
        (300_000_000_000_000_002, "bob"),
        (300_000_000_000_000_003, "carol"),
        (300_000_000_000_000_004, "dave"),
        (300_000_000_000_000_005, "erin"),
    ];
}

pub struct World {
    pub users: BTreeMap<u64, User>,
    pub guilds: BTreeMap<u64, Guild>,
    /// channel id → guild id, so `/channels/{c}` finds its guild.
    pub channel_guild: HashMap<u64, u64>,
    pub bot_id: u64,
    pub bot_permissions: u64,
    next_id: u64,
    next_voice_session: u64,
}

impl World {
    pub fn new(bot_id: u64, bot_name: &str, bot_permissions: u64, id_base: u64) -> Self {
        let mut users = BTreeMap::new();
        users.insert(
            bot_id,
            User {
                id: bot_id,
                username: bot_name.to_owned(),
                global_name: None,
                bot: true,
            },
        );
        Self {
            users,
            guilds: BTreeMap::new(),
            channel_guild: HashMap::new(),
            bot_id,
            bot_permissions,
            next_id: id_base,
            next_voice_session: 1,
        }
    }

    /// Next snowflake-shaped id (monotonic, deterministic for a given seed).
    pub fn next_id(&mut self) -> u64 {
        self.next_id = self.next_id.saturating_add(1);
        self.next_id
    }

    fn id_or_next(&mut self, id: Option<u64>) -> u64 {
        match id {
            Some(id) => id,
            None => loop {
                let id = self.next_id();
                if !self.users.contains_key(&id)
                    && !self.guilds.contains_key(&id)
                    && !self.channel_guild.contains_key(&id)
                {
                    break id;
                }
            },
        }
    }

    /// Seeds the default world: one guild, the bot, alice..erin (members), a Lobby and a Gaming
    /// voice channel and a text channel.
    pub fn seed_default(&mut self) -> Result<(), SimError> {
        self.create_guild(Some(seed::GUILD_ID), "voicerooms-dev", true)?;
        for (id, name) in seed::USERS {
            self.create_user(Some(id), name)?;
            self.add_member(seed::GUILD_ID, id, &[], None)?;
        }
        for (id, name, kind) in [
            (seed::LOBBY_CHANNEL_ID, "Lobby", channel_type::GUILD_VOICE),
            (seed::GAMING_CHANNEL_ID, "Gaming", channel_type::GUILD_VOICE),
            (seed::TEXT_CHANNEL_ID, "general", channel_type::GUILD_TEXT),
        ] {
            self.create_channel(
                seed::GUILD_ID,
                ChannelSpec {
                    id: Some(id),
                    name: name.to_owned(),
                    kind,
                    parent_id: None,
                    user_limit: 0,
                    bitrate: None,
                    position: None,
                    overwrites: Vec::new(),
                },
            )?;
        }
        Ok(())
    }

    // ----- lookups -------------------------------------------------------------------------

    pub fn guild(&self, id: u64) -> Result<&Guild, SimError> {
        self.guilds.get(&id).ok_or(SimError::UnknownGuild(id))
    }

    fn guild_mut(&mut self, id: u64) -> Result<&mut Guild, SimError> {
        self.guilds.get_mut(&id).ok_or(SimError::UnknownGuild(id))
    }

    pub fn channel(&self, id: u64) -> Result<&Channel, SimError> {
        let g = self
            .channel_guild
            .get(&id)
            .ok_or(SimError::UnknownChannel(id))?;
        self.guilds
            .get(g)
            .and_then(|g| g.channels.get(&id))
            .ok_or(SimError::UnknownChannel(id))
    }

    pub fn user(&self, id: u64) -> Result<&User, SimError> {
        self.users.get(&id).ok_or(SimError::UnknownUser(id))
    }

    /// Finds a user by id (decimal) or username.
    pub fn find_user(&self, key: &str) -> Option<&User> {
        match key.parse::<u64>() {
            Ok(id) => self.users.get(&id),
            Err(_) => self.users.values().find(|u| u.username == key),
        }
    }

    /// The first non-bot user (the default OAuth login).
    pub fn first_human(&self) -> Option<&User> {
        seed::USERS
            .iter()
            .find_map(|(id, _)| self.users.get(id))
            .or_else(|| self.users.values().find(|u| !u.bot))
    }

    /// Where a user is in voice, if anywhere: (guild, state).
    pub fn voice_of(&self, user_id: u64) -> Option<(u64, &VoiceState)> {
        self.guilds
            .values()
            .find_map(|g| g.voice.get(&user_id).map(|v| (g.id, v)))
    }

    // ----- permissions ----------------------------------------------------------------------

    /// Guild-level permissions of a member (Discord's base permissions).
    pub fn base_permissions(&self, guild: &Guild, user_id: u64) -> u64 {
        if guild.owner_id == user_id {
            return u64::MAX;
        }
        let Some(member) = guild.members.get(&user_id) else {
            return 0;
        };
        let mut p = guild.roles.get(&guild.id).map_or(0, |r| r.permissions);
        for r in &member.roles {
            if let Some(role) = guild.roles.get(r) {
                p |= role.permissions;
            }
        }
        if p & perms::ADMINISTRATOR != 0 {
            u64::MAX
        } else {
            p
        }
    }

    /// Channel permissions after overwrites (@everyone, then roles, then the member).
    pub fn channel_permissions(&self, guild: &Guild, channel: &Channel, user_id: u64) -> u64 {
        let base = self.base_permissions(guild, user_id);
        if base == u64::MAX {
            return base;
        }
        let Some(member) = guild.members.get(&user_id) else {
            return 0;
        };
        let mut p = base;
        if let Some(o) = channel
            .overwrites
            .iter()
            .find(|o| o.kind == 0 && o.id == guild.id)
        {
            p = (p & !o.deny) | o.allow;
        }
        let (mut allow, mut deny) = (0, 0);
        for o in channel
            .overwrites
            .iter()
            .filter(|o| o.kind == 0 && member.roles.contains(&o.id))
        {
            allow |= o.allow;
            deny |= o.deny;
        }
        p = (p & !deny) | allow;
        if let Some(o) = channel
            .overwrites
            .iter()
            .find(|o| o.kind == 1 && o.id == user_id)
        {
            p = (p & !o.deny) | o.allow;
        }
        p
    }

    // ----- mutations ------------------------------------------------------------------------

    pub fn create_user(&mut self, id: Option<u64>, username: &str) -> Outcome<User> {
        if let Some(id) = id {
            if self.users.contains_key(&id) {
                return Err(SimError::Conflict(id));
            }
        }
        if username.is_empty() || username.len() > 32 {
            return Err(SimError::BadRequest(
                "username must be 1-32 characters".into(),
            ));
        }
        let id = self.id_or_next(id);
        let user = User {
            id,
            username: username.to_owned(),
            global_name: Some(username.to_owned()),
            bot: false,
        };
        self.users.insert(id, user.clone());
        Ok((user, Vec::new()))
    }

    pub fn create_guild(&mut self, id: Option<u64>, name: &str, bot_member: bool) -> Outcome<u64> {
        if let Some(id) = id {
            if self.guilds.contains_key(&id) {
                return Err(SimError::Conflict(id));
            }
        }
        let id = self.id_or_next(id);
        let bot_role = if id == seed::GUILD_ID {
            seed::BOT_ROLE_ID
        } else {
            self.id_or_next(None)
        };
        let now = unix_ms();
        let mut roles = BTreeMap::new();
        roles.insert(
            id,
            Role {
                id,
                name: "@everyone".into(),
                permissions: perms::EVERYONE_DEFAULT,
                position: 0,
                color: 0,
                hoist: false,
                mentionable: false,
                managed: false,
            },
        );
        let mut members = BTreeMap::new();
        if bot_member {
            roles.insert(
                bot_role,
                Role {
                    id: bot_role,
                    name: "voicerooms-bot".into(),
                    permissions: self.bot_permissions,
                    position: 1,
                    color: 0,
                    hoist: false,
                    mentionable: false,
                    managed: true,
                },
            );
            members.insert(
                self.bot_id,
                Member {
                    user_id: self.bot_id,
                    roles: vec![bot_role],
                    nick: None,
                    joined_at_ms: now,
                    mute: false,
                    deaf: false,
                },
            );
        }
        let guild = Guild {
            id,
            name: name.to_owned(),
            // The owner is a synthetic user id nobody logs in as: owners bypass every check.
            owner_id: 1,
            bot_member,
            roles,
            channels: BTreeMap::new(),
            members,
            voice: BTreeMap::new(),
            created_ms: now,
        };
        let mut events = Vec::new();
        if bot_member {
            events.push(Dispatch {
                t: "GUILD_CREATE",
                d: self.guild_json(&guild),
                intent: intents::GUILDS,
                guild_id: Some(id),
            });
        }
        self.guilds.insert(id, guild);
        Ok((id, events))
    }

    /// Adds a user to a guild; `Ok(false)` when already a member (nothing changes).
    pub fn add_member(
        &mut self,
        guild_id: u64,
        user_id: u64,
        roles: &[u64],
        nick: Option<String>,
    ) -> Outcome<bool> {
        let user = self.user(user_id)?.clone();
        let guild = self.guild(guild_id)?;
        if guild.members.contains_key(&user_id) {
            return Ok((false, Vec::new()));
        }
        if let Some(r) = roles.iter().find(|r| !guild.roles.contains_key(r)) {
            return Err(SimError::UnknownRole(*r));
        }
        let member = Member {
            user_id,
            roles: roles.to_vec(),
            nick,
            joined_at_ms: unix_ms(),
            mute: false,
            deaf: false,
        };
        let mut d = member_json(&member, &user);
        set(&mut d, "guild_id", json!(guild_id.to_string()));
        self.guild_mut(guild_id)?.members.insert(user_id, member);
        Ok((
            true,
            vec![Dispatch {
                t: "GUILD_MEMBER_ADD",
                d,
                intent: intents::GUILD_MEMBERS,
                guild_id: Some(guild_id),
            }],
        ))
    }

    pub fn create_channel(&mut self, guild_id: u64, spec: ChannelSpec) -> Outcome<Channel> {
        let guild = self.guild(guild_id)?;
        if guild.channels.len() >= MAX_CHANNELS_PER_GUILD {
            return Err(SimError::LimitReached {
                what: "guild channels",
                max: MAX_CHANNELS_PER_GUILD,
            });
        }
        if spec.name.is_empty() || spec.name.chars().count() > 100 {
            return Err(SimError::BadRequest("name must be 1-100 characters".into()));
        }
        if let Some(p) = spec.parent_id {
            match guild.channels.get(&p) {
                Some(c) if c.kind == channel_type::GUILD_CATEGORY => {}
                _ => {
                    return Err(SimError::BadRequest(format!(
                        "parent_id {p} is not a category"
                    )))
                }
            }
        }
        if let Some(id) = spec.id {
            if self.channel_guild.contains_key(&id) {
                return Err(SimError::Conflict(id));
            }
        }
        let position = spec.position.unwrap_or(guild.channels.len() as i64);
        let id = self.id_or_next(spec.id);
        let channel = Channel {
            id,
            guild_id,
            kind: spec.kind,
            name: spec.name,
            position,
            parent_id: spec.parent_id,
            user_limit: spec.user_limit,
            bitrate: spec.bitrate.unwrap_or(64_000),
            overwrites: spec.overwrites,
        };
        self.channel_guild.insert(id, guild_id);
        self.guild_mut(guild_id)?
            .channels
            .insert(id, channel.clone());
        let d = channel_json(&channel);
        Ok((
            channel,
            vec![Dispatch {
                t: "CHANNEL_CREATE",
                d,
                intent: intents::GUILDS,
                guild_id: Some(guild_id),
            }],
        ))
    }

    pub fn update_channel(&mut self, channel_id: u64, patch: ChannelPatch) -> Outcome<Channel> {
        let guild_id = self.channel(channel_id)?.guild_id;
        if let Some(name) = &patch.name {
            if name.is_empty() || name.chars().count() > 100 {
                return Err(SimError::BadRequest("name must be 1-100 characters".into()));
            }
        }
        let guild = self.guild_mut(guild_id)?;
        let c = guild
            .channels
            .get_mut(&channel_id)
            .ok_or(SimError::UnknownChannel(channel_id))?;
        if let Some(v) = patch.name {
            c.name = v;
        }
        if let Some(v) = patch.user_limit {
            c.user_limit = v;
        }
        if let Some(v) = patch.parent_id {
            c.parent_id = v;
        }
        if let Some(v) = patch.position {
            c.position = v;
        }
        if let Some(v) = patch.overwrites {
            c.overwrites = v;
        }
        if let Some(v) = patch.bitrate {
            c.bitrate = v;
        }
        let channel = c.clone();
        Ok((
            channel.clone(),
            vec![Dispatch {
                t: "CHANNEL_UPDATE",
                d: channel_json(&channel),
                intent: intents::GUILDS,
                guild_id: Some(guild_id),
            }],
        ))
    }

    /// Deletes a channel; its voice members are disconnected first (VOICE_STATE_UPDATE with
    /// `channel_id: null`), then CHANNEL_DELETE.
    pub fn delete_channel(&mut self, channel_id: u64) -> Outcome<Channel> {
        let guild_id = self.channel(channel_id)?.guild_id;
        let in_channel: Vec<u64> = self
            .guild(guild_id)?
            .voice
            .values()
            .filter(|v| v.channel_id == channel_id)
            .map(|v| v.user_id)
            .collect();
        let mut events = Vec::new();
        for user in in_channel {
            let (_, mut ev) = self.voice_leave(guild_id, user)?;
            events.append(&mut ev);
        }
        let guild = self.guild_mut(guild_id)?;
        let channel = guild
            .channels
            .remove(&channel_id)
            .ok_or(SimError::UnknownChannel(channel_id))?;
        self.channel_guild.remove(&channel_id);
        events.push(Dispatch {
            t: "CHANNEL_DELETE",
            d: channel_json(&channel),
            intent: intents::GUILDS,
            guild_id: Some(guild_id),
        });
        Ok((channel, events))
    }

    pub fn create_role(
        &mut self,
        guild_id: u64,
        name: &str,
        permissions: u64,
        color: u32,
        hoist: bool,
        mentionable: bool,
    ) -> Outcome<Role> {
        if self.guild(guild_id)?.roles.len() >= MAX_ROLES_PER_GUILD {
            return Err(SimError::LimitReached {
                what: "guild roles",
                max: MAX_ROLES_PER_GUILD,
            });
        }
        let id = self.id_or_next(None);
        // Discord puts a new role just above @everyone, below every existing role.
        for r in self.guild_mut(guild_id)?.roles.values_mut() {
            if r.position >= 1 {
                r.position = r.position.saturating_add(1);
            }
        }
        let position = 1;
        let role = Role {
            id,
            name: name.to_owned(),
            permissions,
            position,
            color,
            hoist,
            mentionable,
            managed: false,
        };
        self.guild_mut(guild_id)?.roles.insert(id, role.clone());
        Ok((
            role.clone(),
            vec![Dispatch {
                t: "GUILD_ROLE_CREATE",
                d: json!({"guild_id": guild_id.to_string(), "role": role_json(&role)}),
                intent: intents::GUILDS,
                guild_id: Some(guild_id),
            }],
        ))
    }

    pub fn delete_role(&mut self, guild_id: u64, role_id: u64) -> Outcome<()> {
        let guild = self.guild_mut(guild_id)?;
        if role_id == guild_id {
            return Err(SimError::BadRequest("cannot delete @everyone".into()));
        }
        match guild.roles.get(&role_id) {
            None => return Err(SimError::UnknownRole(role_id)),
            Some(r) if r.managed => {
                return Err(SimError::BadRequest("cannot delete a managed role".into()))
            }
            Some(_) => {}
        }
        guild.roles.remove(&role_id);
        for m in guild.members.values_mut() {
            m.roles.retain(|r| *r != role_id);
        }
        for c in guild.channels.values_mut() {
            c.overwrites.retain(|o| !(o.kind == 0 && o.id == role_id));
        }
        Ok((
            (),
            vec![Dispatch {
                t: "GUILD_ROLE_DELETE",
                d: json!({"guild_id": guild_id.to_string(), "role_id": role_id.to_string()}),
                intent: intents::GUILDS,
                guild_id: Some(guild_id),
            }],
        ))
    }

    /// Adds (`add = true`) or removes a role; no event when nothing changes.
    pub fn set_member_role(
        &mut self,
        guild_id: u64,
        user_id: u64,
        role_id: u64,
        add: bool,
    ) -> Outcome<()> {
        let guild = self.guild_mut(guild_id)?;
        if !guild.roles.contains_key(&role_id) {
            return Err(SimError::UnknownRole(role_id));
        }
        let member = guild.members.get_mut(&user_id).ok_or(SimError::NotMember {
            guild: guild_id,
            user: user_id,
        })?;
        let had = member.roles.contains(&role_id);
        if add == had {
            return Ok(((), Vec::new()));
        }
        if add {
            member.roles.push(role_id);
        } else {
            member.roles.retain(|r| *r != role_id);
        }
        Ok(((), vec![self.member_update(guild_id, user_id)?]))
    }

    fn member_update(&self, guild_id: u64, user_id: u64) -> Result<Dispatch, SimError> {
        let guild = self.guild(guild_id)?;
        let member = guild.members.get(&user_id).ok_or(SimError::NotMember {
            guild: guild_id,
            user: user_id,
        })?;
        let mut d = member_json(member, self.user(user_id)?);
        set(&mut d, "guild_id", json!(guild_id.to_string()));
        Ok(Dispatch {
            t: "GUILD_MEMBER_UPDATE",
            d,
            intent: intents::GUILD_MEMBERS,
            guild_id: Some(guild_id),
        })
    }

    /// Sets a member's server mute/deaf (REST `PATCH` member); VOICE_STATE_UPDATE if in voice.
    pub fn set_member_mute_deaf(
        &mut self,
        guild_id: u64,
        user_id: u64,
        mute: Option<bool>,
        deaf: Option<bool>,
    ) -> Outcome<()> {
        let guild = self.guild_mut(guild_id)?;
        let member = guild.members.get_mut(&user_id).ok_or(SimError::NotMember {
            guild: guild_id,
            user: user_id,
        })?;
        let before = (member.mute, member.deaf);
        if let Some(m) = mute {
            member.mute = m;
        }
        if let Some(d) = deaf {
            member.deaf = d;
        }
        let changed = before != (member.mute, member.deaf);
        let mut events = Vec::new();
        if changed {
            events.push(self.member_update(guild_id, user_id)?);
            if self.guild(guild_id)?.voice.contains_key(&user_id) {
                events.push(self.voice_dispatch(guild_id, user_id)?);
            }
        }
        Ok(((), events))
    }

    /// Connects or moves a user to a voice channel.
    pub fn voice_join(
        &mut self,
        guild_id: u64,
        user_id: u64,
        channel_id: u64,
        actor: Actor,
    ) -> Outcome<()> {
        let guild = self.guild(guild_id)?;
        self.user(user_id)?;
        if !guild.members.contains_key(&user_id) {
            return Err(SimError::NotMember {
                guild: guild_id,
                user: user_id,
            });
        }
        let channel = guild
            .channels
            .get(&channel_id)
            .ok_or(SimError::UnknownChannel(channel_id))?;
        if !channel.is_voice() {
            return Err(SimError::NotVoice(channel_id));
        }
        if guild.voice.get(&user_id).map(|v| v.channel_id) == Some(channel_id) {
            return Ok(((), Vec::new()));
        }
        if actor == Actor::User && user_id != self.bot_id {
            let p = self.channel_permissions(guild, channel, user_id);
            if p & perms::VIEW_CHANNEL == 0 {
                return Err(SimError::MissingPermission {
                    user: user_id,
                    channel: channel_id,
                    missing: "VIEW_CHANNEL",
                });
            }
            if p & perms::CONNECT == 0 {
                return Err(SimError::MissingPermission {
                    user: user_id,
                    channel: channel_id,
                    missing: "CONNECT",
                });
            }
            let inside = guild
                .voice
                .values()
                .filter(|v| v.channel_id == channel_id)
                .count();
            if channel.user_limit > 0
                && inside >= channel.user_limit as usize
                && p & perms::MOVE_MEMBERS == 0
            {
                return Err(SimError::ChannelFull {
                    channel: channel_id,
                    limit: channel.user_limit,
                });
            }
        }
        let mut events = Vec::new();
        // A user is in voice in one guild at a time: joining here leaves the other guild.
        if let Some((other, _)) = self.voice_of(user_id) {
            if other != guild_id {
                let (_, mut ev) = self.voice_leave(other, user_id)?;
                events.append(&mut ev);
            }
        }
        let session = format!("{:032x}", self.next_voice_session);
        self.next_voice_session = self.next_voice_session.wrapping_add(1);
        let guild = self.guild_mut(guild_id)?;
        guild
            .voice
            .entry(user_id)
            .and_modify(|v| v.channel_id = channel_id)
            .or_insert_with(|| VoiceState {
                user_id,
                channel_id,
                session_id: session,
                ..VoiceState::default()
            });
        events.push(self.voice_dispatch(guild_id, user_id)?);
        Ok(((), events))
    }

    /// Disconnects a user from voice (VOICE_STATE_UPDATE with `channel_id: null`).
    pub fn voice_leave(&mut self, guild_id: u64, user_id: u64) -> Outcome<()> {
        let guild = self.guild_mut(guild_id)?;
        let state = guild
            .voice
            .remove(&user_id)
            .ok_or(SimError::NotConnected(user_id))?;
        let member = guild.members.get(&user_id).cloned();
        let user = self.user(user_id)?;
        let mut d = voice_state_json(&state, member.as_ref(), user, Some(guild_id));
        set(&mut d, "channel_id", Value::Null);
        Ok((
            (),
            vec![Dispatch {
                t: "VOICE_STATE_UPDATE",
                d,
                intent: intents::GUILD_VOICE_STATES,
                guild_id: Some(guild_id),
            }],
        ))
    }

    /// Changes self mute/deaf/stream/video (and server mute/deaf) of a connected user.
    pub fn voice_flags(&mut self, guild_id: u64, user_id: u64, flags: &VoiceFlags) -> Outcome<()> {
        let guild = self.guild_mut(guild_id)?;
        let v = guild
            .voice
            .get_mut(&user_id)
            .ok_or(SimError::NotConnected(user_id))?;
        let before = (v.self_mute, v.self_deaf, v.self_stream, v.self_video);
        if let Some(x) = flags.self_mute {
            v.self_mute = x;
        }
        if let Some(x) = flags.self_deaf {
            v.self_deaf = x;
        }
        if let Some(x) = flags.self_stream {
            v.self_stream = x;
        }
        if let Some(x) = flags.self_video {
            v.self_video = x;
        }
        let changed = before != (v.self_mute, v.self_deaf, v.self_stream, v.self_video);
        let member = guild.members.get_mut(&user_id).ok_or(SimError::NotMember {
            guild: guild_id,
            user: user_id,
        })?;
        let server_before = (member.mute, member.deaf);
        if let Some(x) = flags.mute {
            member.mute = x;
        }
        if let Some(x) = flags.deaf {
            member.deaf = x;
        }
        let server_changed = server_before != (member.mute, member.deaf);
        if changed || server_changed {
            Ok(((), vec![self.voice_dispatch(guild_id, user_id)?]))
        } else {
            Ok(((), Vec::new()))
        }
    }

    fn voice_dispatch(&self, guild_id: u64, user_id: u64) -> Result<Dispatch, SimError> {
        let guild = self.guild(guild_id)?;
        let state = guild
            .voice
            .get(&user_id)
            .ok_or(SimError::NotConnected(user_id))?;
        let d = voice_state_json(
            state,
            guild.members.get(&user_id),
            self.user(user_id)?,
            Some(guild_id),
        );
        Ok(Dispatch {
            t: "VOICE_STATE_UPDATE",
            d,
            intent: intents::GUILD_VOICE_STATES,
            guild_id: Some(guild_id),
        })
    }

    // ----- JSON -----------------------------------------------------------------------------

    /// The full guild object as GUILD_CREATE carries it.
    pub fn guild_json(&self, g: &Guild) -> Value {
        let members: Vec<Value> = g
            .members
            .values()
            .filter_map(|m| self.users.get(&m.user_id).map(|u| member_json(m, u)))
            .collect();
        let voice_states: Vec<Value> = g
            .voice
            .values()
            .filter_map(|v| {
                self.users
                    .get(&v.user_id)
                    .map(|u| voice_state_json(v, g.members.get(&v.user_id), u, None))
            })
            .collect();
        let mut obj = self.guild_base_json(g);
        set(&mut obj, "joined_at", json!(iso8601(g.created_ms)));
        set(&mut obj, "large", json!(false));
        set(&mut obj, "unavailable", json!(false));
        set(&mut obj, "member_count", json!(g.members.len()));
        set(&mut obj, "members", Value::Array(members));
        set(&mut obj, "voice_states", Value::Array(voice_states));
        set(
            &mut obj,
            "channels",
            Value::Array(g.channels.values().map(channel_json).collect()),
        );
        set(&mut obj, "threads", json!([]));
        set(&mut obj, "presences", json!([]));
        set(&mut obj, "stage_instances", json!([]));
        set(&mut obj, "guild_scheduled_events", json!([]));
        set(&mut obj, "soundboard_sounds", json!([]));
        obj
    }

    /// The guild object as `GET /guilds/{g}` returns it (no members, channels, voice states).
    pub fn guild_base_json(&self, g: &Guild) -> Value {
        json!({
            "id": g.id.to_string(),
            "name": g.name,
            "icon": null,
            "icon_hash": null,
            "splash": null,
            "discovery_splash": null,
            "owner_id": g.owner_id.to_string(),
            "afk_channel_id": null,
            "afk_timeout": 300,
            "widget_enabled": false,
            "widget_channel_id": null,
            "verification_level": 0,
            "default_message_notifications": 0,
            "explicit_content_filter": 0,
            "roles": g.roles.values().map(role_json).collect::<Vec<_>>(),
            "emojis": [],
            "features": [],
            "mfa_level": 0,
            "application_id": null,
            "system_channel_id": null,
            "system_channel_flags": 0,
            "rules_channel_id": null,
            "max_presences": null,
            "max_members": 500000,
            "vanity_url_code": null,
            "description": null,
            "banner": null,
            "premium_tier": 0,
            "premium_subscription_count": 0,
            "preferred_locale": "en-US",
            "public_updates_channel_id": null,
            "max_video_channel_users": 25,
            "max_stage_video_channel_users": 50,
            "nsfw_level": 0,
            "nsfw": false,
            "stickers": [],
            "premium_progress_bar_enabled": false,
            "safety_alerts_channel_id": null,
            "incidents_data": null,
        })
    }
}

pub fn user_json(u: &User) -> Value {
    json!({
        "id": u.id.to_string(),
        "username": u.username,
        "discriminator": "0",
        "global_name": u.global_name,
        "avatar": null,
        "bot": u.bot,
        "system": false,
        "public_flags": 0,
        "flags": 0,
        "banner": null,
        "accent_color": null,
        "avatar_decoration_data": null,
    })
}

pub fn role_json(r: &Role) -> Value {
    json!({
        "id": r.id.to_string(),
        "name": r.name,
        "color": r.color,
        "colors": {"primary_color": r.color, "secondary_color": null, "tertiary_color": null},
        "hoist": r.hoist,
        "icon": null,
        "unicode_emoji": null,
        "position": r.position,
        "permissions": r.permissions.to_string(),
        "managed": r.managed,
        "mentionable": r.mentionable,
        "flags": 0,
    })
}

pub fn overwrite_json(o: &Overwrite) -> Value {
    json!({
        "id": o.id.to_string(),
        "type": o.kind,
        "allow": o.allow.to_string(),
        "deny": o.deny.to_string(),
    })
}

pub fn channel_json(c: &Channel) -> Value {
    let mut v = json!({
        "id": c.id.to_string(),
        "type": c.kind,
        "guild_id": c.guild_id.to_string(),
        "name": c.name,
        "position": c.position,
        "parent_id": c.parent_id.map(|p| p.to_string()),
        "permission_overwrites": c.overwrites.iter().map(overwrite_json).collect::<Vec<_>>(),
        "nsfw": false,
        "flags": 0,
    });
    if c.is_voice() {
        set(&mut v, "user_limit", json!(c.user_limit));
        set(&mut v, "bitrate", json!(c.bitrate));
        set(&mut v, "rtc_region", Value::Null);
        set(&mut v, "last_message_id", Value::Null);
        set(&mut v, "rate_limit_per_user", json!(0));
    } else if c.kind == channel_type::GUILD_TEXT {
        set(&mut v, "topic", Value::Null);
        set(&mut v, "last_message_id", Value::Null);
        set(&mut v, "rate_limit_per_user", json!(0));
    }
    v
}

pub fn member_json(m: &Member, u: &User) -> Value {
    json!({
        "user": user_json(u),
        "nick": m.nick,
        "avatar": null,
        "banner": null,
        "roles": m.roles.iter().map(|r| r.to_string()).collect::<Vec<_>>(),
        "joined_at": iso8601(m.joined_at_ms),
        "premium_since": null,
        "deaf": m.deaf,
        "mute": m.mute,
        "flags": 0,
        "pending": false,
        "communication_disabled_until": null,
    })
}

/// A voice state; `guild_id` is omitted inside GUILD_CREATE, as Discord does.
pub fn voice_state_json(
    v: &VoiceState,
    m: Option<&Member>,
    u: &User,
    guild_id: Option<u64>,
) -> Value {
    let mut d = json!({
        "channel_id": v.channel_id.to_string(),
        "user_id": v.user_id.to_string(),
        "session_id": v.session_id,
        "deaf": m.is_some_and(|m| m.deaf),
        "mute": m.is_some_and(|m| m.mute),
        "self_deaf": v.self_deaf,
        "self_mute": v.self_mute,
        "self_stream": v.self_stream,
        "self_video": v.self_video,
        "suppress": v.suppress,
        "request_to_speak_timestamp": null,
    });
    if let Some(g) = guild_id {
        set(&mut d, "guild_id", json!(g.to_string()));
        if let Some(m) = m {
            set(&mut d, "member", member_json(m, u));
        }
    }
    d
}

#[cfg(test)]
mod tests {
    use super::*;

    fn world() -> World {
        let mut w = World::new(10, "bot", perms::BOT_DEFAULT, 1_000);
        w.seed_default().expect("seed");
        w
    }

    fn private_channel(w: &mut World, allow_role: Option<u64>) -> u64 {
        let mut overwrites = vec![Overwrite {
            id: seed::GUILD_ID,
            kind: 0,
            allow: 0,
            deny: perms::VIEW_CHANNEL | perms::CONNECT,
        }];
        if let Some(r) = allow_role {
            overwrites.push(Overwrite {
                id: r,
                kind: 0,
                allow: perms::VIEW_CHANNEL | perms::CONNECT,
                deny: 0,
            });
        }
        let (c, _) = w
            .create_channel(
                seed::GUILD_ID,
                ChannelSpec {
                    id: None,
                    name: "room".into(),
                    kind: channel_type::GUILD_VOICE,
                    parent_id: None,
                    user_limit: 1,
                    bitrate: None,
                    position: None,
                    overwrites,
                },
            )
            .expect("channel");
        c.id
    }

    #[test]
    fn a_user_without_the_role_cannot_join_a_private_channel_but_a_role_holder_can() {
        let mut w = world();
        let (role, _) = w
            .create_role(seed::GUILD_ID, "room", 0, 0, false, false)
            .expect("role");
        let c = private_channel(&mut w, Some(role.id));
        let alice = seed::USERS[0].0;
        let err = w
            .voice_join(seed::GUILD_ID, alice, c, Actor::User)
            .unwrap_err();
        assert_eq!(err.code(), "missing_permission");
        w.set_member_role(seed::GUILD_ID, alice, role.id, true)
            .expect("role add");
        w.voice_join(seed::GUILD_ID, alice, c, Actor::User)
            .expect("join");
    }

    #[test]
    fn user_limit_stops_users_but_not_moderator_moves() {
        let mut w = world();
        let c = private_channel(&mut w, None);
        // Member overwrites let alice and bob in.
        for (id, _) in &seed::USERS[..2] {
            let mut ch = w.channel(c).expect("c").overwrites.clone();
            ch.push(Overwrite {
                id: *id,
                kind: 1,
                allow: perms::VIEW_CHANNEL | perms::CONNECT,
                deny: 0,
            });
            w.update_channel(
                c,
                ChannelPatch {
                    overwrites: Some(ch),
                    ..Default::default()
                },
            )
            .expect("patch");
        }
        w.voice_join(seed::GUILD_ID, seed::USERS[0].0, c, Actor::User)
            .expect("first");
        let err = w
            .voice_join(seed::GUILD_ID, seed::USERS[1].0, c, Actor::User)
            .unwrap_err();
        assert_eq!(err.code(), "channel_full");
        w.voice_join(seed::GUILD_ID, seed::USERS[1].0, c, Actor::Moderator)
            .expect("moved in");
    }

    #[test]
    fn deleting_a_channel_disconnects_its_members_before_channel_delete() {
        let mut w = world();
        let alice = seed::USERS[0].0;
        w.voice_join(seed::GUILD_ID, alice, seed::LOBBY_CHANNEL_ID, Actor::User)
            .expect("join");
        let (_, events) = w.delete_channel(seed::LOBBY_CHANNEL_ID).expect("delete");
        let names: Vec<_> = events.iter().map(|e| e.t).collect();
        assert_eq!(names, ["VOICE_STATE_UPDATE", "CHANNEL_DELETE"]);
        assert!(events[0].d["channel_id"].is_null());
        assert!(w.voice_of(alice).is_none());
    }

    #[test]
    fn a_guild_holds_at_most_250_roles_as_on_discord() {
        let mut w = world();
        while w.guild(seed::GUILD_ID).expect("g").roles.len() < MAX_ROLES_PER_GUILD {
            w.create_role(seed::GUILD_ID, "r", 0, 0, false, false)
                .expect("role");
        }
        let err = w
            .create_role(seed::GUILD_ID, "one too many", 0, 0, false, false)
            .unwrap_err();
        assert_eq!(err.code(), "limit_reached");
    }
}
