//! serenity_gateway tests.
