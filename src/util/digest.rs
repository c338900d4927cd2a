//! A stable 64-bit digest of bytes, strings, token ids and files: the key of every on-disk
//! cache entry and of the identities recorded beside outputs.

use anyhow::{Context, Result};
use std::path::Path;

/// FNV-1a, 64-bit: stable across platforms and Rust versions (unlike std's hasher).
#[derive(Clone)]
pub struct Digest(u64);

impl Default for Digest {
    fn default() -> Self {
        Self(0xcbf2_9ce4_8422_2325)
    }
}

impl Digest {
    pub fn bytes(&mut self, data: &[u8]) -> &mut Self {
        for b in data {
            self.0 ^= *b as u64;
            self.0 = self.0.wrapping_mul(0x0100_0000_01b3);
        }
        self
    }

    pub fn str(&mut self, s: &str) -> &mut Self {
        self.bytes(&(s.len() as u64).to_le_bytes())
            .bytes(s.as_bytes())
    }

    pub fn ids(&mut self, ids: &[u32]) -> &mut Self {
        self.bytes(&(ids.len() as u64).to_le_bytes());
        for i in ids {
            self.bytes(&i.to_le_bytes());
        }
        self
    }

    /// A file's identity: its name, size and modification time (contents of small files).
    pub fn file(&mut self, path: &Path) -> Result<&mut Self> {
        let meta =
            std::fs::metadata(path).with_context(|| format!("{}: cannot stat", path.display()))?;
        self.str(&path.file_name().unwrap_or_default().to_string_lossy());
        self.bytes(&meta.len().to_le_bytes());
        if meta.len() <= 64 << 20 {
            let data =
                std::fs::read(path).with_context(|| format!("{}: cannot read", path.display()))?;
            self.bytes(&data);
        } else if let Ok(m) = meta.modified() {
            let t = m.duration_since(std::time::UNIX_EPOCH).unwrap_or_default();
            self.bytes(&t.as_nanos().to_le_bytes());
        }
        Ok(self)
    }

    pub fn hex(&self) -> String {
        format!("{:016x}", self.0)
    }
}
