//! The `whet` command line.
