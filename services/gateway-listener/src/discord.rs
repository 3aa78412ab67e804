//! Discord payloads → our types, through serenity's model types.
//!
//! serenity's `VoiceState`, `Member` and `GuildChannel` decode the dispatches; a GUILD_CREATE is
//! decoded element by element (its `voice_states` and `members` lists) instead of as a whole
//! serenity `Guild`, so one odd member cannot make us lose a guild's voice states, and we do not
//! pay for roles, emojis and stickers we never use.

use serde::Deserialize;
use serde_json::value::RawValue;
use serenity::model::channel::{ChannelType, GuildChannel};
use serenity::model::guild::Member;
use serenity::model::voice::VoiceState;
use voicerooms_contract::event::{UserRef, VoiceFlags};
use voicerooms_contract::{ChannelId, GuildId, UserId};

use crate::cache::{user_ref, VoiceUpdate};

/// A payload we could not use. Logged and counted; the connection goes on.
#[derive(Debug, thiserror::Error)]
pub enum PayloadError {
    #[error("{event}: {source}")]
    Decode {
        event: &'static str,
        source: serde_json::Error,
    },
    #[error("{event}: bad id: {source}")]
    Id {
        event: &'static str,
        source: voicerooms_contract::ids::IdError,
    },
    #[error("{0}: no data")]
    Empty(&'static str),
}

fn decode<'a, T: Deserialize<'a>>(
    event: &'static str,
    d: Option<&'a RawValue>,
) -> Result<T, PayloadError> {
    let d = d.ok_or(PayloadError::Empty(event))?;
    serde_json::from_str(d.get()).map_err(|source| PayloadError::Decode { event, source })
}

fn id<M>(event: &'static str, raw: u64) -> Result<voicerooms_contract::ids::Id<M>, PayloadError> {
    voicerooms_contract::ids::Id::new(raw).map_err(|source| PayloadError::Id { event, source })
}

fn member_ref(m: &Member) -> Result<UserRef, PayloadError> {
    let uid: UserId = id("member", m.user.id.get())?;
    Ok(user_ref(
        uid,
        &m.user.name,
        m.user.global_name.as_deref(),
        m.user.avatar.map(|a| a.to_string()),
    ))
}

fn voice_update(event: &'static str, vs: &VoiceState) -> Result<VoiceUpdate, PayloadError> {
    let channel = match vs.channel_id {
        Some(c) => Some(id::<voicerooms_contract::ids::marker::Channel>(
            event,
            c.get(),
        )?),
        None => None,
    };
    Ok(VoiceUpdate {
        user_id: id(event, vs.user_id.get())?,
        channel,
        flags: VoiceFlags {
            mute: vs.mute,
            deaf: vs.deaf,
            self_mute: vs.self_mute,
            self_deaf: vs.self_deaf,
            self_stream: vs.self_stream.unwrap_or(false),
            self_video: vs.self_video,
            suppress: vs.suppress,
        },
        user: match &vs.member {
            Some(m) => Some(member_ref(m)?),
            None => None,
        },
    })
}

/// VOICE_STATE_UPDATE → (guild, update). States without a guild (DM calls) are not ours: `None`.
pub fn voice_state_update(
    d: Option<&RawValue>,
) -> Result<Option<(GuildId, VoiceUpdate)>, PayloadError> {
    const EV: &str = "VOICE_STATE_UPDATE";
    let vs: VoiceState = decode(EV, d)?;
    let Some(guild) = vs.guild_id else {
        return Ok(None);
    };
    Ok(Some((id(EV, guild.get())?, voice_update(EV, &vs)?)))
}

/// What a GUILD_CREATE tells us.
pub struct GuildCreate {
    pub guild: GuildId,
    /// An outage placeholder: nothing to diff.
    pub unavailable: bool,
    pub members: Vec<UserRef>,
    pub states: Vec<VoiceUpdate>,
    /// Elements that could not be decoded (logged by the caller).
    pub skipped: Vec<PayloadError>,
}

#[derive(Deserialize)]
struct RawGuild<'a> {
    id: serenity::model::id::GuildId,
    #[serde(default)]
    unavailable: bool,
    #[serde(default, borrow)]
    voice_states: Vec<&'a RawValue>,
    #[serde(default, borrow)]
    members: Vec<&'a RawValue>,
}

