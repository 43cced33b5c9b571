//! The auth token file given to clients (`refctl --token-file`,
//! `refd-bench load --token-file`): the token's bytes, trailing newlines
//! removed, the same reading as `refd serve --token-file` (so one file
//! serves both ends). The token goes in HELLO
//! ([`ClientConfig::token`](crate::ClientConfig::token)); the daemon
//! checks it on TCP listeners (docs/protocol.md, HELLO).

use std::path::{Path, PathBuf};

use refd_proto::HELLO_TOKEN_BYTES_MAX;

/// Why a token file cannot be used.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("token file {}: {reason}", path.display())]
pub struct TokenFileError {
    /// The file.
    pub path: PathBuf,
    /// Why: the read error, or the token's length.
    pub reason: String,
}

/// The token in the file at `path`: its bytes without trailing `\n` and
/// `\r`, 1..=[`HELLO_TOKEN_BYTES_MAX`] of them.
pub fn read_token_file(path: &Path) -> Result<Vec<u8>, TokenFileError> {
    let err = |reason: String| TokenFileError {
        path: path.to_owned(),
        reason,
    };
    let mut token = std::fs::read(path).map_err(|e| err(e.to_string()))?;
    while token.last().is_some_and(|b| *b == b'\n' || *b == b'\r') {
        token.pop();
    }
    if token.is_empty() || token.len() > HELLO_TOKEN_BYTES_MAX {
        return Err(err(format!(
            "the token must be 1..={HELLO_TOKEN_BYTES_MAX} bytes"
        )));
    }
    Ok(token)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tokens_lose_trailing_newlines_and_are_bounded() {
        let dir = std::env::temp_dir().join(format!("refd-client-token-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let p = dir.join("token");
        std::fs::write(&p, b"secret\r\n\n").unwrap();
        assert_eq!(read_token_file(&p).unwrap(), b"secret");
        std::fs::write(&p, b"in\nside\n").unwrap();
        assert_eq!(read_token_file(&p).unwrap(), b"in\nside");
        for bad in [&b"\n"[..], b"", &[b'x'; HELLO_TOKEN_BYTES_MAX + 1]] {
            std::fs::write(&p, bad).unwrap();
            let e = read_token_file(&p).unwrap_err();
            assert!(e.to_string().contains("the token must be 1..="), "{e}");
        }
        std::fs::write(&p, [b'x'; HELLO_TOKEN_BYTES_MAX]).unwrap();
        assert_eq!(read_token_file(&p).unwrap().len(), HELLO_TOKEN_BYTES_MAX);
        let missing = dir.join("missing");
        let e = read_token_file(&missing).unwrap_err();
        assert_eq!(e.path, missing);
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
