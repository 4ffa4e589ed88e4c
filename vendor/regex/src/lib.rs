//! rtv's stand-in for the [`regex`](https://crates.io/crates/regex) crate.
//!
//! The workspace's users of `regex` are `oci-spec` (0.10, and 0.9 through
//! `containerd-shim`; `runtime` feature), which validates
//! `process.execCPUAffinity` with one pattern:
//!
//! ```text
//! ^(\d+(-\d+)?)(,\d+(-\d+)?)*$
//! ```
//!
//! and `protobuf-codegen` 3.7.2, which `containerd-shim-protos`'s build
//! script runs on the host (it never reaches a binary), and which takes the
//! file name out of a well-known type's path with
//!
//! ```text
//! ^google/protobuf/([^/]+\.proto)$
//! ```
//!
//! The real crate compiles it at run time with its general engines and
//! Unicode tables: 1.0 MB of the 2.85 MB statically linked guest agent
//! (measured with oci-spec 0.10.0 and regex 1.13.2), which the guest kernel
//! unpacks on every boot, in emulated kernel code on PVM hosts.
//!
//! This crate offers the part of `regex`'s API that they call
//! (`Regex::new`, `Regex::is_match`, `Regex::captures`, `Captures::get`,
//! `Match::as_str`) and matches the patterns it knows by
//! hand, with the real crate's semantics, Unicode included: `\d` is any
//! character of general category `Nd` (Unicode 16.0, as regex-syntax 0.8),
//! and `$` is the end of the text only.
//!
//! Any other pattern makes `Regex::new` fail, naming it (oci-spec `expect`s
//! its patterns, so that would be a panic). The tests keep that from
//! reaching a build: they run oci-spec's own validation through this crate,
//! and fail when the crates that use `regex` are no longer exactly
//! oci-spec 0.10.0 and 0.9.0 and protobuf-codegen 3.7.2, whose every
//! pattern is known here. Upgrading oci-spec,
//! or adding a dependency on `regex`, means checking their patterns (or
//! dropping this patch).

use std::fmt;

/// A compiled pattern: one of the patterns this crate knows.
#[derive(Clone)]
pub struct Regex {
    pattern: &'static str,
    matcher: Matcher,
    captor: Captor,
}

/// Whether a pattern matches a haystack.
type Matcher = fn(&str) -> bool;

/// Where a pattern's groups matched in a haystack (group 0 is the whole
/// match; `None` for a group that did not participate), or `None` if it
/// does not match.
type Captor = fn(&str) -> Option<Vec<Option<(usize, usize)>>>;

/// The patterns this crate knows, each with its matcher and captor.
const PATTERNS: &[(&str, Matcher, Captor)] = &[
    (r"^(\d+(-\d+)?)(,\d+(-\d+)?)*$", cpu_list, cpu_list_groups),
    (
        r"^google/protobuf/([^/]+\.proto)$",
        |s| protobuf_well_known(s).is_some(),
        protobuf_well_known,
    ),
];

impl Regex {
    /// Compiles `re`, which must be one of the patterns this crate knows.
    pub fn new(re: &str) -> Result<Regex, Error> {
        PATTERNS
            .iter()
            .find(|(p, _, _)| *p == re)
            .map(|&(pattern, matcher, captor)| Regex {
                pattern,
                matcher,
                captor,
            })
            .ok_or_else(|| Error {
                pattern: re.to_owned(),
            })
    }

    /// Whether the pattern matches somewhere in `haystack` (every known
    /// pattern is anchored at both ends).
    pub fn is_match(&self, haystack: &str) -> bool {
        (self.matcher)(haystack)
    }

    /// The groups of the match in `haystack`, if the pattern matches, as
    /// the real crate reports them (a group inside a repetition keeps what
    /// it matched in the last iteration it took part in).
    pub fn captures<'h>(&self, haystack: &'h str) -> Option<Captures<'h>> {
        (self.captor)(haystack).map(|groups| Captures { haystack, groups })
    }

    /// The pattern this was compiled from.
    pub fn as_str(&self) -> &str {
        self.pattern
    }
}

impl fmt::Debug for Regex {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_tuple("Regex").field(&self.pattern).finish()
    }
}

impl fmt::Display for Regex {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.pattern)
    }
}

/// The groups of one match.
#[derive(Clone, Debug)]
pub struct Captures<'h> {
    haystack: &'h str,
    groups: Vec<Option<(usize, usize)>>,
}

impl<'h> Captures<'h> {
    /// Group `i` (0: the whole match), if it took part in the match.
    pub fn get(&self, i: usize) -> Option<Match<'h>> {
        let (start, end) = (*self.groups.get(i)?)?;
        Some(Match {
            haystack: self.haystack,
            start,
            end,
        })
    }

    /// The number of groups, group 0 included.
    #[allow(clippy::len_without_is_empty)] // never empty: group 0 is the match
    pub fn len(&self) -> usize {
        self.groups.len()
    }
}

