//! oauth tests.
