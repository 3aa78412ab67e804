//! Error types: configuration, start-up, and control operations.

/// A bad `DISCORD_SIM__*` variable.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("unknown simulator setting {0}")]
    Unknown(String),
    #[error("invalid value {value:?} for {key}")]
    Invalid { key: String, value: String },
}

/// The simulator could not start.
#[derive(Debug, thiserror::Error)]
pub enum StartError {
    #[error("cannot bind {addr}: {source}")]
    Bind {
        addr: std::net::SocketAddr,
        source: std::io::Error,
    },
    #[error("cannot start the HTTP server: {0}")]
    Server(std::io::Error),
}

/// Why a control operation (library call or `/_sim/...` request) was refused.
///
/// `code()` is the stable machine code the control API returns.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum SimError {
    #[error("unknown guild {0}")]
    UnknownGuild(u64),
    #[error("unknown channel {0}")]
    UnknownChannel(u64),
    #[error("unknown user {0}")]
    UnknownUser(u64),
    #[error("unknown role {0}")]
    UnknownRole(u64),
    #[error("user {user} is not a member of guild {guild}")]
    NotMember { guild: u64, user: u64 },
    #[error("channel {0} is not a voice channel")]
    NotVoice(u64),
    #[error("user {user} lacks {missing} on channel {channel}")]
    MissingPermission {
        user: u64,
        channel: u64,
        missing: &'static str,
    },
    #[error("channel {channel} is full ({limit} users)")]
    ChannelFull { channel: u64, limit: u32 },
    #[error("user {0} is not connected to voice")]
    NotConnected(u64),
    #[error("id {0} already exists")]
    Conflict(u64),
    #[error("invalid request: {0}")]
    BadRequest(String),
    /// One of Discord's hard limits (500 channels or 250 roles per guild).
    #[error("maximum number of {what} reached ({max})")]
    LimitReached { what: &'static str, max: usize },
    #[error("simulator is shutting down")]
    ShuttingDown,
}

impl SimError {
    /// Stable machine code for the control API.
    pub fn code(&self) -> &'static str {
        match self {
            Self::UnknownGuild(_) => "unknown_guild",
            Self::UnknownChannel(_) => "unknown_channel",
            Self::UnknownUser(_) => "unknown_user",
            Self::UnknownRole(_) => "unknown_role",
            Self::NotMember { .. } => "not_member",
            Self::NotVoice(_) => "not_voice_channel",
            Self::MissingPermission { .. } => "missing_permission",
            Self::ChannelFull { .. } => "channel_full",
            Self::NotConnected(_) => "not_connected",
            Self::Conflict(_) => "conflict",
            Self::BadRequest(_) => "bad_request",
            Self::LimitReached { .. } => "limit_reached",
            Self::ShuttingDown => "shutting_down",
        }
    }

    /// HTTP status for the control API.
    pub fn status(&self) -> u16 {
        match self {
            Self::UnknownGuild(_)
            | Self::UnknownChannel(_)
            | Self::UnknownUser(_)
            | Self::UnknownRole(_)
            | Self::NotMember { .. } => 404,
            Self::MissingPermission { .. } => 403,
            Self::ChannelFull { .. } | Self::Conflict(_) => 409,
            Self::NotVoice(_)
            | Self::NotConnected(_)
            | Self::BadRequest(_)
            | Self::LimitReached { .. } => 400,
            Self::ShuttingDown => 503,
        }
    }
}
