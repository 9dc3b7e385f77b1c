//! The `curec` command line, private to the binary: [`args`] (clap types and value parsers),
//! [`overrides`] (flags lowered into `--set` overrides) and [`dispatch`] (each command as a
//! library call and what it prints).

pub mod args;
pub mod dispatch;
pub mod overrides;
