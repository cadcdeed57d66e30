//! byteback's integration tests and benchmarks live in this package; the
//! product itself is in `crates/`.

pub mod docgen;
