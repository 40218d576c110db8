//! Chunk bytes: compression, and the one verification path for chunk bytes from anywhere.
//!
//! Invariant: bytes that leave [`decompress_verified`], pass [`verify_plain`] or are held in
//! a [`VerifiedChunk`] are exactly the uncompressed chunk the [`ChunkRef`] names (its size
//! and BLAKE3 digest), whoever sent them. A [`VerifiedChunk`] can only be made here, by
//! checking, so code that takes one needs no second hash to know what it holds.
//!
//! Decoding is bounded before the digest is known: the compressed input, the zstd window and
//! the decoded output all have hard limits, so a hostile frame costs at most one chunk's worth
//! of memory. Each thread that decodes keeps one zstd context for reuse (about 100 KiB; up to
//! about 1 MiB more once a frame needed the largest window the format allows).

use std::cell::RefCell;
use std::io;
use std::ops::Deref;

use protocol::format;
use protocol::{ChunkRef, Digest};
use zstd::stream::raw::{self, DParameter, InBuffer, Operation, OutBuffer};

#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum ChunkError {
    #[error("chunk {digest}: {what} size {size} is over the limit of {limit} bytes")]
    TooLarge {
        digest: Digest,
        what: &'static str,
        size: u64,
        limit: u64,
    },
    #[error("chunk {digest}: not a valid zstd frame within the format's limits")]
    Corrupt {
        digest: Digest,
        #[source]
        source: std::io::Error,
    },
    #[error("chunk {digest}: decodes to {got} bytes, expected {expected}")]
    WrongSize {
        digest: Digest,
        expected: u32,
        got: u64,
    },
    #[error("chunk {digest}: decodes to more than the expected {expected} bytes")]
    Oversized { digest: Digest, expected: u32 },
    #[error("chunk bytes hash to {got}, expected {expected}")]
    DigestMismatch { expected: Digest, got: Digest },
}

/// Compresses one chunk into a single zstd frame at [`format::ZSTD_LEVEL`], with the content
/// size in the frame header (zstd's one-shot API always writes it).
pub fn compress(data: &[u8]) -> Vec<u8> {
    // The input is already in memory, the level is a valid constant and the output buffer is
    // sized by `compress_bound`, so zstd has no way left to fail short of running out of
    // memory, which aborts anyway.
    zstd::bulk::compress(data, format::ZSTD_LEVEL).expect("in-memory zstd compression cannot fail")
}

/// The uncompressed bytes of one chunk, checked against its [`ChunkRef`]. Only
/// [`VerifiedChunk::check`] and [`VerifiedChunk::decompress`] make one, so holding one proves
/// the bytes hash to [`VerifiedChunk::digest`]. Derefs to the bytes.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct VerifiedChunk {
    digest: Digest,
    bytes: Vec<u8>,
}

impl VerifiedChunk {
    /// Checks already-uncompressed bytes (e.g. read back from an installed file).
    pub fn check(expected: &ChunkRef, bytes: Vec<u8>) -> Result<VerifiedChunk, ChunkError> {
        verify_plain(expected, &bytes)?;
        Ok(VerifiedChunk {
            digest: expected.digest,
            bytes,
        })
    }

    /// Decodes `compressed` within the format's limits and checks the result; see
    /// [`decompress_verified`].
    pub fn decompress(expected: &ChunkRef, compressed: &[u8]) -> Result<VerifiedChunk, ChunkError> {
        let bytes = decompress_bounded(expected, compressed)?;
        VerifiedChunk::check(expected, bytes)
    }

    /// The digest the bytes were checked against.
    pub fn digest(&self) -> &Digest {
        &self.digest
    }

    /// Whether these are the bytes `expected` names (same digest, same size), without hashing
    /// again: for a caller that got the chunk from code it does not control.
    pub fn confirm(&self, expected: &ChunkRef) -> Result<(), ChunkError> {
        if self.digest != expected.digest {
            return Err(ChunkError::DigestMismatch {
                expected: expected.digest,
                got: self.digest,
            });
        }
        if self.bytes.len() as u64 != u64::from(expected.size) {
            return Err(ChunkError::WrongSize {
                digest: expected.digest,
                expected: expected.size,
                got: self.bytes.len() as u64,
            });
        }
        Ok(())
    }

