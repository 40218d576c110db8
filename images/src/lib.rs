//! Release images: the on-disk side of the image format pinned in [`protocol::format`].
//!
//! - [`chunk`]: compressing chunks and the single path by which chunk bytes are verified.
//! - [`store`]: a directory of compressed chunks named by digest, written atomically.
//! - [`build`]: a source tree in, a validated [`protocol::Manifest`] and stored chunks out.
//! - [`assemble`](mod@assemble): a manifest plus chunk sources in, a complete slot directory
//!   out (or none).
//! - [`disk`]: free space, and telling "disk full" from other I/O errors.
//!
//! **Architecture invariant**: this crate is synchronous (assembly runs a few scoped threads,
//! all joined before it returns) and does no networking. Bytes from
//! elsewhere reach a slot or the store only through [`chunk::decompress_verified`],
//! [`chunk::verify_plain`] or a [`chunk::VerifiedChunk`].

pub mod assemble;
pub mod build;
pub mod chunk;
pub mod disk;
pub mod store;

pub use assemble::{
    assemble, make_durable, missing_chunks, slot_bytes_needed, verify_slot, AssembleError,
    AssembleStats, ChunkSource, LocalChunks,
};
pub use build::{build_image, BuildError};
pub use chunk::{ChunkError, VerifiedChunk};
pub use store::{ChunkStore, StoreError};

/// Fsyncs a directory, making the names created, renamed or removed in it durable.
pub(crate) fn sync_dir(dir: &std::path::Path) -> std::io::Result<()> {
    std::fs::File::open(dir)?.sync_all()
}
