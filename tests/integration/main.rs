//! Whole-system tests: the `revive` binary and library against real files,
//! real clients and real peers. One test binary keeps link times down.

mod repo_cli;
mod support;
