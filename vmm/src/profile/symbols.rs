//! The guest kernel's symbol table, from its `System.map` (`nm -n` output:
//! `<hex address> <type> <name>` a line): text symbols for naming
//! addresses, and the few data symbols the profiler reads.

use std::path::{Path, PathBuf};

/// A System.map larger than this is refused (the guest kernel's is ~1 MB).
pub const MAX_FILE_SIZE: u64 = 64 << 20;

/// Errors loading a System.map.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// The file cannot be read.
    #[error("System.map {path}: {source}")]
    Read {
        /// The file.
        path: PathBuf,
        /// Why.
        source: std::io::Error,
    },
    /// The file is larger than [`MAX_FILE_SIZE`].
    #[error(
        "System.map {path}: {size} bytes, more than the {MAX_FILE_SIZE} a symbol table may have"
    )]
    TooLarge {
        /// The file.
        path: PathBuf,
        /// Its size.
        size: u64,
    },
    /// No line of the file is a text symbol.
    #[error("System.map {path}: no text symbols (is it a System.map?)")]
    NoText {
        /// The file.
        path: PathBuf,
    },
}

/// A text symbol: its address and where its name is in the name arena.
#[derive(Debug, Clone, Copy)]
struct TextSymbol {
    addr: u64,
    name_start: u32,
    name_len: u32,
}

/// Data symbols the profiler reads, when the map has them.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct KnownSymbols {
    /// The per-cpu `current_task` (Linux up to 6.1): an offset from the
    /// per-cpu base.
    pub current_task: Option<u64>,
    /// The per-cpu `pcpu_hot` (Linux 6.2 on), whose first member is
    /// `current_task`.
    pub pcpu_hot: Option<u64>,
    /// rtv's `rtv_profile_info` (guest-kernel patch 0007).
    pub rtv_profile_info: Option<u64>,
    /// `init_task`, whose name is "swapper" (to find `comm` in kernels
    /// without `rtv_profile_info`).
    pub init_task: Option<u64>,
}

/// The symbols of one kernel.
#[derive(Debug, Default)]
pub struct SymbolMap {
    names: String,
    text: Vec<TextSymbol>,
    /// Where kernel code is: from the first text symbol to `_etext`, and
    /// init code (`_sinittext` to `_einittext`, where `start_kernel` and
    /// the initcalls' own functions live during boot).
    ranges: Vec<(u64, u64)>,
    known: KnownSymbols,
}

fn is_text_type(t: &str) -> bool {
    matches!(t, "T" | "t" | "W" | "w")
}

/// Section markers (`_stext`, `__entry_text_start`, ...) share their
/// address with a real function, which names it better.
fn is_marker(name: &str) -> bool {
    name.starts_with('_')
        && (name.ends_with("_start") || name.ends_with("_end") || name.ends_with("text"))
}

impl SymbolMap {
    /// Reads and parses the System.map at `path`.
    pub fn load(path: &Path) -> Result<Self, Error> {
        let read = |source| Error::Read {
            path: path.to_path_buf(),
            source,
        };
        let size = std::fs::metadata(path).map_err(read)?.len();
        if size > MAX_FILE_SIZE {
            return Err(Error::TooLarge {
                path: path.to_path_buf(),
                size,
            });
        }
        let bytes = std::fs::read(path).map_err(read)?;
        let map = Self::parse(&String::from_utf8_lossy(&bytes));
        if map.text.is_empty() {
            return Err(Error::NoText {
                path: path.to_path_buf(),
            });
        }
        Ok(map)
    }

    /// Parses System.map text; lines that are not `<hex> <type> <name>`
    /// are skipped.
    pub fn parse(text: &str) -> Self {
        let mut names = String::new();
        // (symbol, rank: lower names an address better)
        let mut syms: Vec<(TextSymbol, u8)> = Vec::new();
        let mut known = KnownSymbols::default();
        let (mut etext, mut sinittext, mut einittext) = (None, None, None);
        for line in text.lines() {
            let mut fields = line.split_whitespace();
            let (Some(addr), Some(kind), Some(name)) =
                (fields.next(), fields.next(), fields.next())
            else {
                continue;
            };
            let Ok(addr) = u64::from_str_radix(addr, 16) else {
                continue;
            };
            match name {
                "current_task" => known.current_task = Some(addr),
                "pcpu_hot" => known.pcpu_hot = Some(addr),
                "rtv_profile_info" => known.rtv_profile_info = Some(addr),
                "init_task" => known.init_task = Some(addr),
                "_etext" => etext = Some(addr),
                "_sinittext" => sinittext = Some(addr),
                "_einittext" => einittext = Some(addr),
                _ => {}
            }
            if !is_text_type(kind) || name.len() > 512 {
                continue;
            }
            let (Ok(name_start), Ok(name_len)) =
                (u32::try_from(names.len()), u32::try_from(name.len()))
            else {
                continue;
            };
            names.push_str(name);
            syms.push((
                TextSymbol {
                    addr,
                    name_start,
                    name_len,
                },
                u8::from(is_marker(name)) * 2 + u8::from(kind == "t" || kind == "w"),
            ));
        }
        // One symbol an address: a function before a section marker, a
        // global name before a local one, then the first in the file.
        syms.sort_by_key(|(s, rank)| (s.addr, *rank));
        syms.dedup_by_key(|(s, _)| s.addr);
        let text: Vec<TextSymbol> = syms.into_iter().map(|(s, _)| s).collect();
        let mut ranges = Vec::new();
        if let (Some(first), Some(last)) = (text.first(), text.last()) {
            // Without _etext, the last symbol gets one page.
            let end = match etext {
                Some(end) if end > first.addr && !matches!(sinittext, Some(s) if end > s) => end,
                _ => last.addr.saturating_add(4096),
            };
            ranges.push((first.addr, end));
        }
        if let (Some(start), Some(end)) = (sinittext, einittext) {
            if start < end && ranges.iter().all(|&(_, e)| e <= start) {
                ranges.push((start, end));
            }
        }
        names.shrink_to_fit();
        Self {
            names,
            text,
            ranges,
            known,
        }
    }

