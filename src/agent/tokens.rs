//! Unforgeable, stateless tokens: HMAC-SHA256 under the installation's
//! lease key (kept in a Kubernetes Secret), checked in constant time.
//!
//! - A **VM token** proves which VM is calling: it is placed in that VM's
//!   metadata at creation and covers the instance name and owner uid, so a
//!   VM can never speak for another one.
//! - A **lease token** proves which attempt of which shard is reporting: it
//!   covers the TestRun uid, shard, attempt and lease id, so a report from
//!   any other lease can be told apart and refused.

use base64::Engine as _;
use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use hmac::{Hmac, Mac};
use sha2::Sha256;

type HmacSha256 = Hmac<Sha256>;

/// Length of a lease key in bytes.
pub const KEY_LEN: usize = 32;

/// The secret key tokens are made with.
#[derive(Clone)]
pub struct LeaseKey([u8; KEY_LEN]);

impl std::fmt::Debug for LeaseKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("LeaseKey(..)")
    }
}

/// Which shard attempt a lease belongs to.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub struct LeaseScope<'a> {
    /// TestRun uid.
    pub uid: &'a str,
    /// Shard index.
    pub shard: i32,
    /// Attempt number.
    pub attempt: i32,
    /// Lease id.
    pub lease_id: i64,
}

impl LeaseKey {
    /// A key from raw bytes; `None` unless exactly [`KEY_LEN`] bytes.
    pub fn from_bytes(bytes: &[u8]) -> Option<Self> {
        <[u8; KEY_LEN]>::try_from(bytes).ok().map(Self)
    }

    /// A fresh random key.
    pub fn generate() -> Self {
        Self(rand::random())
    }

    /// The raw bytes (to store in the Secret).
    pub fn as_bytes(&self) -> &[u8] {
        &self.0
    }

    fn sign(&self, message: &str) -> String {
        URL_SAFE_NO_PAD.encode(self.mac(message).finalize().into_bytes())
    }

    fn mac(&self, message: &str) -> HmacSha256 {
        // HMAC pads a key shorter than the hash's block (64 bytes) with
        // zeros; padding it here uses the infallible fixed-size constructor.
        let mut block = [0u8; 64];
        block[..KEY_LEN].copy_from_slice(&self.0);
        let mut mac = <HmacSha256 as hmac::digest::KeyInit>::new(&block.into());
        mac.update(message.as_bytes());
        mac
    }

    fn verify(&self, message: &str, token: &str) -> bool {
        match URL_SAFE_NO_PAD.decode(token) {
            Ok(bytes) => self.mac(message).verify_slice(&bytes).is_ok(),
            Err(_) => false,
        }
    }

    /// The token of a VM.
    pub fn vm_token(&self, instance: &str, owner_uid: &str) -> String {
        self.sign(&vm_message(instance, owner_uid))
    }

    /// Whether `token` is the token of that VM (constant time).
    pub fn verify_vm(&self, instance: &str, owner_uid: &str, token: &str) -> bool {
        self.verify(&vm_message(instance, owner_uid), token)
    }

    /// The token of a lease.
    pub fn lease_token(&self, scope: &LeaseScope<'_>) -> String {
        self.sign(&lease_message(scope))
    }

    /// Whether `token` is the token of that lease (constant time).
    pub fn verify_lease(&self, scope: &LeaseScope<'_>, token: &str) -> bool {
        self.verify(&lease_message(scope), token)
    }
}

fn vm_message(instance: &str, owner_uid: &str) -> String {
    format!("vm\n{instance}\n{owner_uid}")
}

fn lease_message(scope: &LeaseScope<'_>) -> String {
    format!("lease\n{}\n{}\n{}\n{}", scope.uid, scope.shard, scope.attempt, scope.lease_id)
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn scope(lease_id: i64) -> LeaseScope<'static> {
        LeaseScope { uid: "uid-1", shard: 2, attempt: 1, lease_id }
    }

    #[test]
    fn lease_tokens_verify_only_for_their_lease() {
        let key = LeaseKey::generate();
        let token = key.lease_token(&scope(7));
        assert!(key.verify_lease(&scope(7), &token));
        assert!(!key.verify_lease(&scope(8), &token), "another lease id");
        assert!(!key.verify_lease(&LeaseScope { attempt: 2, ..scope(7) }, &token), "another attempt");
        assert!(!key.verify_lease(&LeaseScope { shard: 3, ..scope(7) }, &token), "another shard");
        assert!(!key.verify_lease(&LeaseScope { uid: "uid-2", ..scope(7) }, &token), "another run");
        assert!(!LeaseKey::generate().verify_lease(&scope(7), &token), "another key");
        assert!(!key.verify_lease(&scope(7), "not base64 !"));
        assert!(!key.verify_lease(&scope(7), ""));
    }

    #[test]
    fn vm_tokens_cannot_be_moved_between_vms() {
        let key = LeaseKey::from_bytes(&[7; KEY_LEN]).expect("32 bytes");
        let token = key.vm_token("tr-a-0-1", "uid-1");
        assert!(key.verify_vm("tr-a-0-1", "uid-1", &token));
        assert!(!key.verify_vm("tr-a-1-1", "uid-1", &token));
        assert!(!key.verify_vm("tr-a-0-1", "uid-2", &token));
        // A VM token is never a lease token.
        assert!(!key.verify_lease(&scope(1), &token));
    }

    #[test]
    fn padding_the_key_gives_standard_hmac() {
        // RFC 4231 test case 2 uses a 4-byte key; check the same padding
        // rule on our 32-byte key against the variable-length constructor.
        let key = LeaseKey::from_bytes(&[9; KEY_LEN]).expect("key");
        let mut reference = <HmacSha256 as Mac>::new_from_slice(&[9; KEY_LEN]).expect("any length");
        reference.update(b"vm\nx\ny");
        assert_eq!(key.vm_token("x", "y"), URL_SAFE_NO_PAD.encode(reference.finalize().into_bytes()));
    }

    #[test]
    fn keys_must_have_the_right_length() {
        assert!(LeaseKey::from_bytes(&[0; 31]).is_none());
        assert!(LeaseKey::from_bytes(&[0; 33]).is_none());
        assert_eq!(format!("{:?}", LeaseKey::generate()), "LeaseKey(..)", "keys never reach logs");
    }

    proptest! {
        #[test]
        fn flipping_any_character_breaks_the_token(pos in 0usize..43, lease in 0i64..1000) {
            let key = LeaseKey::from_bytes(&[3; KEY_LEN]).expect("key");
            let token = key.lease_token(&scope(lease));
            let mut chars: Vec<char> = token.chars().collect();
            let i = pos % chars.len();
            chars[i] = if chars[i] == 'A' { 'B' } else { 'A' };
            let forged: String = chars.into_iter().collect();
            prop_assert!(!key.verify_lease(&scope(lease), &forged));
        }
    }
}
