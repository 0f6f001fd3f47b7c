//! The `flotilla` command line: arguments, output, and the glue that runs commands.

pub mod args;
pub mod output;
