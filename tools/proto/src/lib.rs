//! refd-proto: the wire codec (docs/protocol.md); being written.
