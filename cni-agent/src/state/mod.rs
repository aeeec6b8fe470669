//! Durable per-attachment records: what an ADD is about to create, written
//! before it is created, so that DEL and GC can remove exactly that.
pub mod record;
