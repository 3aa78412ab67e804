//! control tests.