/// Where a group matched.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Match<'h> {
    haystack: &'h str,
    start: usize,
    end: usize,
}

impl<'h> Match<'h> {
    /// The matched text.
    pub fn as_str(&self) -> &'h str {
        &self.haystack[self.start..self.end]
    }

    /// Its byte offset in the haystack.
    pub fn start(&self) -> usize {
        self.start
    }

    /// The byte offset just past it.
    pub fn end(&self) -> usize {
        self.end
    }
}

/// A pattern this crate does not know.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Error {
    pattern: String,
}

impl fmt::Display for Error {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "regex {:?} is not supported by rtv's regex stand-in (vendor/regex), \
             which knows only the patterns oci-spec uses",
            self.pattern
        )
    }
}

impl std::error::Error for Error {}

/// `^(\d+(-\d+)?)(,\d+(-\d+)?)*$`: one or more comma-separated items, each
/// digits or digits-digits.
fn cpu_list(s: &str) -> bool {
    s.split(',').all(|item| {
        let (first, last) = match item.split_once('-') {
            Some((a, b)) => (a, Some(b)),
            None => (item, None),
        };
        digits(first) && last.is_none_or(digits)
    })
}

/// [`cpu_list`]'s groups: 1 the first item, 2 its `-\d+`; 3 the last
/// `,item`, 4 the `-\d+` of the last later item that had one (the real
/// crate keeps a group's match from an earlier iteration of its
/// repetition when the last iteration skipped it).
fn cpu_list_groups(s: &str) -> Option<Vec<Option<(usize, usize)>>> {
    if !cpu_list(s) {
        return None;
    }
    let mut groups = vec![Some((0, s.len())), None, None, None, None];
    let mut at = 0;
    for (n, item) in s.split(',').enumerate() {
        let end = at + item.len();
        let dash = item.find('-').map(|d| (at + d, end));
        if n == 0 {
            groups[1] = Some((at, end));
            groups[2] = dash;
        } else {
            groups[3] = Some((at - 1, end));
            if dash.is_some() {
                groups[4] = dash;
            }
        }
        at = end + 1;
    }
    Some(groups)
}

/// `^google/protobuf/([^/]+\.proto)$`: group 1 is the file name (one or
/// more characters other than `/`, newlines included, ending in `.proto`).
fn protobuf_well_known(s: &str) -> Option<Vec<Option<(usize, usize)>>> {
    const PREFIX: &str = "google/protobuf/";
    let name = s.strip_prefix(PREFIX)?;
    if name.len() > ".proto".len() && name.ends_with(".proto") && !name.contains('/') {
        Some(vec![Some((0, s.len())), Some((PREFIX.len(), s.len()))])
    } else {
        None
    }
}

/// `\d+`, the whole of `s`.
fn digits(s: &str) -> bool {
    !s.is_empty() && s.chars().all(is_decimal_digit)
}

/// `\d` with Unicode on: general category `Nd`.
fn is_decimal_digit(c: char) -> bool {
    if c.is_ascii() {
        return c.is_ascii_digit();
    }
    let c = c as u32;
    DECIMAL_NUMBER
        .binary_search_by(|&(lo, hi)| {
            if hi < c {
                std::cmp::Ordering::Less
            } else if lo > c {
                std::cmp::Ordering::Greater
            } else {
                std::cmp::Ordering::Equal
            }
        })
        .is_ok()
}