pub fn guild_create(d: Option<&RawValue>) -> Result<GuildCreate, PayloadError> {
    const EV: &str = "GUILD_CREATE";
    let raw: RawGuild = decode(EV, d)?;
    let mut out = GuildCreate {
        guild: id(EV, raw.id.get())?,
        unavailable: raw.unavailable,
        members: Vec::with_capacity(raw.members.len()),
        states: Vec::with_capacity(raw.voice_states.len()),
        skipped: Vec::new(),
    };
    for m in raw.members {
        match decode::<Member>(EV, Some(m)).and_then(|m| member_ref(&m)) {
            Ok(u) => out.members.push(u),
            Err(e) => out.skipped.push(e),
        }
    }
    for v in raw.voice_states {
        match decode::<VoiceState>(EV, Some(v)).and_then(|vs| voice_update(EV, &vs)) {
            Ok(u) => out.states.push(u),
            Err(e) => out.skipped.push(e),
        }
    }
    Ok(out)
}

/// A voice channel changed or deleted.
pub struct ChannelChange {
    pub guild: GuildId,
    pub channel: ChannelId,
    pub name: String,
    pub user_limit: Option<u16>,
}

/// CHANNEL_UPDATE / CHANNEL_DELETE of a voice or stage channel; other channels: `None`.
pub fn voice_channel(
    event: &'static str,
    d: Option<&RawValue>,
) -> Result<Option<ChannelChange>, PayloadError> {
    let c: GuildChannel = decode(event, d)?;
    if !matches!(c.kind, ChannelType::Voice | ChannelType::Stage) {
        return Ok(None);
    }
    let name: String = c
        .name
        .chars()
        .filter(|ch| !ch.is_control())
        .take(100)
        .collect();
    Ok(Some(ChannelChange {
        guild: id(event, c.guild_id.get())?,
        channel: id(event, c.id.get())?,
        name: if name.trim().is_empty() {
            c.id.to_string()
        } else {
            name
        },
        user_limit: c
            .user_limit
            .and_then(|l| u16::try_from(l).ok())
            .filter(|l| *l > 0),
    }))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn raw(s: &str) -> Box<RawValue> {
        RawValue::from_string(s.to_owned()).unwrap()
    }

    #[test]
    fn a_voice_state_update_with_a_member_carries_the_name() {
        let d = raw(
            r#"{"guild_id":"1","channel_id":"10","user_id":"7","session_id":"x","deaf":false,"mute":false,
            "self_deaf":false,"self_mute":true,"self_video":false,"suppress":false,"request_to_speak_timestamp":null,
            "member":{"user":{"id":"7","username":"alice","discriminator":"0","avatar":"a_1269e74af4df7417b13759eae50c83dc","global_name":null},
            "roles":[],"joined_at":"2024-01-01T00:00:00Z","deaf":false,"mute":false,"flags":0}}"#,
        );
        let (guild, u) = voice_state_update(Some(&d)).unwrap().unwrap();
        assert_eq!(guild.get(), 1);
        assert_eq!(u.channel.map(|c| c.get()), Some(10));
        assert!(u.flags.self_mute);
        let user = u.user.unwrap();
        assert_eq!(user.username, "alice");
        assert_eq!(
            user.avatar.as_deref(),
            Some("a_1269e74af4df7417b13759eae50c83dc")
        );
    }

    #[test]
    fn bad_payloads_are_typed_errors() {
        assert!(matches!(
            voice_state_update(None),
            Err(PayloadError::Empty(_))
        ));
        let d = raw(r#"{"user_id":"x"}"#);
        assert!(matches!(
            voice_state_update(Some(&d)),
            Err(PayloadError::Decode { .. })
        ));
        let d = raw(r#"{"id":"1","voice_states":[{"nonsense":true}],"members":[]}"#);
        let g = guild_create(Some(&d)).unwrap();
        assert_eq!((g.states.len(), g.skipped.len()), (0, 1));
    }
}
