//! The in-memory backend passes the whole conformance suite under plain `cargo test`.

use polybus_testkit::MemoryFixture;

polybus_testkit::conformance!(MemoryFixture::default());
