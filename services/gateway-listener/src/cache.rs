//! The voice-state cache: who is in which voice channel of each guild, with their flags.
//!
//! Every VOICE_STATE_UPDATE is compared with the cache to decide what happened (join, leave,
//! move, flag change, or nothing); after a new session the GUILD_CREATE voice states are diffed
//! against it, so exactly the changes missed while disconnected are published. It is pure data
//! (no I/O), so the rules are unit tested here.

use std::collections::{BTreeMap, HashMap};

use serde::{Deserialize, Serialize};
use voicerooms_contract::event::{
    Event, UserRef, VoiceFlags, VoiceJoined, VoiceLeft, VoiceUpdated, MAX_AVATAR_BYTES,
    MAX_NAME_CHARS,
};
use voicerooms_contract::{ChannelId, GuildId, RoomId, UserId};

/// One user's voice state, as far as we relay it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct VoiceEntry {
    pub channel: ChannelId,
    pub flags: VoiceFlags,
    pub user: UserRef,
}

/// A voice state reported by Discord, reduced to what we need.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct VoiceUpdate {
    pub user_id: UserId,
    /// `None`: not in voice.
    pub channel: Option<ChannelId>,
    pub flags: VoiceFlags,
    /// From the update's `member`, when present.
    pub user: Option<UserRef>,
}

/// One normalized event for one room.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Change {
    pub room: RoomId,
    pub event: Event,
}

#[derive(Debug, Default, Clone)]
struct GuildCache {
    /// Names and avatars of members we have seen (GUILD_CREATE `members`, updates' `member`).
    users: HashMap<UserId, UserRef>,
    /// Sorted so a diff is published in a deterministic order.
    voice: BTreeMap<UserId, VoiceEntry>,
}

/// A guild's voice states, as stored in the session checkpoint.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct GuildSnapshot {
    pub guild: GuildId,
    pub voice: Vec<VoiceEntry>,
}

#[derive(Debug, Default, Clone)]
pub struct VoiceCache {
    guilds: HashMap<GuildId, GuildCache>,
}

impl VoiceCache {
    pub fn new() -> Self {
        Self::default()
    }

    /// Rebuilds a cache from a checkpoint.
    pub fn from_snapshot(snapshot: Vec<GuildSnapshot>) -> Self {
        let mut cache = Self::new();
        for g in snapshot {
            let guild = cache.guilds.entry(g.guild).or_default();
            for entry in g.voice {
                guild.users.insert(entry.user.id, entry.user.clone());
                guild.voice.insert(entry.user.id, entry);
            }
        }
        cache
    }

    pub fn snapshot(&self) -> Vec<GuildSnapshot> {
        let mut out: Vec<GuildSnapshot> = self
            .guilds
            .iter()
            .map(|(guild, g)| GuildSnapshot {
                guild: *guild,
                voice: g.voice.values().cloned().collect(),
            })
            .collect();
        out.sort_by_key(|g| g.guild);
        out
    }

    pub fn knows_guild(&self, guild: GuildId) -> bool {
        self.guilds.contains_key(&guild)
    }

    /// Number of users in voice across guilds (a metric).
    pub fn voice_count(&self) -> usize {
        self.guilds.values().map(|g| g.voice.len()).sum()
    }

    /// Who is in voice where, sorted (tests and logs).
    pub fn voice_of(&self, guild: GuildId, user: UserId) -> Option<&VoiceEntry> {
        self.guilds.get(&guild).and_then(|g| g.voice.get(&user))
    }

    pub fn remember_user(&mut self, guild: GuildId, user: UserRef) {
        self.guilds
            .entry(guild)
            .or_default()
            .users
            .insert(user.id, user);
    }

    /// Applies one VOICE_STATE_UPDATE and says what it meant.
    pub fn apply(&mut self, guild: GuildId, update: VoiceUpdate) -> Vec<Change> {
        let g = self.guilds.entry(guild).or_default();
        if let Some(user) = &update.user {
            g.users.insert(update.user_id, user.clone());
        }
        let prev = g.voice.get(&update.user_id).cloned();
        let user = update
            .user
            .clone()
            .or_else(|| g.users.get(&update.user_id).cloned())
            .or_else(|| prev.as_ref().map(|p| p.user.clone()))
            .unwrap_or_else(|| unknown_user(update.user_id));
        match update.channel {
            Some(channel) => {
                g.voice.insert(
                    update.user_id,
                    VoiceEntry {
                        channel,
                        flags: update.flags,
                        user: user.clone(),
                    },
                );
            }
            None => {
                g.voice.remove(&update.user_id);
            }
        }
        transition(
            prev.as_ref().map(|p| (p.channel, p.flags)),
            update.channel.map(|c| (c, update.flags)),
            user,
        )
    }

