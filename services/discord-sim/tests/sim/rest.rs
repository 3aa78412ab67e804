//! rest tests.
