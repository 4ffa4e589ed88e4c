//! The runtime options containerd passes in `CreateTaskRequest.options`:
//! for a runtime that is not runc, containerd's CRI plugin packs a
//! handler's `[...runtimes.<name>.options]` as
//! `runtimeoptions.v1.Options { type_url = 1, config_path = 2 }`, and
//! `ConfigPath` there names the configuration file for that RuntimeClass
//! (as Kata reads it), so two handlers can point one shim at two files.

use std::path::PathBuf;

/// The type URL's last part of the options that carry `ConfigPath`.
const RUNTIME_OPTIONS: &str = "runtimeoptions.v1.Options";

/// `ConfigPath` from the options, if they are runtimeoptions and name one.
/// Other option types are not ours to read (`None`); a runtimeoptions
/// message that does not decode is an error.
pub fn config_path(type_url: &str, value: &[u8]) -> Result<Option<PathBuf>, String> {
    if !type_url.ends_with(RUNTIME_OPTIONS) {
        return Ok(None);
    }
    let mut rest = value;
    let mut path = None;
    while !rest.is_empty() {
        let key = varint(&mut rest)?;
        let (field, wire) = (key >> 3, key & 7);
        match wire {
            0 => {
                varint(&mut rest)?;
            }
            2 => {
                let len = usize::try_from(varint(&mut rest)?)
                    .map_err(|_| "a field longer than memory".to_owned())?;
                if len > rest.len() {
                    return Err(format!("field {field}: {len} bytes, {} left", rest.len()));
                }
                let (bytes, after) = rest.split_at(len);
                rest = after;
                if field == 2 {
                    let text = std::str::from_utf8(bytes)
                        .map_err(|_| "ConfigPath is not UTF-8".to_owned())?;
                    path = (!text.is_empty()).then(|| PathBuf::from(text));
                }
            }
            1 | 5 => {
                let n = if wire == 1 { 8 } else { 4 };
                if rest.len() < n {
                    return Err(format!("field {field}: truncated"));
                }
                rest = &rest[n..];
            }
            other => return Err(format!("field {field}: wire type {other}")),
        }
    }
    Ok(path)
}

fn varint(buf: &mut &[u8]) -> Result<u64, String> {
    let mut v = 0u64;
    for shift in (0..64).step_by(7) {
        let (&b, rest) = buf
            .split_first()
            .ok_or_else(|| "truncated varint".to_owned())?;
        *buf = rest;
        v |= u64::from(b & 0x7f) << shift;
        if b & 0x80 == 0 {
            return Ok(v);
        }
    }
    Err("varint longer than 64 bits".into())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn message(fields: &[(u8, &str)]) -> Vec<u8> {
        let mut m = Vec::new();
        for (field, text) in fields {
            m.push((field << 3) | 2);
            m.push(text.len() as u8);
            m.extend_from_slice(text.as_bytes());
        }
        m
    }

    #[test]
    fn config_path_is_read_from_runtime_options_only() {
        let m = message(&[(1, "io.containerd.rtv.v2"), (2, "/etc/rtv/tiny.toml")]);
        assert_eq!(
            config_path("runtimeoptions.v1.Options", &m),
            Ok(Some(PathBuf::from("/etc/rtv/tiny.toml")))
        );
        assert_eq!(
            config_path("type.googleapis.com/runtimeoptions.v1.Options", &m),
            Ok(Some(PathBuf::from("/etc/rtv/tiny.toml")))
        );
        assert_eq!(config_path("containerd.runc.v1.Options", &m), Ok(None));
        assert_eq!(
            config_path("runtimeoptions.v1.Options", &message(&[(1, "x")])),
            Ok(None)
        );
        assert_eq!(config_path("runtimeoptions.v1.Options", &[]), Ok(None));
    }

    #[test]
    fn broken_options_are_errors_not_panics() {
        assert!(config_path("runtimeoptions.v1.Options", &[0x12, 9, b'/']).is_err());
        assert!(config_path("runtimeoptions.v1.Options", &[0x12]).is_err());
        assert!(config_path("runtimeoptions.v1.Options", &[0x13]).is_err());
        assert!(config_path("runtimeoptions.v1.Options", &[0xff; 11]).is_err());
        let mut rng = 0x2545_f491_4f6c_dd1du64;
        for _ in 0..2000 {
            let len = (rng % 24) as usize;
            let bytes: Vec<u8> = (0..len)
                .map(|_| {
                    rng ^= rng << 13;
                    rng ^= rng >> 7;
                    rng ^= rng << 17;
                    rng as u8
                })
                .collect();
            let _ = config_path("runtimeoptions.v1.Options", &bytes);
        }
    }
}