/// General category `Nd` (Decimal_Number) of Unicode 16.0.0: regex-syntax
/// 0.8's `unicode_tables::perl_decimal::DECIMAL_NUMBER`, which the real
/// crate's `\d` is.
const DECIMAL_NUMBER: &[(u32, u32)] = &[
    (0x30, 0x39),
    (0x660, 0x669),
    (0x6F0, 0x6F9),
    (0x7C0, 0x7C9),
    (0x966, 0x96F),
    (0x9E6, 0x9EF),
    (0xA66, 0xA6F),
    (0xAE6, 0xAEF),
    (0xB66, 0xB6F),
    (0xBE6, 0xBEF),
    (0xC66, 0xC6F),
    (0xCE6, 0xCEF),
    (0xD66, 0xD6F),
    (0xDE6, 0xDEF),
    (0xE50, 0xE59),
    (0xED0, 0xED9),
    (0xF20, 0xF29),
    (0x1040, 0x1049),
    (0x1090, 0x1099),
    (0x17E0, 0x17E9),
    (0x1810, 0x1819),
    (0x1946, 0x194F),
    (0x19D0, 0x19D9),
    (0x1A80, 0x1A89),
    (0x1A90, 0x1A99),
    (0x1B50, 0x1B59),
    (0x1BB0, 0x1BB9),
    (0x1C40, 0x1C49),
    (0x1C50, 0x1C59),
    (0xA620, 0xA629),
    (0xA8D0, 0xA8D9),
    (0xA900, 0xA909),
    (0xA9D0, 0xA9D9),
    (0xA9F0, 0xA9F9),
    (0xAA50, 0xAA59),
    (0xABF0, 0xABF9),
    (0xFF10, 0xFF19),
    (0x104A0, 0x104A9),
    (0x10D30, 0x10D39),
    (0x10D40, 0x10D49),
    (0x11066, 0x1106F),
    (0x110F0, 0x110F9),
    (0x11136, 0x1113F),
    (0x111D0, 0x111D9),
    (0x112F0, 0x112F9),
    (0x11450, 0x11459),
    (0x114D0, 0x114D9),
    (0x11650, 0x11659),
    (0x116C0, 0x116C9),
    (0x116D0, 0x116E3),
    (0x11730, 0x11739),
    (0x118E0, 0x118E9),
    (0x11950, 0x11959),
    (0x11BF0, 0x11BF9),
    (0x11C50, 0x11C59),
    (0x11D50, 0x11D59),
    (0x11DA0, 0x11DA9),
    (0x11F50, 0x11F59),
    (0x16130, 0x16139),
    (0x16A60, 0x16A69),
    (0x16AC0, 0x16AC9),
    (0x16B50, 0x16B59),
    (0x16D70, 0x16D79),
    (0x1CCF0, 0x1CCF9),
    (0x1D7CE, 0x1D7FF),
    (0x1E140, 0x1E149),
    (0x1E2F0, 0x1E2F9),
    (0x1E4F0, 0x1E4F9),
    (0x1E5F1, 0x1E5FA),
    (0x1E950, 0x1E959),
    (0x1FBF0, 0x1FBF9),
];

#[cfg(test)]
mod tests {
    use super::*;

    const CPU_LIST: &str = r"^(\d+(-\d+)?)(,\d+(-\d+)?)*$";

    #[test]
    fn cpu_list_matches_as_the_regex_crate() {
        let re = Regex::new(CPU_LIST).unwrap();
        assert_eq!(re.as_str(), CPU_LIST);
        // Checked against regex 1.13.2 (which agreed on every code point
        // and on millions of generated strings when this was written).
        for s in [
            "0",
            "7",
            "0-3",
            "1,3",
            "0-3,8-11,15",
            "00-0",
            "12345678901234567890",
        ] {
            assert!(re.is_match(s), "{s:?}");
        }
        for s in [
            "", ",", "1,", ",1", "1,,2", "-", "1-", "-1", "1-2-3", "1--2", "a", "1 ", " 1", "1\n",
            "\n1", "1,a", "+1", "1.5", "²", "Ⅳ",
        ] {
            assert!(!re.is_match(s), "{s:?}");
        }
        // `\d` is Unicode's Nd, as in the regex crate with `unicode` on.
        for s in ["٣", "١-٣", "𝟎,𝟿", "０-９", "\u{1E5F1}", "\u{116E3}"] {
            assert!(re.is_match(s), "{s:?}");
        }
        for s in ["\u{116E4}", "\u{1D7CD}", "\u{1E5F0}", "\u{1FBFA}"] {
            assert!(!re.is_match(s), "{s:?}");
        }
    }