    /// Replaces a guild's state with a fresh GUILD_CREATE and returns the difference: exactly
    /// the joins, leaves, moves and flag changes that happened since the cache was last right.
    pub fn replace_guild(
        &mut self,
        guild: GuildId,
        members: Vec<UserRef>,
        states: Vec<VoiceUpdate>,
    ) -> Vec<Change> {
        let old = self.guilds.remove(&guild).unwrap_or_default();
        let mut fresh = GuildCache {
            users: old.users,
            voice: BTreeMap::new(),
        };
        for m in members {
            fresh.users.insert(m.id, m);
        }
        for s in states {
            let Some(channel) = s.channel else { continue };
            let user = s
                .user
                .clone()
                .or_else(|| fresh.users.get(&s.user_id).cloned())
                .or_else(|| old.voice.get(&s.user_id).map(|e| e.user.clone()))
                .unwrap_or_else(|| unknown_user(s.user_id));
            fresh.voice.insert(
                s.user_id,
                VoiceEntry {
                    channel,
                    flags: s.flags,
                    user,
                },
            );
        }
        let mut users: Vec<UserId> = old
            .voice
            .keys()
            .chain(fresh.voice.keys())
            .copied()
            .collect();
        users.sort();
        users.dedup();
        let mut changes = Vec::new();
        for id in users {
            let before = old.voice.get(&id);
            let after = fresh.voice.get(&id);
            let user = after
                .or(before)
                .map(|e| e.user.clone())
                .unwrap_or_else(|| unknown_user(id));
            changes.extend(transition(
                before.map(|e| (e.channel, e.flags)),
                after.map(|e| (e.channel, e.flags)),
                user,
            ));
        }
        self.guilds.insert(guild, fresh);
        changes
    }

    /// Applies an event that was published (the shadow cache behind session checkpoints).
    pub fn apply_published(&mut self, guild: GuildId, room: RoomId, event: &Event) {
        let g = self.guilds.entry(guild).or_default();
        match event {
            Event::VoiceJoined(e) => {
                g.voice.insert(
                    e.user.id,
                    VoiceEntry {
                        channel: room,
                        flags: e.flags,
                        user: e.user.clone(),
                    },
                );
            }
            Event::VoiceLeft(e) if g.voice.get(&e.user.id).is_some_and(|v| v.channel == room) => {
                g.voice.remove(&e.user.id);
            }
            Event::VoiceUpdated(e) => {
                if let Some(v) = g.voice.get_mut(&e.user.id) {
                    v.flags = e.flags;
                }
            }
            _ => {}
        }
    }
}

/// The events for one user going from `before` to `after`.
fn transition(
    before: Option<(ChannelId, VoiceFlags)>,
    after: Option<(ChannelId, VoiceFlags)>,
    user: UserRef,
) -> Vec<Change> {
    match (before, after) {
        (None, None) => vec![],
        (None, Some((room, flags))) => vec![Change {
            room,
            event: Event::VoiceJoined(VoiceJoined {
                user,
                flags,
                moved_from: None,
            }),
        }],
        (Some((room, _)), None) => vec![Change {
            room,
            event: Event::VoiceLeft(VoiceLeft {
                user,
                moved_to: None,
            }),
        }],
        (Some((from, _)), Some((to, flags))) if from != to => vec![
            Change {
                room: from,
                event: Event::VoiceLeft(VoiceLeft {
                    user: user.clone(),
                    moved_to: Some(to),
                }),
            },
            Change {
                room: to,
                event: Event::VoiceJoined(VoiceJoined {
                    user,
                    flags,
                    moved_from: Some(from),
                }),
            },
        ],
        (Some((_, old)), Some((room, flags))) => {
            let changed = old.changed(&flags);
            if changed.is_empty() {
                vec![]
            } else {
                vec![Change {
                    room,
                    event: Event::VoiceUpdated(VoiceUpdated {
                        user,
                        flags,
                        changed,
                    }),
                }]
            }
        }
    }
}

fn unknown_user(id: UserId) -> UserRef {
    UserRef {
        id,
        username: id.to_string(),
        global_name: None,
        avatar: None,
    }
}

