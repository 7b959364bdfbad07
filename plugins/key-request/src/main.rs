//! key-request (being built).
fn main() {}
