//! serenity_http tests.