    pub fn into_bytes(self) -> Vec<u8> {
        self.bytes
    }
}

impl Deref for VerifiedChunk {
    type Target = [u8];
    fn deref(&self) -> &[u8] {
        &self.bytes
    }
}

/// Decodes `compressed` and returns the chunk `expected` names, or an error saying why not.
///
/// Any compressed size up to [`format::MAX_COMPRESSED_CHUNK_SIZE`] is accepted, whatever
/// `expected.zsize` says: a mirror may have recompressed, and only the decoded bytes matter.
pub fn decompress_verified(expected: &ChunkRef, compressed: &[u8]) -> Result<Vec<u8>, ChunkError> {
    VerifiedChunk::decompress(expected, compressed).map(VerifiedChunk::into_bytes)
}

/// Decodes `compressed` into at most `expected.size` bytes, or says why it cannot: the
/// bounded half of verification. The caller still has to check the digest.
fn decompress_bounded(expected: &ChunkRef, compressed: &[u8]) -> Result<Vec<u8>, ChunkError> {
    let digest = expected.digest;
    check_claimed_size(expected)?;
    if compressed.len() > format::MAX_COMPRESSED_CHUNK_SIZE {
        return Err(ChunkError::TooLarge {
            digest,
            what: "compressed",
            size: compressed.len() as u64,
            limit: format::MAX_COMPRESSED_CHUNK_SIZE as u64,
        });
    }
    // Decode one byte past the expected size, never more: that is enough to tell "too long"
    // without letting a decompression bomb expand in memory.
    let limit = expected.size as usize + 1;
    let mut out = Vec::with_capacity(limit);
    DECODER
        .with(|cell| {
            let mut slot = cell.borrow_mut();
            let decoder = match &mut *slot {
                Some(decoder) => decoder,
                None => slot.insert(new_decoder()?),
            };
            decode_bounded(decoder, compressed, limit, &mut out)
        })
        .map_err(|source| ChunkError::Corrupt { digest, source })?;
    if out.len() >= limit {
        return Err(ChunkError::Oversized {
            digest,
            expected: expected.size,
        });
    }
    Ok(out)
}

thread_local! {
    /// One zstd decoding context per thread, reused for every chunk: setting one up costs
    /// more than decoding a typical chunk.
    static DECODER: RefCell<Option<raw::Decoder<'static>>> = const { RefCell::new(None) };
}

fn new_decoder() -> io::Result<raw::Decoder<'static>> {
    let mut decoder = raw::Decoder::new()?;
    // A frame that asks for a bigger window than any chunk needs is refused before zstd
    // allocates it.
    decoder.set_parameter(DParameter::WindowLogMax(format::ZSTD_WINDOW_LOG_MAX))?;
    Ok(decoder)
}

/// Decodes the frames in `compressed` into `out` (empty, with room for `limit` bytes), and
/// stops as soon as `limit` bytes are out. The caller tells "too long" by `out.len()`.
/// With the whole frame in memory and room for its declared size, zstd decodes straight into
/// `out` without a window buffer; otherwise the window is bounded by `WindowLogMax`.
fn decode_bounded(
    decoder: &mut raw::Decoder<'static>,
    compressed: &[u8],
    limit: usize,
    out: &mut Vec<u8>,
) -> io::Result<()> {
    // Whatever a previous (perhaps failed) chunk left in the context is dropped; the
    // parameters stay.
    decoder.reinit()?;
    let mut input = InBuffer::around(compressed);
    let mut output = OutBuffer::around(out);
    let mut in_frame = false;
    while input.pos() < compressed.len() || in_frame {
        let before = (input.pos(), output.pos());
        let hint = decoder.run(&mut input, &mut output)?;
        if output.pos() >= limit {
            return Ok(());
        }
        in_frame = hint != 0;
        if in_frame && (input.pos(), output.pos()) == before {
            return Err(io::Error::new(
                io::ErrorKind::UnexpectedEof,
                "incomplete zstd frame",
            ));
        }
        if !in_frame {
            // Concatenated frames decode as one chunk, as a streaming decoder would.
            decoder.reinit()?;
        }
    }
    Ok(())
}