    /// The data symbols the profiler uses.
    pub fn known(&self) -> &KnownSymbols {
        &self.known
    }

    /// Number of text symbols.
    pub fn text_symbols(&self) -> usize {
        self.text.len()
    }

    /// Whether `addr` lies in kernel code: from the first text symbol to
    /// `_etext`, or in init code (`_sinittext` to `_einittext`).
    pub fn in_text(&self, addr: u64) -> bool {
        self.ranges.iter().any(|&(s, e)| addr >= s && addr < e)
    }

    /// The text symbol `addr` is in: the last one at or below it, within
    /// kernel text.
    pub fn lookup(&self, addr: u64) -> Option<&str> {
        if !self.in_text(addr) {
            return None;
        }
        let i = self.text.partition_point(|s| s.addr <= addr);
        let sym = self.text.get(i.checked_sub(1)?)?;
        let start = sym.name_start as usize;
        self.names.get(start..start + sym.name_len as usize)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const MAP: &str = "\
0000000000000000 D __per_cpu_start
000000000001fbc0 D current_task
ffffffff81000000 T _stext
ffffffff81000000 t startup_64
ffffffff81000100 T do_one_initcall
ffffffff81000100 t do_one_initcall_alias
ffffffff81000200 W weak_fn
ffffffff81000300 t local_fn
bogus line
zzzz T not_hex
ffffffff81000400 T _etext
ffffffff81800000 T _sinittext
ffffffff81800000 T start_kernel
ffffffff81800400 T _einittext
ffffffff82000000 R rtv_profile_info
ffffffff82001000 D init_task
ffffffff83000000 B some_bss
";

    #[test]
    fn names_addresses_and_finds_data_symbols() {
        let m = SymbolMap::parse(MAP);
        assert_eq!(m.lookup(0xffff_ffff_8100_0000), Some("startup_64"));
        assert_eq!(m.lookup(0xffff_ffff_8100_00ff), Some("startup_64"));
        assert_eq!(m.lookup(0xffff_ffff_8100_0100), Some("do_one_initcall"));
        assert_eq!(m.lookup(0xffff_ffff_8100_0250), Some("weak_fn"));
        assert_eq!(m.lookup(0xffff_ffff_8100_03ff), Some("local_fn"));
        assert_eq!(m.lookup(0xffff_ffff_8100_0400), None, "past _etext");
        assert_eq!(m.lookup(0xffff_ffff_8180_0010), Some("start_kernel"));
        assert_eq!(m.lookup(0xffff_ffff_8180_0400), None, "past _einittext");
        assert_eq!(m.lookup(0xffff_ffff_80ff_ffff), None, "below text");
        assert_eq!(m.lookup(0x1000), None);
        assert_eq!(m.lookup(u64::MAX), None);
        assert!(m.in_text(0xffff_ffff_8100_0000));
        assert!(!m.in_text(0xffff_ffff_8200_0000));
        assert_eq!(
            m.known(),
            &KnownSymbols {
                current_task: Some(0x1fbc0),
                pcpu_hot: None,
                rtv_profile_info: Some(0xffff_ffff_8200_0000),
                init_task: Some(0xffff_ffff_8200_1000),
            }
        );
        assert_eq!(m.text_symbols(), 7);
    }

    #[test]
    fn without_etext_the_last_symbol_gets_a_page() {
        let m = SymbolMap::parse("0000000000100000 T main\n0000000000100040 t spin\n");
        assert_eq!(m.lookup(0x10_0040 + 4095), Some("spin"));
        assert_eq!(m.lookup(0x10_0040 + 4096), None);
        assert_eq!(SymbolMap::parse("").lookup(0), None);
    }

    #[test]
    fn load_refuses_what_is_not_a_symbol_table() {
        let dir = std::env::temp_dir().join(format!("rtv-symbols-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let p = dir.join("System.map");
        std::fs::write(&p, "hello\nworld\n").unwrap();
        assert!(matches!(SymbolMap::load(&p), Err(Error::NoText { .. })));
        std::fs::write(&p, MAP).unwrap();
        assert_eq!(SymbolMap::load(&p).unwrap().text_symbols(), 7);
        let missing = dir.join("nope");
        let e = SymbolMap::load(&missing).unwrap_err().to_string();
        assert!(e.contains("nope"), "{e}");
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