/// Makes a relayable [`UserRef`] from Discord's fields: names trimmed to the contract's limits
/// and stripped of control characters; an avatar that is not a plain token is dropped.
pub fn user_ref(
    id: UserId,
    username: &str,
    global_name: Option<&str>,
    avatar: Option<String>,
) -> UserRef {
    let clean = |s: &str| -> Option<String> {
        let s: String = s
            .chars()
            .filter(|c| !c.is_control())
            .take(MAX_NAME_CHARS)
            .collect();
        let s = s.trim().to_owned();
        (!s.is_empty()).then_some(s)
    };
    let avatar = avatar.filter(|a| {
        !a.is_empty()
            && a.len() <= MAX_AVATAR_BYTES
            && a.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'_')
    });
    UserRef {
        id,
        username: clean(username).unwrap_or_else(|| id.to_string()),
        global_name: global_name.and_then(clean),
        avatar,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use voicerooms_contract::event::VoiceFlag;

    fn g() -> GuildId {
        GuildId::new(1).unwrap()
    }
    fn ch(n: u64) -> ChannelId {
        ChannelId::new(n).unwrap()
    }
    fn alice() -> UserRef {
        user_ref(UserId::new(7).unwrap(), "alice", None, None)
    }
    fn update(channel: Option<u64>, flags: VoiceFlags) -> VoiceUpdate {
        VoiceUpdate {
            user_id: alice().id,
            channel: channel.map(ch),
            flags,
            user: Some(alice()),
        }
    }
    fn kinds(changes: &[Change]) -> Vec<(&'static str, u64)> {
        changes
            .iter()
            .map(|c| (c.event.kind().as_str(), c.room.get()))
            .collect()
    }

    #[test]
    fn join_move_mute_and_leave_become_the_right_events() {
        let mut cache = VoiceCache::new();
        let join = cache.apply(g(), update(Some(10), VoiceFlags::default()));
        assert_eq!(kinds(&join), vec![("voice.joined", 10)]);

        let moved = cache.apply(g(), update(Some(11), VoiceFlags::default()));
        assert_eq!(
            kinds(&moved),
            vec![("voice.left", 10), ("voice.joined", 11)]
        );
        assert!(matches!(&moved[0].event, Event::VoiceLeft(l) if l.moved_to == Some(ch(11))));
        assert!(matches!(&moved[1].event, Event::VoiceJoined(j) if j.moved_from == Some(ch(10))));

        let muted = VoiceFlags {
            self_mute: true,
            ..Default::default()
        };
        let mute = cache.apply(g(), update(Some(11), muted));
        assert_eq!(kinds(&mute), vec![("voice.updated", 11)]);
        assert!(
            matches!(&mute[0].event, Event::VoiceUpdated(u) if u.changed == vec![VoiceFlag::SelfMute])
        );
        assert!(
            cache.apply(g(), update(Some(11), muted)).is_empty(),
            "a repeat is nothing"
        );

        let leave = cache.apply(g(), update(None, VoiceFlags::default()));
        assert_eq!(kinds(&leave), vec![("voice.left", 11)]);
        assert!(cache
            .apply(g(), update(None, VoiceFlags::default()))
            .is_empty());
    }

    #[test]
    fn a_fresh_guild_create_yields_exactly_the_missed_changes() {
        let mut cache = VoiceCache::new();
        let bob = user_ref(UserId::new(8).unwrap(), "bob", None, None);
        let carol = user_ref(UserId::new(9).unwrap(), "carol", None, None);
        cache.apply(g(), update(Some(10), VoiceFlags::default()));
        cache.apply(
            g(),
            VoiceUpdate {
                user_id: bob.id,
                channel: Some(ch(10)),
                flags: VoiceFlags::default(),
                user: Some(bob.clone()),
            },
        );
        // While disconnected: alice moved to 11, bob left, carol joined 10.
        let states = vec![
            VoiceUpdate {
                user_id: alice().id,
                channel: Some(ch(11)),
                flags: VoiceFlags::default(),
                user: None,
            },
            VoiceUpdate {
                user_id: carol.id,
                channel: Some(ch(10)),
                flags: VoiceFlags::default(),
                user: None,
            },
        ];
        let changes = cache.replace_guild(g(), vec![carol.clone()], states);
        assert_eq!(
            kinds(&changes),
            vec![
                ("voice.left", 10),
                ("voice.joined", 11),
                ("voice.left", 10),
                ("voice.joined", 10)
            ]
        );
        assert_eq!(changes[2].event.user().map(|u| u.id), Some(bob.id));
        assert_eq!(
            changes[3].event.user().map(|u| u.username.as_str()),
            Some("carol")
        );
        assert!(cache
            .replace_guild(
                g(),
                vec![],
                cache.snapshot()[0]
                    .voice
                    .iter()
                    .map(|e| VoiceUpdate {
                        user_id: e.user.id,
                        channel: Some(e.channel),
                        flags: e.flags,
                        user: None
                    })
                    .collect()
            )
            .is_empty());
    }

    #[test]
    fn the_shadow_cache_follows_published_events_and_round_trips() {
        let mut live = VoiceCache::new();
        let mut shadow = VoiceCache::new();
        for u in [
            update(Some(10), VoiceFlags::default()),
            update(Some(11), VoiceFlags::default()),
            update(
                Some(11),
                VoiceFlags {
                    deaf: true,
                    ..Default::default()
                },
            ),
        ] {
            for c in live.apply(g(), u) {
                shadow.apply_published(g(), c.room, &c.event);
            }
        }
        assert_eq!(shadow.snapshot(), live.snapshot());
        let restored = VoiceCache::from_snapshot(live.snapshot());
        assert_eq!(restored.snapshot(), live.snapshot());
    }

    #[test]
    fn names_are_cleaned_to_the_contract_limits() {
        let u = user_ref(
            UserId::new(5).unwrap(),
            "\u{7}",
            Some(&"x".repeat(300)),
            Some("../etc".into()),
        );
        assert_eq!(u.username, "5");
        assert_eq!(
            u.global_name.map(|n| n.chars().count()),
            Some(MAX_NAME_CHARS)
        );
        assert_eq!(u.avatar, None);
    }
}
