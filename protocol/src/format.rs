//! The image format, pinned: every parameter that changes the bytes of an image lives here,
//! named by [`FORMAT_VERSION`], which every manifest carries. Coordinator and agent read the
//! same constants, so they cannot disagree about how an image is cut or compressed.
//!
//! Changing any value here is a new format version, never an edit in place.

/// `fleet-image/1`: FastCDC (2020 variant) with the [`CHUNKER`] sizes, BLAKE3-256 of the
/// uncompressed chunk as its name, each chunk a single zstd frame at [`ZSTD_LEVEL`].
pub const FORMAT_VERSION: u32 = 1;

/// Content-defined chunk sizes in bytes (FastCDC 2020: min, average, max).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ChunkerParams {
    pub min_size: u32,
    pub avg_size: u32,
    pub max_size: u32,
}

pub const CHUNKER: ChunkerParams = ChunkerParams {
    min_size: 16 * 1024,
    avg_size: 64 * 1024,
    max_size: 256 * 1024,
};

/// zstd level used when building chunks. Decoders do not depend on it.
pub const ZSTD_LEVEL: i32 = 3;

/// Largest zstd window a decoder accepts (log2 bytes). A chunk is at most
/// [`ChunkerParams::max_size`], so a 1 MiB window is ample; anything asking for more is hostile.
pub const ZSTD_WINDOW_LOG_MAX: u32 = 20;

/// Largest uncompressed chunk accepted from anywhere.
pub const MAX_CHUNK_SIZE: usize = CHUNKER.max_size as usize;

/// Largest compressed chunk accepted from anywhere: zstd's worst-case expansion of
/// [`MAX_CHUNK_SIZE`] (`ZSTD_compressBound`), rounded up.
pub const MAX_COMPRESSED_CHUNK_SIZE: usize = MAX_CHUNK_SIZE + MAX_CHUNK_SIZE / 128 + 1024;

/// Largest serialized manifest accepted (the JSON inside its envelope).
pub const MAX_MANIFEST_BYTES: usize = 8 * 1024 * 1024;

/// Largest number of entries in one image.
pub const MAX_ENTRIES: usize = 200_000;

/// Largest total uncompressed size of one image: 64 GiB.
pub const MAX_IMAGE_BYTES: u64 = 64 * 1024 * 1024 * 1024;

/// Largest MQTT packet either side sends or accepts. A command embeds a manifest envelope in
/// another envelope (base64 twice: 16/9 of [`MAX_MANIFEST_BYTES`]) plus headroom.
pub const MAX_MQTT_PACKET: usize = 16 * 1024 * 1024;

/// Largest path inside an image, in bytes.
pub const MAX_PATH_BYTES: usize = 4096;

const _: () = assert!(MAX_MQTT_PACKET > MAX_MANIFEST_BYTES / 9 * 16 + 64 * 1024);
const _: () = assert!((1usize << ZSTD_WINDOW_LOG_MAX) >= MAX_CHUNK_SIZE);
