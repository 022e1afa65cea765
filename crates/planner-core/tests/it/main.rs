#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]
#![allow(clippy::field_reassign_with_default)]
//! Integration tests of planner-core, in one binary (see ARCHITECTURE.md, "Testing").

mod leases;
mod props;
mod scenarios;
mod sim;
mod support;
