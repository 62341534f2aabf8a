//! AES-256-GCM itself, from one of two implementations.
//!
//! Both compute the same function (the same key, nonce and data give the same ciphertext and
//! tag), so two hosts interoperate whichever each uses; the choice is only about speed.
//! `aws-lc-rs` (AWS-LC's assembly: AES-NI/VAES with carry-less multiply, stitched) seals
//! several times faster than `aes-gcm` (RustCrypto) on the same core, and the cipher is the
//! largest single cost of the pipeline (`skyferry-bench cipher` and `pipeline --cipher`
//! measure both), so it is the default; `aes-gcm` stays available for comparison.

use std::sync::atomic::{AtomicU8, Ordering};

use aes_gcm::aead::{AeadInOut, KeyInit};

/// Bytes of the GCM tag.
pub const TAG_LEN: usize = 16;

/// Which AES-256-GCM implementation seals and opens frames.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum AeadImpl {
    /// AWS-LC through `aws-lc-rs` (the default: the fastest measured).
    #[default]
    AwsLc,
    /// RustCrypto's `aes-gcm`.
    RustCrypto,
}

impl AeadImpl {
    /// The name operators type.
    pub fn name(self) -> &'static str {
        match self {
            AeadImpl::AwsLc => "aws-lc-rs",
            AeadImpl::RustCrypto => "aes-gcm",
        }
    }
}

impl std::str::FromStr for AeadImpl {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        match s {
            "aws-lc-rs" => Ok(AeadImpl::AwsLc),
            "aes-gcm" => Ok(AeadImpl::RustCrypto),
            other => Err(format!(
                "unknown AES-GCM implementation {other:?}; use aws-lc-rs or aes-gcm"
            )),
        }
    }
}

static DEFAULT_IMPL: AtomicU8 = AtomicU8::new(0);

/// Chooses the implementation every sealer and opener created from now on uses.
pub fn set_default_impl(imp: AeadImpl) {
    DEFAULT_IMPL.store(imp as u8, Ordering::Relaxed);
}

/// The implementation new sealers and openers use.
pub fn default_impl() -> AeadImpl {
    match DEFAULT_IMPL.load(Ordering::Relaxed) {
        0 => AeadImpl::AwsLc,
        _ => AeadImpl::RustCrypto,
    }
}

/// An AES-256-GCM key, ready to seal or open in place.
pub enum Aead {
    /// AWS-LC.
    AwsLc(aws_lc_rs::aead::LessSafeKey),
    /// RustCrypto.
    RustCrypto(Box<aes_gcm::Aes256Gcm>),
}

impl std::fmt::Debug for Aead {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            Aead::AwsLc(_) => "Aead(aws-lc-rs)",
            Aead::RustCrypto(_) => "Aead(aes-gcm)",
        })
    }
}

/// The tag did not verify.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Unauthentic;

impl Aead {
    /// A key for `imp`.
    pub fn new(imp: AeadImpl, key: &[u8; 32]) -> Self {
        match imp {
            AeadImpl::AwsLc => Aead::AwsLc(aws_lc_rs::aead::LessSafeKey::new(
                aws_lc_rs::aead::UnboundKey::new(&aws_lc_rs::aead::AES_256_GCM, key)
                    .expect("a 32-byte key is valid for AES-256-GCM"),
            )),
            AeadImpl::RustCrypto => {
                Aead::RustCrypto(Box::new(aes_gcm::Aes256Gcm::new(&(*key).into())))
            }
        }
    }

    /// Encrypts `body` in place, authenticating `aad` too; returns the tag.
    pub fn seal(&self, nonce: [u8; 12], aad: &[u8], body: &mut [u8]) -> [u8; TAG_LEN] {
        match self {
            Aead::AwsLc(k) => {
                let tag = k
                    .seal_in_place_separate_tag(
                        aws_lc_rs::aead::Nonce::assume_unique_for_key(nonce),
                        aws_lc_rs::aead::Aad::from(aad),
                        body,
                    )
                    .expect("frame bodies are far below GCM's length limit");
                tag.as_ref().try_into().expect("16-byte tag")
            }
            Aead::RustCrypto(k) => k
                .encrypt_inout_detached(&nonce.into(), aad, body.into())
                .expect("frame bodies are far below GCM's length limit")
                .into(),
        }
    }

    /// Decrypts `body` in place if `tag` authenticates it and `aad`. On failure `body` may
    /// hold garbage: callers drop the frame.
    pub fn open(
        &self,
        nonce: [u8; 12],
        aad: &[u8],
        body: &mut [u8],
        tag: &[u8; TAG_LEN],
    ) -> Result<(), Unauthentic> {
        match self {
            Aead::AwsLc(k) => k
                .open_in_place_separate_tag(
                    aws_lc_rs::aead::Nonce::assume_unique_for_key(nonce),
                    aws_lc_rs::aead::Aad::from(aad),
                    tag,
                    body,
                )
                .map(|_| ())
                .map_err(|_| Unauthentic),
            Aead::RustCrypto(k) => k
                .decrypt_inout_detached(&nonce.into(), aad, body.into(), tag.into())
                .map_err(|_| Unauthentic),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn both_implementations_compute_the_same_function() {
        let key = [7u8; 32];
        let (a, b) = (
            Aead::new(AeadImpl::AwsLc, &key),
            Aead::new(AeadImpl::RustCrypto, &key),
        );
        for len in [0, 1, 15, 16, 17, 1000, 65_000] {
            let plain: Vec<u8> = (0..len)
                .map(|i: usize| u8::try_from(i % 251).expect("small"))
                .collect();
            let (mut x, mut y) = (plain.clone(), plain.clone());
            let tx = a.seal([1; 12], b"header", &mut x);
            let ty = b.seal([1; 12], b"header", &mut y);
            assert_eq!((&x, tx), (&y, ty), "len {len}");
            // Each opens what the other sealed.
            b.open([1; 12], b"header", &mut x, &tx).unwrap();
            a.open([1; 12], b"header", &mut y, &ty).unwrap();
            assert_eq!((&x, &y), (&plain, &plain));
        }
    }

    #[test]
    fn a_bad_tag_or_header_is_refused_by_both() {
        for imp in [AeadImpl::AwsLc, AeadImpl::RustCrypto] {
            let k = Aead::new(imp, &[9; 32]);
            let mut body = vec![5u8; 100];
            let tag = k.seal([2; 12], b"h", &mut body);
            let mut bad = tag;
            bad[0] ^= 1;
            assert_eq!(
                k.open([2; 12], b"h", &mut body.clone(), &bad),
                Err(Unauthentic)
            );
            assert_eq!(
                k.open([2; 12], b"H", &mut body.clone(), &tag),
                Err(Unauthentic)
            );
            assert_eq!(
                k.open([3; 12], b"h", &mut body.clone(), &tag),
                Err(Unauthentic)
            );
            assert!(k.open([2; 12], b"h", &mut body, &tag).is_ok());
            assert_eq!(body, vec![5u8; 100]);
        }
        assert_eq!("aes-gcm".parse(), Ok(AeadImpl::RustCrypto));
        assert_eq!("aws-lc-rs".parse(), Ok(AeadImpl::AwsLc));
        assert!("chacha".parse::<AeadImpl>().is_err());
    }
}