/// Checks already-uncompressed bytes (e.g. read back from an installed file) against `expected`.
pub fn verify_plain(expected: &ChunkRef, data: &[u8]) -> Result<(), ChunkError> {
    check_claimed_size(expected)?;
    if data.len() as u64 != u64::from(expected.size) {
        return Err(ChunkError::WrongSize {
            digest: expected.digest,
            expected: expected.size,
            got: data.len() as u64,
        });
    }
    let got = Digest::of(data);
    if got != expected.digest {
        return Err(ChunkError::DigestMismatch {
            expected: expected.digest,
            got,
        });
    }
    Ok(())
}

/// The claimed size sizes a buffer, so it is bounded even if the caller skipped
/// `Manifest::validate`.
fn check_claimed_size(expected: &ChunkRef) -> Result<(), ChunkError> {
    if expected.size as usize > format::MAX_CHUNK_SIZE {
        return Err(ChunkError::TooLarge {
            digest: expected.digest,
            what: "uncompressed",
            size: u64::from(expected.size),
            limit: format::MAX_CHUNK_SIZE as u64,
        });
    }
    Ok(())
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use std::io::{self, Read};

    use proptest::prelude::*;

    use super::*;

    fn chunk_ref(data: &[u8], compressed: &[u8]) -> ChunkRef {
        ChunkRef {
            digest: Digest::of(data),
            size: data.len() as u32,
            zsize: compressed.len() as u32,
        }
    }

    /// 100 MiB of zeros as one zstd frame, streamed so the test itself stays small.
    fn zero_bomb(window_log: u32) -> Vec<u8> {
        let zeros = io::repeat(0).take(100 << 20);
        let mut encoder = zstd::stream::read::Encoder::new(zeros, 1).unwrap();
        encoder.window_log(window_log).unwrap();
        let mut out = Vec::new();
        encoder.read_to_end(&mut out).unwrap();
        out
    }

    #[test]
    fn compressed_frames_carry_their_content_size() {
        let data = vec![7u8; 1000];
        let frame = compress(&data);
        assert_eq!(
            zstd::zstd_safe::get_frame_content_size(&frame).ok(),
            Some(Some(1000))
        );
    }

    #[test]
    fn a_decompression_bomb_stops_one_byte_past_the_claimed_size() {
        let bomb = zero_bomb(17);
        assert!(
            bomb.len() <= format::MAX_COMPRESSED_CHUNK_SIZE,
            "bomb is {} bytes",
            bomb.len()
        );
        let claim = ChunkRef {
            digest: Digest::of(&[0u8; 1024]),
            size: 1024,
            zsize: bomb.len() as u32,
        };
        let started = std::time::Instant::now();
        let err = decompress_verified(&claim, &bomb).unwrap_err();
        assert!(
            matches!(err, ChunkError::Oversized { expected: 1024, .. }),
            "{err}"
        );
        // Decoding all 100 MiB would take far longer than decoding the first KiB.
        assert!(started.elapsed() < std::time::Duration::from_secs(5));
    }

    #[test]
    fn a_frame_asking_for_a_huge_window_is_refused() {
        let bomb = zero_bomb(27);
        let claim = ChunkRef {
            digest: Digest::of(&[0u8; 1024]),
            size: 1024,
            zsize: bomb.len() as u32,
        };
        let err = decompress_verified(&claim, &bomb).unwrap_err();
        assert!(matches!(err, ChunkError::Corrupt { .. }), "{err}");
    }

    #[test]
    fn oversized_input_and_claims_are_refused_before_decoding() {
        let big = vec![0u8; format::MAX_COMPRESSED_CHUNK_SIZE + 1];
        let claim = ChunkRef {
            digest: Digest::of(b""),
            size: 1,
            zsize: 1,
        };
        assert!(matches!(
            decompress_verified(&claim, &big),
            Err(ChunkError::TooLarge {
                what: "compressed",
                ..
            })
        ));
        let huge_claim = ChunkRef {
            size: u32::MAX,
            ..claim
        };
        assert!(matches!(
            decompress_verified(&huge_claim, &compress(b"x")),
            Err(ChunkError::TooLarge {
                what: "uncompressed",
                ..
            })
        ));
    }

    #[test]
    fn wrong_bytes_are_refused_whatever_the_frame_says() {
        let good = b"the bytes the manifest names".to_vec();
        let claim = chunk_ref(&good, &compress(&good));
        let same_len_other = b"the bytes an attacker chose!".to_vec();
        assert_eq!(good.len(), same_len_other.len());
        assert!(matches!(
            decompress_verified(&claim, &compress(&same_len_other)),
            Err(ChunkError::DigestMismatch { .. })
        ));
        assert!(matches!(
            decompress_verified(&claim, &compress(&good[..5])),
            Err(ChunkError::WrongSize { got: 5, .. })
        ));
        assert!(matches!(
            decompress_verified(&claim, b"not zstd at all"),
            Err(ChunkError::Corrupt { .. })
        ));
        let mut trailing = compress(&good);
        trailing.extend_from_slice(b"garbage");
        assert!(matches!(
            decompress_verified(&claim, &trailing),
            Err(ChunkError::Corrupt { .. })
        ));
        assert!(verify_plain(&claim, &good).is_ok());
        assert!(verify_plain(&claim, &same_len_other).is_err());
    }

    #[test]
    fn a_recompressed_chunk_is_accepted_whatever_its_zsize() {
        let data: Vec<u8> = (0..50_000u32).map(|i| (i % 251) as u8).collect();
        let claim = chunk_ref(&data, &compress(&data));
        // Another level plus a frame checksum: the same bytes, a different frame.
        let mut other = zstd::bulk::Compressor::new(19).unwrap();
        other.include_checksum(true).unwrap();
        let recompressed = other.compress(&data).unwrap();
        assert_ne!(recompressed.len() as u32, claim.zsize);
        assert_eq!(decompress_verified(&claim, &recompressed).unwrap(), data);
    }

    #[test]
    fn the_reused_decoder_refuses_a_truncated_frame_then_decodes_the_next_chunk() {
        let data: Vec<u8> = (0..50_000u32).map(|i| (i % 251) as u8).collect();
        let good = compress(&data);
        let claim = chunk_ref(&data, &good);
        for cut in [1, good.len() / 2, good.len() - 1] {
            assert!(
                matches!(
                    decompress_verified(&claim, &good[..cut]),
                    Err(ChunkError::Corrupt { .. })
                ),
                "cut at {cut}"
            );
            // Same thread, same decoder: no state from the failed frame leaks into this one.
            assert_eq!(decompress_verified(&claim, &good).unwrap(), data);
        }
        // Concatenated frames are one stream of bytes, as for any zstd decoder.
        let (head, tail) = data.split_at(20_000);
        let mut two_frames = compress(head);
        two_frames.extend_from_slice(&compress(tail));
        assert_eq!(decompress_verified(&claim, &two_frames).unwrap(), data);
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(64))]

        #[test]
        fn compress_then_decompress_verified_round_trips(
            data in prop::collection::vec(any::<u8>(), 0..=format::MAX_CHUNK_SIZE)
        ) {
            let compressed = compress(&data);
            prop_assert!(compressed.len() <= format::MAX_COMPRESSED_CHUNK_SIZE);
            let claim = chunk_ref(&data, &compressed);
            prop_assert_eq!(decompress_verified(&claim, &compressed).unwrap(), data);
        }
    }
}