    fn groups(re: &Regex, s: &str) -> Option<Vec<Option<&'static str>>> {
        let c = re.captures(s)?;
        Some(
            (0..c.len())
                .map(|i| c.get(i).map(|m| &*m.as_str().to_owned().leak()))
                .collect(),
        )
    }

    #[test]
    fn cpu_list_captures_as_the_regex_crate() {
        let re = Regex::new(CPU_LIST).unwrap();
        // What regex 1.13.2 reports.
        let cases: &[(&str, [Option<&str>; 5])] = &[
            ("1", [Some("1"), Some("1"), None, None, None]),
            ("1-2", [Some("1-2"), Some("1-2"), Some("-2"), None, None]),
            ("1,2", [Some("1,2"), Some("1"), None, Some(",2"), None]),
            (
                "1,2-3,4",
                [Some("1,2-3,4"), Some("1"), None, Some(",4"), Some("-3")],
            ),
            (
                "1-2,3",
                [Some("1-2,3"), Some("1-2"), Some("-2"), Some(",3"), None],
            ),
            (
                "1,2-3",
                [Some("1,2-3"), Some("1"), None, Some(",2-3"), Some("-3")],
            ),
        ];
        for (s, want) in cases {
            assert_eq!(groups(&re, s).as_deref(), Some(&want[..]), "{s:?}");
        }
        let c = re.captures("1,2-3,4").unwrap();
        let m = c.get(4).unwrap();
        assert_eq!((m.start(), m.end()), (3, 5));
        assert!(re.captures("1,").is_none());
    }

    #[test]
    fn protobuf_well_known_captures_as_the_regex_crate() {
        let re = Regex::new(r"^google/protobuf/([^/]+\.proto)$").unwrap();
        // What regex 1.13.2 reports.
        for (s, name) in [
            ("google/protobuf/any.proto", "any.proto"),
            ("google/protobuf/x\n.proto", "x\n.proto"),
            ("google/protobuf/.proto.proto", ".proto.proto"),
        ] {
            assert_eq!(groups(&re, s), Some(vec![Some(s), Some(name)]), "{s:?}");
            assert!(re.is_match(s));
        }
        for s in [
            "google/protobuf/.proto",
            "google/protobuf/a/b.proto",
            "google/protobuf/a.proto\n",
            "xgoogle/protobuf/a.proto",
            "google/protobuf/a.prot",
        ] {
            assert!(re.captures(s).is_none(), "{s:?}");
            assert!(!re.is_match(s), "{s:?}");
        }
    }

    #[test]
    fn decimal_table_is_sorted_and_disjoint() {
        for w in DECIMAL_NUMBER.windows(2) {
            assert!(w[0].0 <= w[0].1 && w[0].1 < w[1].0, "{w:x?}");
        }
        let digits: u32 = DECIMAL_NUMBER.iter().map(|(lo, hi)| hi - lo + 1).sum();
        assert_eq!(digits, 760); // Nd in Unicode 16.0.0
    }

    #[test]
    fn unknown_patterns_are_refused_by_name() {
        let e = Regex::new(r"^\d+$").unwrap_err();
        assert!(
            e.to_string().contains(r#""^\\d+$" is not supported"#),
            "{e}"
        );
    }

    /// The crates that use `regex` in the workspace's resolved graph: if this
    /// changes, check their patterns against `PATTERNS`, then update it.
    #[test]
    fn the_only_users_are_oci_spec_and_protobuf_codegen() {
        let out = std::process::Command::new(env!("CARGO"))
            .args(["metadata", "--format-version", "1", "--offline"])
            // Only this host's packages: the others (Windows and wasm
            // dependencies of containerd-shim's) are never downloaded.
            .args([
                "--filter-platform",
                &format!("{}-unknown-linux-gnu", std::env::consts::ARCH),
            ])
            .current_dir(env!("CARGO_MANIFEST_DIR"))
            .output()
            .unwrap();
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
        let meta: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
        let packages = meta["packages"].as_array().unwrap();
        let me = packages
            .iter()
            .find(|p| p["manifest_path"] == concat!(env!("CARGO_MANIFEST_DIR"), "/Cargo.toml"))
            .unwrap();
        let regexes: Vec<_> = packages.iter().filter(|p| p["name"] == "regex").collect();
        assert_eq!(regexes.len(), 1, "the real regex crate is in the graph too");
        let mut users: Vec<String> = meta["resolve"]["nodes"]
            .as_array()
            .unwrap()
            .iter()
            .filter(|n| {
                n["deps"]
                    .as_array()
                    .unwrap()
                    .iter()
                    .any(|d| d["pkg"] == me["id"])
            })
            .map(|n| {
                let p = packages.iter().find(|p| p["id"] == n["id"]).unwrap();
                format!(
                    "{} {}",
                    p["name"].as_str().unwrap(),
                    p["version"].as_str().unwrap()
                )
            })
            .collect();
        users.sort();
        assert_eq!(
            users,
            [
                "oci-spec 0.10.0",
                "oci-spec 0.9.0",
                "protobuf-codegen 3.7.2"
            ]
        );
    }

    /// oci-spec's own validation runs through this crate.
    #[test]
    fn oci_spec_exec_cpu_affinity() {
        use oci_spec::runtime::Process;
        let parse = |v: serde_json::Value| {
            serde_json::from_value::<Process>(serde_json::json!({
                "cwd": "/",
                "user": {"uid": 0, "gid": 0},
                "execCPUAffinity": {"initial": v, "final": "0-3,7"}
            }))
        };
        let p = parse("1,٣-4".into()).unwrap();
        let a = p.exec_cpu_affinity().as_ref().unwrap();
        assert_eq!(a.initial().as_deref(), Some("1,٣-4"));
        assert_eq!(a.cpu_affinity_final().as_deref(), Some("0-3,7"));
        let e = parse("1-".into()).unwrap_err();
        assert!(
            e.to_string().contains("Invalid execCPUAffinity format: 1-"),
            "{e}"
        );
    }
}
